//! The engine loop: continuous batching over a paged KV cache, with prefix reuse.
//!
//! One thread owns the model, the KV cache and the [`BlockPool`]. Each step it
//!
//! 1. takes new requests and drops those whose client went away (their blocks return to the
//!    pool);
//! 2. schedules under a token budget: every running sequence gets the tokens it has not yet
//!    computed (one for a decoding sequence, a chunk of the prompt for one still prefilling),
//!    then waiting sequences are admitted while the budget, the sequence limit and the free
//!    blocks allow. There are no prefill and decode modes: a long prompt is prefilled a chunk at
//!    a time between the other sequences' decode steps;
//! 3. runs one forward pass over the flat batch of all scheduled tokens;
//! 4. samples the sequences whose computed tokens caught up with their tokens, detokenises,
//!    checks stop strings and limits, and sends each client its event.
//!
//! **Prefix reuse**: a sequence's full blocks are registered in the pool under a hash chain of
//! their tokens; a new sequence takes the registered blocks matching its prompt, and those
//! tokens count as computed. **Preemption**: when a running sequence needs a block and none is
//! free, the most recently admitted sequence gives all its blocks back and waits to be
//! recomputed (its generated tokens become part of its prompt; its sampler keeps its state), so
//! the pool running out never fails a request.
//!
//! **Batch invariance**: the kernels reduce in an order that depends neither on the batch size
//! nor on a token's place in the batch, and a chunked prefill computes the same K/V as one pass,
//! so a request's logits, and hence its greedy tokens, are the same alone and under load.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use supernode_models::{Batch, KvCache, KvLayerSpec, Model};

use crate::block_pool::{block_hash, BlockHash, BlockPool};
use crate::error::EngineError;
use crate::sampler::{Sampler, SamplingParams};
use crate::session::{FinishReason, BLOCK_SIZE};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// Limits of one engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens computed per step (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Blocks of [`BLOCK_SIZE`] slots in the KV cache.
    pub num_blocks: usize,
    /// The longest sequence (prompt plus output) in tokens.
    pub ctx_len: usize,
    /// Requests that may wait for admission; more are refused.
    pub max_waiting: usize,
    pub prefix_caching: bool,
}

impl EngineConfig {
    /// Blocks that fit in `kv_bytes` for a model with these KV layer specs.
    pub fn blocks_for_budget(specs: &[KvLayerSpec], kv_bytes: usize) -> usize {
        let per_block = KvCache::bytes_per_token(specs) * BLOCK_SIZE;
        kv_bytes / per_block.max(1)
    }
}

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Output tokens at most (the context may end it sooner).
    pub max_tokens: usize,
    /// Generation stops before the first occurrence of any of these texts.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Where the events go.
    pub sink: Box<dyn Sink>,
}

/// The receiving end of a request's events.
pub trait Sink: Send {
    /// Delivers one event; `false` if the receiver is gone (the request is then cancelled).
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone.
    fn is_closed(&self) -> bool;
}

/// What a request hears from the engine: tokens, then exactly one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Token(TokenEvent),
    Done(Finish),
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (held back while it might start a stop string
    /// or an incomplete character).
    pub text: String,
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Natural log-probability of the chosen token under the model's distribution.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// Text held back until the end (follows the last token event's text).
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from the prefix cache on admission.
    pub cached_tokens: usize,
}

/// Live figures for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub blocks_in_use: AtomicUsize,
    pub blocks_total: AtomicUsize,
    pub blocks_cached: AtomicUsize,
    pub prefix_hit_tokens: AtomicU64,
    pub prompt_tokens_computed: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
}

/// Why a request was refused at the door.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    #[error("the prompt has {prompt} tokens but the context holds {ctx}")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("{0} requests are already waiting; try again later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

enum Msg {
    Submit(Box<Request>),
    /// Cancel everything and exit.
    Abort,
}

/// The handle the server holds: submit requests, read stats, shut down.
pub struct EngineHandle {
    tx: Option<Sender<Msg>>,
    stats: Arc<EngineStats>,
    queued: Arc<AtomicUsize>,
    cfg: EngineConfig,
    vocab_size: usize,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the engine thread over `model` with a KV cache of `cfg.num_blocks` blocks.
    pub fn start(
        model: Box<dyn Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
    ) -> Result<EngineHandle, EngineError> {
        if cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 || cfg.ctx_len == 0 {
            return Err(EngineError::Invalid(
                "max_num_seqs, max_num_batched_tokens and the context must be at least 1".into(),
            ));
        }
        if cfg.ctx_len > model.config().context_len {
            return Err(EngineError::Invalid(format!(
                "context length {} exceeds the model's {}",
                cfg.ctx_len,
                model.config().context_len
            )));
        }
        let kv = KvCache::new(&model.kv_specs(), BLOCK_SIZE, cfg.num_blocks)?;
        let stats = Arc::new(EngineStats::default());
        stats.blocks_total.store(cfg.num_blocks, Ordering::Relaxed);
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let eog = tokenizer
            .as_ref()
            .map(|t| t.eog_ids().to_vec())
            .unwrap_or_default();
        let vocab_size = model.config().vocab_size;
        let core = Core {
            pool: BlockPool::new(cfg.num_blocks, cfg.prefix_caching),
            model,
            kv,
            tokenizer,
            eog,
            cfg: cfg.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            queued: queued.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("supernode-engine".into())
            .spawn(move || core.run(rx))
            .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx: Some(tx),
            stats,
            queued,
            cfg,
            vocab_size,
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Tokens the KV cache holds in all.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.cfg.num_blocks * BLOCK_SIZE
    }

    /// The most tokens, prompt and generated together, one request can hold: the context, or
    /// what the KV cache holds if that is less.
    pub fn max_model_len(&self) -> usize {
        self.cfg.ctx_len.min(self.kv_capacity_tokens())
    }

    /// Checks `req` and queues it; its events go to its sink. A request whose `max_tokens` does
    /// not fit beside its prompt runs until the context is full (the server refuses such
    /// requests before they get here, as OpenAI's API does).
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        self.submit_all(vec![req])
    }

    /// Checks every request, then queues them all or none: the choices of one client request.
    /// The queue limit counts the group as one arrival.
    pub fn submit_all(&self, reqs: Vec<Request>) -> Result<(), SubmitError> {
        for req in &reqs {
            self.check(req)?;
        }
        let waiting = self.queued.load(Ordering::Relaxed);
        if waiting >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        for req in reqs {
            self.queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(Msg::Submit(Box::new(req))).is_err() {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(SubmitError::Stopped);
            }
        }
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), SubmitError> {
        let n = req.prompt.len();
        if n == 0 {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        let ctx = self.max_model_len();
        if n > ctx {
            return Err(SubmitError::PromptTooLong { prompt: n, ctx });
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(SubmitError::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        req.params.validate().map_err(SubmitError::Invalid)
    }

    /// Cancels every request (each hears `Done` with `Cancelled`) and stops the engine thread;
    /// later submissions fail with [`SubmitError::Stopped`].
    pub fn abort(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Abort);
        }
    }
}

impl Drop for EngineHandle {
    /// Lets the engine finish its requests, then joins it.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sequence in the engine.
struct Seq {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose K/V is in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Hashes of the leading full blocks that are registered (or were found) in the pool.
    hashes: Vec<BlockHash>,
    cached_tokens: usize,
    admitted_once: bool,
    sampler: Sampler,
    max_tokens: usize,
    ignore_eos: bool,
    logprobs: Option<usize>,
    detok: Option<IncrementalDecoder>,
    stop: StopText,
    sink: Box<dyn Sink>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn finish(&self, reason: FinishReason, text: String) -> Event {
        Event::Done(Finish {
            reason,
            text,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_tokens: self.cached_tokens,
        })
    }

    /// Everything held back, for the final event.
    fn flush(&mut self) -> String {
        let tail = self.detok.as_mut().map(|d| d.finish()).unwrap_or_default();
        let (mut text, stopped) = self.stop.push(&tail);
        if !stopped {
            text.push_str(&self.stop.flush());
        }
        text
    }
}

struct Core {
    model: Box<dyn Model>,
    kv: KvCache,
    pool: BlockPool,
    tokenizer: Option<Arc<Tokenizer>>,
    eog: Vec<u32>,
    cfg: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: Arc<EngineStats>,
    queued: Arc<AtomicUsize>,
}

impl Core {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut open = true;
        loop {
            if self.idle() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(m) => {
                        if !self.handle(m) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => {
                        if !self.handle(m) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            if !self.idle() {
                self.step();
            }
            self.publish();
        }
    }

    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Takes one message; `false` to exit.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Submit(req) => {
                let seq = self.new_seq(*req);
                self.waiting.push_back(seq);
                true
            }
            Msg::Abort => {
                let all: Vec<Seq> = self
                    .running
                    .drain(..)
                    .chain(self.waiting.drain(..))
                    .collect();
                for mut s in all {
                    let ev = s.finish(FinishReason::Cancelled, String::new());
                    s.sink.send(ev);
                    self.release(&mut s);
                }
                self.queued.store(0, Ordering::Relaxed);
                self.publish();
                false
            }
        }
    }

    fn new_seq(&self, req: Request) -> Seq {
        Seq {
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            admitted_once: false,
            sampler: Sampler::new(req.params),
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            detok: self
                .tokenizer
                .as_ref()
                .map(|t| IncrementalDecoder::new(t.clone(), false)),
            stop: StopText::new(req.stop),
            sink: req.sink,
        }
    }

    /// Gives a sequence's blocks back; it has computed nothing afterwards.
    fn release(&mut self, s: &mut Seq) {
        for b in s.blocks.drain(..) {
            self.pool.free(b);
        }
        s.hashes.clear();
        s.computed = 0;
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_closed() {
                let mut s = self.running.remove(i);
                self.release(&mut s);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        let mut kept = VecDeque::with_capacity(before);
        while let Some(mut s) = self.waiting.pop_front() {
            if s.sink.is_closed() {
                self.release(&mut s);
                if !s.admitted_once {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                }
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
    }

    fn publish(&self) {
        let st = &self.stats;
        st.waiting
            .store(self.queued.load(Ordering::Relaxed), Ordering::Relaxed);
        st.running.store(self.running.len(), Ordering::Relaxed);
        st.blocks_in_use
            .store(self.pool.num_in_use(), Ordering::Relaxed);
        st.blocks_cached
            .store(self.pool.num_cached(), Ordering::Relaxed);
    }

    /// Makes `s` hold blocks for its first `upto` tokens; `false` if the pool ran dry (the
    /// blocks taken so far stay with the sequence).
    fn grow(pool: &mut BlockPool, s: &mut Seq, upto: usize) -> bool {
        while s.blocks.len() * BLOCK_SIZE < upto {
            match pool.allocate() {
                Some(b) => s.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Takes the registered blocks matching the start of `s`'s tokens. The last token is always
    /// left to compute, so that the step yields its logits.
    fn match_prefix(&mut self, s: &mut Seq) {
        let max_blocks = (s.tokens.len() - 1) / BLOCK_SIZE;
        let mut parent = 0;
        for i in 0..max_blocks {
            let h = block_hash(parent, &s.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
            match self.pool.lookup(h) {
                Some(b) => {
                    s.blocks.push(b);
                    s.hashes.push(h);
                    parent = h;
                }
                None => break,
            }
        }
        s.computed = s.blocks.len() * BLOCK_SIZE;
    }

    /// Sends `s` back to the front of the queue, without its blocks.
    fn preempt(&mut self, mut s: Seq) {
        self.release(&mut s);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(s);
    }

    fn step(&mut self) {
        let mut budget = self.cfg.max_num_batched_tokens;
        // (index into `running`, tokens to compute this step)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut finished_now: Vec<usize> = Vec::new();

        // Running sequences first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &mut self.running[i];
            let take = (s.tokens.len() - s.computed).min(budget);
            let upto = s.computed + take;
            if Self::grow(&mut self.pool, s, upto) {
                plan.push((i, take));
                budget -= take;
                i += 1;
                continue;
            }
            if self.running.len() > i + 1 {
                let victim = self.running.pop().expect("non-empty");
                self.preempt(victim);
            } else if i > 0 {
                let s = self.running.pop().expect("non-empty");
                self.preempt(s);
                break;
            } else {
                // Alone and the cache is full: it cannot grow any further.
                finished_now.push(i);
                i += 1;
            }
        }

        // Then admit waiting sequences.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && finished_now.is_empty() {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if s.blocks.is_empty() {
                self.match_prefix(&mut s);
            }
            let take = (s.tokens.len() - s.computed).min(budget);
            let upto = s.computed + take;
            if !Self::grow(&mut self.pool, &mut s, upto) {
                self.release(&mut s);
                if self.running.is_empty() {
                    // Even the whole cache cannot hold it: it is as long as it can get.
                    let text = s.flush();
                    let ev = s.finish(FinishReason::Length, text);
                    s.sink.send(ev);
                    if !s.admitted_once {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                    }
                    continue;
                }
                self.waiting.push_front(s);
                break;
            }
            if !s.admitted_once {
                s.admitted_once = true;
                s.cached_tokens = s.computed.min(s.prompt_len);
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats
                    .prefix_hit_tokens
                    .fetch_add(s.cached_tokens as u64, Ordering::Relaxed);
            }
            plan.push((self.running.len(), take));
            self.running.push(s);
            budget -= take;
        }

        // The flat batch.
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut seq_of = Vec::new();
        let mut logits_for = Vec::new();
        let mut sampled = Vec::new();
        for (k, &(i, take)) in plan.iter().enumerate() {
            let s = &self.running[i];
            for p in s.computed..s.computed + take {
                tokens.push(s.tokens[p]);
                positions.push(p);
                seq_of.push(k);
            }
            if s.computed + take == s.tokens.len() {
                logits_for.push(tokens.len() - 1);
                sampled.push(i);
            }
        }
        let mut errors: Option<String> = None;
        let mut logits = Vec::new();
        if !tokens.is_empty() {
            let tables: Vec<&[u32]> = plan
                .iter()
                .map(|&(i, _)| self.running[i].blocks.as_slice())
                .collect();
            let batch = Batch {
                tokens: &tokens,
                positions: &positions,
                seq_of: &seq_of,
                block_tables: &tables,
                logits_for: &logits_for,
            };
            let (model, kv) = (&self.model, &mut self.kv);
            match catch_unwind(AssertUnwindSafe(|| model.forward(&batch, kv))) {
                Ok(Ok(l)) => logits = l,
                Ok(Err(e)) => errors = Some(format!("the forward pass failed: {e}")),
                Err(_) => errors = Some("the forward pass panicked".into()),
            }
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);

        let mut done: Vec<(usize, Event)> = Vec::new();
        if let Some(msg) = errors {
            for &(i, _) in &plan {
                done.push((i, Event::Error(msg.clone())));
            }
        } else {
            let vocab = self.model.config().vocab_size;
            let prefill: usize = plan
                .iter()
                .filter(|&&(i, _)| self.running[i].computed < self.running[i].prompt_len)
                .map(|&(i, take)| take.min(self.running[i].prompt_len - self.running[i].computed))
                .sum();
            self.stats
                .prompt_tokens_computed
                .fetch_add(prefill as u64, Ordering::Relaxed);
            for &(i, take) in &plan {
                let s = &mut self.running[i];
                s.computed += take;
                // Register the blocks that became full.
                let full = s.computed / BLOCK_SIZE;
                while s.hashes.len() < full {
                    let b = s.hashes.len();
                    let parent = s.hashes.last().copied().unwrap_or(0);
                    let h = block_hash(parent, &s.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]);
                    self.pool.register(s.blocks[b], h);
                    s.hashes.push(h);
                }
            }
            for (r, &i) in sampled.iter().enumerate() {
                let row = &logits[r * vocab..(r + 1) * vocab];
                if let Some(ev) = self.sample(i, row) {
                    done.push((i, ev));
                }
            }
        }
        for &i in &finished_now {
            let s = &mut self.running[i];
            let text = s.flush();
            let ev = s.finish(FinishReason::Length, text);
            done.push((i, ev));
        }

        // Finish in descending index order so the indices stay valid.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        done.dedup_by_key(|d| d.0);
        for (i, ev) in done {
            let mut s = self.running.remove(i);
            s.sink.send(ev);
            self.release(&mut s);
        }
    }

    /// Samples the next token of running sequence `i`; the final event if it is done.
    fn sample(&mut self, i: usize, row: &[f32]) -> Option<Event> {
        let ctx = self.cfg.ctx_len;
        let s = &mut self.running[i];
        let tok = s.sampler.sample(row, &s.tokens);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if !s.ignore_eos && self.eog.contains(&tok) {
            let text = s.flush();
            return Some(s.finish(FinishReason::Stop, text));
        }
        let logprobs = s.logprobs.map(|k| token_logprobs(row, tok, k));
        s.tokens.push(tok);
        let delta = s.detok.as_mut().map(|d| d.push(tok)).unwrap_or_default();
        let (text, stopped) = s.stop.push(&delta);
        let alive = s.sink.send(Event::Token(TokenEvent {
            id: tok,
            text,
            logprobs,
        }));
        if !alive {
            return Some(s.finish(FinishReason::Cancelled, String::new()));
        }
        if stopped {
            return Some(s.finish(FinishReason::Stop, String::new()));
        }
        // The next token would sit at position `len - 1`, which must lie inside the context.
        if s.generated() >= s.max_tokens || s.tokens.len() > ctx {
            let text = s.flush();
            return Some(s.finish(FinishReason::Length, text));
        }
        None
    }
}

/// The log-probability of `chosen` and the `top` most likely tokens, from raw logits.
pub fn token_logprobs(row: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = row
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| ((x - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| {
        if x.is_finite() {
            (x as f64 - lse) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    // A small sorted list of the best `top`; ties keep the lower id first.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &x) in row.iter().enumerate() {
            let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
            if best.len() == top && x <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (id as u32, x));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: lp(row[chosen as usize]),
        top: best.into_iter().map(|(id, x)| (id, lp(x))).collect(),
    }
}

/// Holds back generated text that might be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    pending: String,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> StopText {
        StopText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text; returns the text now safe to emit, and whether a stop string was
    /// found (the text before it is returned; the rest is dropped).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let bytes = self.pending.as_bytes();
        let hold = self
            .stops
            .iter()
            .filter_map(|s| {
                (1..s.len().min(bytes.len() + 1))
                    .rev()
                    .find(|&m| bytes.ends_with(&s.as_bytes()[..m]))
            })
            .max()
            .unwrap_or(0);
        // A held suffix equals the start of a stop string, so it starts on a character boundary.
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Everything still held.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_text_holds_back_possible_starts() {
        let mut st = StopText::new(vec!["END".into()]);
        assert_eq!(st.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(st.push("N"), (String::new(), false));
        assert_eq!(st.push("X"), ("ENX".to_string(), false));
        assert_eq!(st.push("a END b"), ("a ".to_string(), true));
    }

    #[test]
    fn stop_text_finds_the_earliest_stop_and_flushes() {
        let mut st = StopText::new(vec!["bb".into(), "a".into()]);
        assert_eq!(st.push("xbbya"), ("x".to_string(), true));
        let mut st = StopText::new(vec!["\n\n".into()]);
        assert_eq!(st.push("é\n"), ("é".to_string(), false));
        assert_eq!(st.flush(), "\n");
        let mut none = StopText::new(vec![String::new()]);
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let row = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let lp = token_logprobs(&row, 2, 2);
        let lse = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln();
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, 1);
        assert_eq!(lp.top[1].0, 2);
        assert!(token_logprobs(&row, 3, 0).logprob.is_infinite());
    }
}
