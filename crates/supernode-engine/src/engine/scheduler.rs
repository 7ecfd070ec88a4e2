//! The scheduler: owns the block pool and the queues, and plans each step as plain data.
//!
//! It follows vLLM v1's rule: there is no prefill phase and no decode phase. Each step every
//! request's computed tokens catch up with its tokens under a token budget: one token for a
//! decoding request, a chunk of the prompt for one still prefilling, nothing for the part of
//! the prompt found in the prefix cache (counted as computed on admission). The [`Plan`] it
//! returns says which requests run, which positions each computes, their block tables, which
//! rows are sampled or returned, who was admitted, who was preempted and who ran out of room.
//! It never touches a tensor: the runner turns the plan into the model's flat batch, and the
//! engine's output processing samples and reports. [`Scheduler::update`] records what the
//! forward pass computed; [`Scheduler::append`] adds a sampled token.
//!
//! **Draft verification** (speculative decoding): [`Scheduler::set_drafts`] gives a decoding
//! request up to k proposed tokens. When the request is caught up (only its last sampled
//! token left to compute) and the budget and the pool allow, the plan computes the drafts
//! right after that token and marks its last `drafts + 1` rows as sampled
//! ([`Scheduled::drafts`]). The drafts never enter the request's tokens: [`Scheduler::update`]
//! counts only the real tokens as computed, the engine appends the tokens it samples, and
//! [`Scheduler::accept_drafts`] then counts the accepted drafts' K/V as computed (they equal
//! the tokens appended) and takes back the blocks that only held rejected drafts. A rejected
//! draft's slot is overwritten by the next token computed there, and no block holding one is
//! registered in the prefix cache.
//!
//! **Preemption**: when a running request needs a block and none is free, the most recently
//! admitted one gives all its blocks back and returns to the front of the queue, to be
//! recomputed later (its generated tokens are then part of what it recomputes), so the pool
//! running out never fails a request. A request alone that still cannot grow is out of room.
//!
//! **Blocks** are held by a [`Blocks`] guard per request and return to the pool, tail first,
//! when it is dropped or cleared; nothing has to remember to free them.
//!
//! **Where the next features go** (each is a field of the plan or a hook here, not another
//! loop):
//! - a per-request logits processor (grammar mask, `logit_bias`) runs in output processing on
//!   the rows this plan marks as sampled;
//! - hidden-state rows for MTP and EAGLE heads are requested per [`Scheduled`] beside its
//!   logits rows;
//! - a KV connector (prefill/decode hand-off) exports a finished prefill's [`Blocks`] and
//!   imports a remote one's into the table instead of computing it; the pool's register and
//!   evict points are where block-stored and block-removed events are published, with the
//!   stable [`BlockHash`]es a router needs;
//! - per-layer cache kinds (sliding window, MLA latent) become one block table per cache
//!   group in [`Scheduled`], as in vLLM's hybrid KV cache manager.
//!
//! **Recurrent state** (hybrid models: Gated DeltaNet layers beside attention): a request also
//! holds one state slot ([`Scheduled::state_slot`]) from admission until it finishes or is
//! preempted, beside its blocks for the attention layers. There are `state_slots` of them
//! ([`SchedulerConfig::state_slots`]); a request waits when none is free. A slot's state is only
//! valid for the exact prefix its request computed, and is not saved anywhere else, so for such
//! models: a preempted request gives its slot back and recomputes from position 0, and there is
//! no prefix caching (a cached block would give K/V but no matching state). Their prompts are
//! cut only at multiples of the linear-attention window ([`DELTA_CHUNK`]) or at the prompt's
//! end, so that a prompt always goes through the chunked form in the same windows, alone or
//! in any batch.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use supernode_kernels::ops::DELTA_CHUNK;

use super::block_pool::{
    block_hash, root_hash, BlockHash, BlockPool, Blocks, SharedPool, BLOCK_SIZE,
};

/// A request's identity in the engine, unique within the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl RequestId {
    /// A new id, never handed out before in this process.
    pub fn fresh() -> RequestId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        RequestId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// The scheduler's limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests running at once.
    pub max_num_seqs: usize,
    /// Tokens computed per step.
    pub max_num_batched_tokens: usize,
    /// Blocks of [`BLOCK_SIZE`] slots in the pool.
    pub num_blocks: usize,
    /// Prefix caching (ignored, i.e. off, for a model with recurrent state).
    pub prefix_caching: bool,
    /// Keys every prefix-cache hash of this deployment (empty: none).
    pub salt: String,
    /// Recurrent state slots (one per running request); 0 for a model without recurrent state.
    pub state_slots: usize,
}

/// A request as the scheduler sees it.
pub struct NewRequest {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    /// Keeps this request's prefix-cache blocks apart from those of other salts.
    pub cache_salt: Option<String>,
    /// Return the logits of every prompt position (the prefix cache is then not used, since
    /// cached positions are not computed).
    pub prompt_logits: bool,
}

/// One request's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduled {
    pub id: RequestId,
    /// Position of the first token computed.
    pub start: usize,
    /// The tokens computed, at positions `start..start + tokens.len()`.
    pub tokens: Vec<u32>,
    /// The request's blocks, covering at least `start + tokens.len()` slots.
    pub block_table: Vec<u32>,
    /// Rows (offsets into `tokens`) whose logits are returned as prompt logits.
    pub prompt_rows: Range<usize>,
    /// Whether the last row is sampled (the request's computed tokens catch up this step).
    pub sample: bool,
    /// How many of the last `tokens` are draft tokens to verify (0 without speculation);
    /// with `sample`, the last `drafts + 1` rows are sampled.
    pub drafts: usize,
    /// The request's recurrent state slot (models with linear attention).
    pub state_slot: Option<usize>,
    /// The length of its prompt.
    pub prompt_len: usize,
}

impl Scheduled {
    /// The rows whose logits the forward pass must return, ascending: the prompt rows, then
    /// the sampled rows if they are not among them.
    pub fn logits_rows(&self) -> Range<usize> {
        let n = self.tokens.len();
        match (self.prompt_rows.is_empty(), self.sample) {
            (true, true) => n - 1 - self.drafts..n,
            (true, false) => 0..0,
            (false, true) => self.prompt_rows.start..n,
            (false, false) => self.prompt_rows.clone(),
        }
    }
}

/// A request admitted for the first time.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub id: RequestId,
    /// Prompt tokens found in the prefix cache.
    pub cached_tokens: usize,
}

/// A request the cache cannot hold any further: it ends with `length`.
#[derive(Clone, Debug, PartialEq)]
pub struct OutOfRoom {
    pub id: RequestId,
    /// Whether it had been admitted before (else it leaves the waiting queue's count).
    pub was_admitted: bool,
}

/// What one step does, as plain data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Requests that run, in batch order.
    pub scheduled: Vec<Scheduled>,
    pub admitted: Vec<Admitted>,
    /// Requests sent back to wait, without their blocks.
    pub preempted: Vec<RequestId>,
    /// Requests removed because the cache cannot hold them.
    pub out_of_room: Vec<OutOfRoom>,
}

impl Plan {
    /// Tokens computed by this step.
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.tokens.len()).sum()
    }
}

/// A request in the scheduler.
struct Seq {
    id: RequestId,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose K/V is in the cache.
    computed: usize,
    blocks: Blocks,
    /// Hashes of the leading full blocks that are registered (or were found) in the pool.
    hashes: Vec<BlockHash>,
    /// The parent of the first block's hash: the salts.
    root: BlockHash,
    /// The request's own salt, for the block events.
    cache_salt: Option<String>,
    admitted_once: bool,
    prompt_logits: bool,
    /// Prompt positions whose logits were returned already (they are not sent twice when a
    /// preempted request recomputes them).
    prompt_rows_sent: usize,
    /// Proposed tokens to verify after `tokens` (never part of them).
    drafts: Vec<u32>,
    /// Its recurrent state slot while it runs (hybrid models).
    state_slot: Option<StateSlot>,
}

impl Seq {
    /// Gives the blocks and the state slot back; nothing is computed afterwards.
    fn release(&mut self) {
        self.blocks.clear();
        self.hashes.clear();
        self.state_slot = None;
        self.computed = 0;
        self.drafts.clear();
    }

    /// Registers the full blocks of computed tokens in the prefix cache.
    fn register_full(&mut self, pool: &SharedPool) {
        let full = self.computed / BLOCK_SIZE;
        if self.hashes.len() >= full {
            return;
        }
        let mut pool = pool.lock();
        while self.hashes.len() < full {
            let b = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(self.root);
            let toks = &self.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            let h = block_hash(&parent, toks);
            pool.register(
                self.blocks.ids()[b],
                h,
                parent,
                toks,
                b == 0,
                self.cache_salt.as_deref(),
            );
            self.hashes.push(h);
        }
    }
}

/// The free recurrent state slots, shared with the [`StateSlot`]s handed out.
#[derive(Clone, Default)]
struct SlotPool(Arc<Mutex<Vec<usize>>>);

impl SlotPool {
    fn new(n: usize) -> SlotPool {
        // Popped from the end: slot 0 first.
        SlotPool(Arc::new(Mutex::new((0..n).rev().collect())))
    }

    fn take(&self) -> Option<StateSlot> {
        let id = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(StateSlot {
            id,
            pool: self.clone(),
        })
    }

    fn num_free(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One recurrent state slot held by a request; it returns to the pool when dropped.
struct StateSlot {
    id: usize,
    pool: SlotPool,
}

impl Drop for StateSlot {
    fn drop(&mut self) {
        self.pool
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.id);
    }
}

/// Queues and block pool of one engine.
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: SharedPool,
    waiting: VecDeque<Seq>,
    /// Oldest admitted first; the last is preempted first.
    running: Vec<Seq>,
    /// Recurrent state slots (empty for a model without recurrent state).
    slots: SlotPool,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        // A cached block holds K/V but no recurrent state: no prefix caching with state.
        let prefix_caching = cfg.prefix_caching && cfg.state_slots == 0;
        let pool = SharedPool::new(BlockPool::new(cfg.num_blocks, prefix_caching));
        Scheduler {
            slots: SlotPool::new(cfg.state_slots),
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Recurrent state slots free.
    pub fn free_state_slots(&self) -> usize {
        self.slots.num_free()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Changes the token budget from the next step on.
    pub fn set_token_budget(&mut self, tokens: usize) {
        self.cfg.max_num_batched_tokens = tokens.max(1);
    }

    pub fn pool(&self) -> std::sync::MutexGuard<'_, BlockPool> {
        self.pool.lock()
    }

    /// An empty block table drawing on the pool (blocks held outside any request: the KV
    /// connector's leases).
    pub fn table(&self) -> Blocks {
        self.pool.table()
    }

    /// The hash every prefix-cache chain of a request with `cache_salt` starts from.
    pub fn root(&self, cache_salt: Option<&str>) -> BlockHash {
        root_hash(&self.cfg.salt, cache_salt.unwrap_or(""))
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Every request, running first.
    pub fn ids(&self) -> Vec<RequestId> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.id)
            .collect()
    }

    /// Queues a request at the back.
    pub fn add(&mut self, req: NewRequest) {
        let root = root_hash(&self.cfg.salt, req.cache_salt.as_deref().unwrap_or(""));
        self.waiting.push_back(Seq {
            id: req.id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            computed: 0,
            blocks: self.pool.table(),
            hashes: Vec::new(),
            root,
            cache_salt: req.cache_salt,
            admitted_once: false,
            prompt_logits: req.prompt_logits,
            prompt_rows_sent: 0,
            drafts: Vec::new(),
            state_slot: None,
        });
    }

    /// The request's tokens so far (prompt, then generated).
    pub fn tokens(&self, id: RequestId) -> Option<&[u32]> {
        self.find(id).map(|s| s.tokens.as_slice())
    }

    fn find(&self, id: RequestId) -> Option<&Seq> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Removes a request (finished or cancelled); its blocks go back to the pool. `Some(true)`
    /// if it had been admitted, `None` if it is unknown.
    pub fn remove(&mut self, id: RequestId) -> Option<bool> {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            return Some(self.running.remove(i).admitted_once);
        }
        let i = self.waiting.iter().position(|s| s.id == id)?;
        self.waiting.remove(i).map(|s| s.admitted_once)
    }

    /// Adds a sampled token to a running request.
    pub fn append(&mut self, id: RequestId, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// The running requests whose computed tokens have caught up but for the last sampled
    /// one (those that decode next step), with their tokens: the ones a proposer drafts for.
    pub fn decoding(&self) -> impl Iterator<Item = (RequestId, &[u32])> {
        self.running
            .iter()
            .filter(|s| s.computed + 1 == s.tokens.len())
            .map(|s| (s.id, s.tokens.as_slice()))
    }

    /// Proposes `drafts` to follow a running request's tokens in its next step (replacing any
    /// earlier proposal); the plan verifies as many as the budget and the pool allow.
    pub fn set_drafts(&mut self, id: RequestId, drafts: &[u32]) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.drafts.clear();
            s.drafts.extend_from_slice(drafts);
        }
    }

    /// After a step that verified drafts of `id` and appended the sampled tokens: the first
    /// `accepted` drafts were sampled as they were proposed, so their K/V, computed in that
    /// step, is kept; the blocks past the request's tokens (rejected drafts' slots) go back.
    pub fn accept_drafts(&mut self, id: RequestId, accepted: usize) {
        let Some(s) = self.running.iter_mut().find(|s| s.id == id) else {
            return;
        };
        debug_assert!(accepted <= s.drafts.len());
        debug_assert!(s.computed + accepted < s.tokens.len());
        debug_assert_eq!(
            s.tokens[s.computed..s.computed + accepted],
            s.drafts[..accepted]
        );
        s.computed = (s.computed + accepted).min(s.tokens.len().saturating_sub(1));
        s.drafts.clear();
        s.register_full(&self.pool);
        s.blocks.shrink_to(s.tokens.len());
    }

    /// How many of the `take` tokens after `computed` a request computes this step. With
    /// recurrent state (hybrid models), a cut inside the prompt falls on a multiple of
    /// [`DELTA_CHUNK`], so that the linear-attention layers see each of the prompt's aligned
    /// windows whole, and a request's prefill is the same computation whatever else is in the
    /// batch (0: the next window does not fit this step). Not when the whole budget is smaller
    /// than a window: the cuts then fall anywhere, and the results agree within rounding.
    fn cut(cfg: &SchedulerConfig, computed: usize, take: usize, prompt_len: usize) -> usize {
        let end = computed + take;
        if cfg.state_slots == 0 || cfg.max_num_batched_tokens < DELTA_CHUNK || end >= prompt_len {
            return take;
        }
        (end / DELTA_CHUNK * DELTA_CHUNK).saturating_sub(computed)
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        // (index into `running`, tokens to compute)
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut stalled = false;

        // Tokens the running requests have to compute (not drafts): drafts get only the
        // budget these leave.
        let mut pending: usize = self
            .running
            .iter()
            .map(|s| s.tokens.len() - s.computed)
            .sum();
        // Running requests first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &mut self.running[i];
            let own = s.tokens.len() - s.computed;
            pending = pending.saturating_sub(own);
            let take = Self::cut(&self.cfg, s.computed, own.min(budget), s.prompt_len);
            if take == 0 && own > 0 {
                // Its next prompt window does not fit in what is left of the budget.
                i += 1;
                continue;
            }
            // Drafts ride along only on a request that catches up, with budget and blocks to
            // spare; otherwise they are dropped for this step.
            let mut drafts = 0;
            if s.computed + take == s.tokens.len() {
                drafts = s.drafts.len().min(budget.saturating_sub(take + pending));
                if drafts > 0 && !s.blocks.grow_to(s.computed + take + drafts) {
                    drafts = 0;
                }
            }
            s.drafts.truncate(drafts);
            if s.blocks.grow_to(s.computed + take) {
                picked.push((i, take + drafts));
                budget -= take + drafts;
                i += 1;
                continue;
            }
            if self.running.len() > i + 1 {
                let victim = self.running.pop().expect("non-empty");
                self.preempt(victim, &mut plan);
            } else if i > 0 {
                let s = self.running.pop().expect("non-empty");
                self.preempt(s, &mut plan);
                break;
            } else {
                // Alone and the cache is full: it cannot grow any further.
                let s = self.running.remove(i);
                plan.out_of_room.push(OutOfRoom {
                    id: s.id,
                    was_admitted: true,
                });
                stalled = true;
            }
        }

        // Then admit waiting requests.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && !stalled {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if self.cfg.state_slots > 0 {
                match self.slots.take() {
                    Some(slot) => s.state_slot = Some(slot),
                    None => {
                        // Every slot is held by a running request: wait for one to end.
                        self.waiting.push_front(s);
                        break;
                    }
                }
            } else if s.blocks.is_empty() {
                self.match_prefix(&mut s);
            }
            let own = s.tokens.len() - s.computed;
            let take = Self::cut(&self.cfg, s.computed, own.min(budget), s.prompt_len);
            if take == 0 {
                s.release();
                self.waiting.push_front(s);
                break;
            }
            if !s.blocks.grow_to(s.computed + take) {
                s.release();
                if self.running.is_empty() {
                    // Even the whole cache cannot hold it: it is as long as it can get.
                    plan.out_of_room.push(OutOfRoom {
                        id: s.id,
                        was_admitted: s.admitted_once,
                    });
                    continue;
                }
                self.waiting.push_front(s);
                break;
            }
            if !s.admitted_once {
                s.admitted_once = true;
                plan.admitted.push(Admitted {
                    id: s.id,
                    cached_tokens: s.computed.min(s.prompt_len),
                });
            }
            picked.push((self.running.len(), take));
            self.running.push(s);
            budget -= take;
        }

        plan.scheduled = picked
            .into_iter()
            .map(|(i, take)| {
                let s = &self.running[i];
                let drafts = s.drafts.len();
                let (lo, hi) = (s.computed, s.computed + take - drafts);
                let prompt_rows = if s.prompt_logits {
                    let first = s.prompt_rows_sent.max(lo).min(hi);
                    first - lo..hi.min(s.prompt_len).max(first) - lo
                } else {
                    0..0
                };
                let mut tokens = s.tokens[lo..hi].to_vec();
                tokens.extend_from_slice(&s.drafts);
                Scheduled {
                    id: s.id,
                    start: lo,
                    tokens,
                    block_table: s.blocks.ids().to_vec(),
                    prompt_rows,
                    sample: hi == s.tokens.len(),
                    drafts,
                    state_slot: s.state_slot.as_ref().map(|slot| slot.id),
                    prompt_len: s.prompt_len,
                }
            })
            .collect();
        plan
    }

    /// Records that the forward pass computed `plan`'s tokens, and registers the blocks that
    /// became full in the prefix cache. Draft tokens do not count as computed until
    /// [`Scheduler::accept_drafts`] says which were accepted.
    pub fn update(&mut self, plan: &Plan) {
        for sc in &plan.scheduled {
            let Some(s) = self.running.iter_mut().find(|s| s.id == sc.id) else {
                continue;
            };
            debug_assert_eq!(s.computed, sc.start);
            s.computed = sc.start + sc.tokens.len() - sc.drafts;
            s.prompt_rows_sent = s.prompt_rows_sent.max(sc.start + sc.prompt_rows.end);
            s.register_full(&self.pool);
        }
    }

    /// Takes the registered blocks matching the start of `s`'s tokens. The last token is always
    /// left to compute, so that the step yields its logits.
    fn match_prefix(&mut self, s: &mut Seq) {
        if s.prompt_logits {
            return;
        }
        let max_blocks = (s.tokens.len() - 1) / BLOCK_SIZE;
        let mut parent = s.root;
        let mut pool = self.pool.lock();
        for i in 0..max_blocks {
            let toks = &s.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let h = block_hash(&parent, toks);
            match pool.lookup(&h, &parent, toks) {
                Some(b) => {
                    s.blocks.push_owned(b);
                    s.hashes.push(h);
                    parent = h;
                }
                None => break,
            }
        }
        s.computed = s.blocks.len() * BLOCK_SIZE;
    }

    /// Sends `s` back to the front of the queue, without its blocks.
    fn preempt(&mut self, mut s: Seq, plan: &mut Plan) {
        s.release();
        plan.preempted.push(s.id);
        self.waiting.push_front(s);
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
