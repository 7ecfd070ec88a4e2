//! The engine: continuous batching over a paged KV cache, with prefix reuse.
//!
//! One engine is three parts, each in its own module:
//!
//! - [`scheduler`]: owns the [`block_pool`] and the queues, and returns a plain-data
//!   [`Plan`] for each step (which requests run, how many tokens each computes, their block
//!   tables, which rows are sampled, who was admitted or preempted);
//! - [`runner`]: turns the plan into the model's flat batch and runs the forward pass;
//! - [`output`]: sampling, log-probabilities, detokenising, stop strings and events.
//!
//! [`Engine`] ties them together and is driven synchronously (`add_request`, `step`): the
//! CLI's `run` and `logits` use it through [`crate::session::Session`]. [`EngineHandle`]
//! runs the same engine on its own thread for the server, taking requests over a channel.
//! Every request has a [`RequestId`]; its events go to its [`Sink`].
//!
//! **Hybrid models** (linear attention beside attention): each running request also holds a
//! recurrent state slot ([`EngineConfig::state_slots`]); preemption recomputes such a request
//! from its first token, and there is no prefix caching for them.
//!
//! **Batch invariance**: the kernels reduce in an order that depends neither on the batch size
//! nor on a token's place in the batch, and a chunked prefill computes the same K/V as one pass,
//! so a request's logits, and hence its greedy tokens, are the same alone and under load, and
//! the same from `run` as from `serve`.
//!
//! **Speculative decoding** (with [`EngineConfig::speculative`]): before each step the
//! configured [`Proposer`] drafts tokens for the requests that decode next; the plan computes
//! them after the request's last token in the same flat batch as everyone else, output
//! processing samples the rows in order and keeps the drafts up to the first one the sampler
//! did not draw, plus the token it drew there; the scheduler then takes back the rejected
//! drafts' slots, and a model with linear attention puts its recurrent state back to the end of
//! the accepted drafts ([`supernode_models::Model::rollback_drafts`]). See [`crate::spec`] for why this keeps the target's distribution exactly.
//! A request that ends, however it ends, is released from the proposer too (a draft model's
//! cache of it is dropped).

pub mod block_pool;
pub mod connector;
mod output;
mod runner;
pub mod scheduler;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use supernode_models::{KvCache, KvLayerSpec, KvRegion, Model};

pub use self::block_pool::BLOCK_SIZE;
use self::connector::{KvOp, Leases};
pub use self::output::{token_logprobs, StopText};
use self::output::{Output, OutputSpec};
use self::runner::Runner;
use self::scheduler::{NewRequest, Scheduler, SchedulerConfig};
pub use self::scheduler::{Plan, RequestId};
use crate::constraint::Constraint;
use crate::error::EngineError;
use crate::sampler::SamplingParams;
use crate::spec::{Adaptive, Proposer, SpecConfig, SpecMethod, StepCosts};
use crate::tokenizer::Tokenizer;

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
    /// Keys every prefix-cache hash of this deployment, so that caches (and the block hashes
    /// a router sees) of different deployments never match; empty for none.
    pub prefix_cache_salt: String,
    /// Speculative decoding, if on.
    pub speculative: Option<SpecConfig>,
    /// Recurrent state slots of a model with linear attention (Qwen3.5, Qwen3-Next), one per
    /// running request: at most this many run at once; 0 for `max_num_seqs`. Unused by other
    /// models. Such a model has no prefix caching (see [`scheduler`]).
    pub state_slots: usize,
}

impl EngineConfig {
    /// Blocks that fit in `kv_bytes` for a model with these KV layer specs.
    pub fn blocks_for_budget(specs: &[KvLayerSpec], kv_bytes: usize) -> usize {
        let per_block = KvCache::bytes_per_token(specs) * BLOCK_SIZE;
        kv_bytes / per_block.max(1)
    }

    /// `(blocks, state slots)` that fit together in `kv_bytes` for a model with these KV layer
    /// specs and recurrent state widths ([`Model::state_widths`]). A model without recurrent
    /// state gets every byte as blocks and no slots. One with it gets `max_num_seqs` slots, but
    /// at most as many as half the budget holds (at least one if one fits), and the rest as
    /// blocks; its attention layers' blocks are then all that grows with the context.
    pub fn budget(
        specs: &[KvLayerSpec],
        widths: &[usize],
        kv_bytes: usize,
        max_num_seqs: usize,
    ) -> (usize, usize) {
        let slot = KvCache::bytes_per_state_slot(widths);
        if slot == 0 {
            return (Self::blocks_for_budget(specs, kv_bytes), 0);
        }
        let slots = max_num_seqs.min((kv_bytes / 2 / slot).max(usize::from(kv_bytes >= slot)));
        (
            Self::blocks_for_budget(specs, kv_bytes - slots * slot),
            slots,
        )
    }
}

/// One generation request.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Output tokens at most (the context may end it sooner); 0 computes the prompt only.
    pub max_tokens: usize,
    /// Generation stops before the first occurrence of any of these texts.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Output tokens before which end-of-generation tokens cannot be drawn and stop strings do
    /// not end the output (vLLM's `min_tokens`); 0 for none.
    pub min_tokens: usize,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Keeps this request's prefix-cache entries apart from those of other salts (vLLM's
    /// `cache_salt`: tenants that must not share cached prompts use different salts).
    pub cache_salt: Option<String>,
    /// Send the logits of every prompt position ([`Event::PromptLogits`]) before any token.
    pub prompt_logits: bool,
    /// Send the log-probability of every prompt token after the first, with this many most
    /// likely alternatives ([`Event::PromptLogprobs`]; `echo` with `logprobs` in the API).
    pub prompt_logprobs: Option<usize>,
    /// Added to the logits before sampling (OpenAI's `logit_bias`): `(token id, bias)`.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow (structured output, forced tool calls), if any.
    pub constraint: Option<Constraint>,
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

/// What a request hears from the engine: prompt logits if it asked, tokens, then exactly one
/// `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    PromptLogits(PromptLogits),
    PromptLogprobs(PromptLogprobs),
    Token(TokenEvent),
    Done(Finish),
    Error(String),
}

/// Logits of consecutive prompt positions.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogits {
    /// The position of the first row.
    pub start: usize,
    /// Rows of the vocabulary's size, one per position from `start` on.
    pub logits: Vec<f32>,
}

/// Log-probabilities of consecutive prompt tokens, each under the model's distribution after
/// the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprobs {
    /// The position of the first token scored (at least 1: the first token has no context).
    pub start: usize,
    pub logprobs: Vec<TokenLogprobs>,
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

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (not included in the output) or a stop string.
    Stop,
    /// The token limit or the end of the context.
    Length,
    /// The client went away or asked to stop.
    Cancelled,
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
    /// The stop string that ended generation, if one did.
    pub stop_string: Option<String>,
    /// Draft tokens verified for this request and accepted, when the engine speculates.
    pub spec: Option<SpecUsage>,
}

/// What speculation did for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecUsage {
    /// Draft tokens the target verified.
    pub draft_tokens: usize,
    /// Of those, the ones kept.
    pub accepted_tokens: usize,
}

/// Live figures for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub blocks_in_use: AtomicUsize,
    pub blocks_total: AtomicUsize,
    pub blocks_cached: AtomicUsize,
    /// Prompt tokens looked up in the prefix cache on first admission (vLLM's
    /// `prefix_cache_queries`); `prefix_hit_tokens` of them were found.
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Prefix-cache hits refused because the block's tokens differed (a hash collision).
    pub prefix_refused_hits: AtomicU64,
    pub prompt_tokens_computed: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// The proposer's name, when the engine speculates.
    pub spec_proposer: std::sync::OnceLock<&'static str>,
    /// Verifications of at least one draft token (vLLM's `num_drafts`).
    pub spec_drafts: AtomicU64,
    /// Draft tokens verified.
    pub spec_draft_tokens: AtomicU64,
    /// Draft tokens accepted.
    pub spec_accepted_tokens: AtomicU64,
    /// Blocks pinned for a peer to read (the KV connector's exports).
    pub kv_exported_blocks: AtomicU64,
    /// Blocks written by a peer and committed to the prefix cache (the KV connector's imports).
    pub kv_imported_blocks: AtomicU64,
    /// The KV connector's leases held now.
    pub kv_leases: AtomicUsize,
    /// Bytes of the proposer's own caches now (a draft model's, an MTP layer's).
    pub spec_cache_bytes: AtomicUsize,
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

/// The checks every request passes before it is queued.
fn check(req: &Request, max_model_len: usize, vocab_size: usize) -> Result<(), SubmitError> {
    let n = req.prompt.len();
    if n == 0 {
        return Err(SubmitError::Invalid("the prompt is empty".into()));
    }
    if n > max_model_len {
        return Err(SubmitError::PromptTooLong {
            prompt: n,
            ctx: max_model_len,
        });
    }
    if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(SubmitError::Invalid(format!(
            "token id {t} is outside the vocabulary of {vocab_size}"
        )));
    }
    if let Some(&(t, _)) = req
        .logit_bias
        .iter()
        .find(|&&(t, _)| t as usize >= vocab_size)
    {
        return Err(SubmitError::Invalid(format!(
            "logit_bias: token id {t} is outside the vocabulary of {vocab_size}"
        )));
    }
    if let Some(c) = req
        .constraint
        .as_ref()
        .filter(|c| c.vocab_size() != vocab_size)
    {
        return Err(SubmitError::Invalid(format!(
            "the grammar was built for a vocabulary of {} ids, the model has {vocab_size}",
            c.vocab_size()
        )));
    }
    req.params.validate().map_err(SubmitError::Invalid)
}

/// A model, its KV cache, the scheduler and every request's output state, stepped by the
/// caller.
pub struct Engine {
    runner: Runner,
    sched: Scheduler,
    outputs: HashMap<RequestId, Output>,
    tokenizer: Option<Arc<Tokenizer>>,
    eog: Vec<u32>,
    cfg: EngineConfig,
    vocab_size: usize,
    stats: Arc<EngineStats>,
    /// Requests submitted and not yet admitted (shared with an [`EngineHandle`], which counts
    /// them in as it sends them).
    queued: Arc<AtomicUsize>,
    spec: Option<Speculator>,
    /// Where the prefix cache's block events go after each step, once someone asks for them.
    block_events: Option<BlockEventSink>,
    /// Blocks the KV connector holds for transfers.
    leases: Leases,
}

/// Receives the prefix cache's [`block_pool::BlockEvent`]s in order, a batch after each engine step.
pub type BlockEventSink = Box<dyn FnMut(Vec<block_pool::BlockEvent>) + Send>;

/// The engine's speculation: its configuration, its proposer and a scratch of drafts.
struct Speculator {
    cfg: SpecConfig,
    proposer: Box<dyn Proposer>,
    /// Drafts of this step, back to back.
    buf: Vec<u32>,
    /// Whose drafts are where in `buf`.
    proposals: Vec<(RequestId, std::ops::Range<usize>)>,
    /// What steps and drafts cost, to draft only what pays.
    costs: StepCosts,
}

impl Speculator {
    fn new(
        cfg: SpecConfig,
        stats: &EngineStats,
        target: &Arc<dyn Model>,
    ) -> Result<Speculator, EngineError> {
        let proposer = cfg.proposer(target)?;
        Ok(Speculator::with(cfg, proposer, stats))
    }

    fn with(cfg: SpecConfig, proposer: Box<dyn Proposer>, stats: &EngineStats) -> Speculator {
        // Set once: an engine's stats name one proposer.
        let _ = stats.spec_proposer.set(proposer.name());
        Speculator {
            cfg,
            proposer,
            buf: Vec::new(),
            proposals: Vec::new(),
            costs: StepCosts::default(),
        }
    }
}

/// The checks of speculation with `spec` on `model`: a draft model with the model's
/// vocabulary (MTP's checks are its proposer's).
fn check_speculation(model: &dyn Model, spec: &SpecConfig) -> Result<(), EngineError> {
    if let SpecMethod::Draft(d) = &spec.method {
        d.check_vocab_size(model.config().vocab_size)?;
    }
    Ok(())
}

impl Engine {
    /// An engine over `model` with a KV cache of `cfg.num_blocks` blocks.
    pub fn new(
        model: Box<dyn Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
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
        // A model with linear attention: one recurrent state slot per running request.
        let widths = model.state_widths();
        let state_slots = match (widths.iter().any(|&w| w > 0), cfg.state_slots) {
            (false, _) => 0,
            (true, 0) => cfg.max_num_seqs,
            (true, n) => n,
        };
        let kv = KvCache::new(&model.kv_specs(), BLOCK_SIZE, cfg.num_blocks)?
            .with_state_slots(&widths, state_slots)?;
        let stats = Arc::new(EngineStats::default());
        stats.blocks_total.store(cfg.num_blocks, Ordering::Relaxed);
        let eog = tokenizer
            .as_ref()
            .map(|t| t.eog_ids().to_vec())
            .unwrap_or_default();
        let vocab_size = model.config().vocab_size;
        if let Some(spec) = &cfg.speculative {
            check_speculation(model.as_ref(), spec)?;
        }
        let runner = Runner::new(model, kv);
        let spec = cfg
            .speculative
            .clone()
            .map(|c| Speculator::new(c, &stats, &runner.model))
            .transpose()?;
        let sched = Scheduler::new(SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            num_blocks: cfg.num_blocks,
            prefix_caching: cfg.prefix_caching,
            salt: cfg.prefix_cache_salt.clone(),
            state_slots,
        });
        Ok(Engine {
            runner,
            sched,
            outputs: HashMap::new(),
            tokenizer,
            eog,
            cfg,
            vocab_size,
            stats,
            queued: Arc::new(AtomicUsize::new(0)),
            spec,
            block_events: None,
            leases: Leases::default(),
        })
    }

    /// Turns speculative decoding on (with this configuration) or off, for requests added from
    /// now on.
    pub fn set_speculative(&mut self, spec: Option<SpecConfig>) -> Result<(), EngineError> {
        if let Some(spec) = &spec {
            check_speculation(self.runner.model.as_ref(), spec)?;
        }
        self.spec = spec
            .clone()
            .map(|c| Speculator::new(c, &self.stats, &self.runner.model))
            .transpose()?;
        self.cfg.speculative = spec;
        Ok(())
    }

    /// Speculates with a proposer of the caller's (the seam for proposers this crate does not
    /// build), under `cfg`'s k, adaptivity and batch limit; `cfg.method` is not used.
    pub fn set_proposer(
        &mut self,
        cfg: SpecConfig,
        proposer: Box<dyn Proposer>,
    ) -> Result<(), EngineError> {
        cfg.validate()?;
        self.spec = Some(Speculator::with(cfg.clone(), proposer, &self.stats));
        self.cfg.speculative = Some(cfg);
        Ok(())
    }

    pub fn model(&self) -> &dyn Model {
        self.runner.model.as_ref()
    }

    pub fn tokenizer(&self) -> Option<&Arc<Tokenizer>> {
        self.tokenizer.as_ref()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// The most tokens, prompt and generated together, one request can hold: the context, or
    /// what the KV cache holds if that is less.
    pub fn max_model_len(&self) -> usize {
        self.cfg.ctx_len.min(self.cfg.num_blocks * BLOCK_SIZE)
    }

    /// Changes the tokens computed per step from the next step on (a prefill chunk's length).
    pub fn set_token_budget(&mut self, tokens: usize) {
        self.cfg.max_num_batched_tokens = tokens.max(1);
        self.sched.set_token_budget(tokens);
    }

    /// Checks `req` and queues it; its events go to its sink.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId, SubmitError> {
        check(&req, self.max_model_len(), self.vocab_size)?;
        let id = RequestId::fresh();
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.enqueue(id, req);
        Ok(id)
    }

    /// Queues a checked request, counted in `queued` already.
    fn enqueue(&mut self, id: RequestId, req: Request) {
        let out = Output::new(
            OutputSpec {
                params: req.params,
                max_tokens: req.max_tokens,
                stop: req.stop,
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens,
                logprobs: req.logprobs,
                prompt_logits: req.prompt_logits,
                prompt_logprobs: req.prompt_logprobs,
                sink: req.sink,
                prompt_len: req.prompt.len(),
                logit_bias: req.logit_bias,
                constraint: req.constraint,
            },
            self.tokenizer.as_ref(),
        );
        let mut out = out;
        out.spec = self
            .spec
            .as_ref()
            .map(|sp| Adaptive::new(sp.proposer.first_k(sp.cfg.num_speculative_tokens)));
        self.outputs.insert(id, out);
        self.sched.add(NewRequest {
            id,
            prompt: req.prompt,
            cache_salt: req.cache_salt,
            prompt_logits: req.prompt_logits || req.prompt_logprobs.is_some(),
        });
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.sched.is_idle()
    }

    /// Ends request `id` with `Cancelled`; its blocks go back to the pool.
    pub fn cancel(&mut self, id: RequestId) {
        if let Some(mut out) = self.outputs.remove(&id) {
            let ev = out.finish(FinishReason::Cancelled, String::new());
            out.send(ev);
        }
        if self.forget(id) == Some(false) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        self.publish();
    }

    /// Takes request `id` out of the scheduler (its blocks go back to the pool) and out of the
    /// proposer (its draft cache, if any); what [`Scheduler::remove`] says.
    fn forget(&mut self, id: RequestId) -> Option<bool> {
        if let Some(sp) = self.spec.as_mut() {
            sp.proposer.release(id);
        }
        self.sched.remove(id)
    }

    /// Cancels every request.
    pub fn abort_all(&mut self) {
        for id in self.sched.ids() {
            self.cancel(id);
        }
        self.queued.store(0, Ordering::Relaxed);
        self.publish();
    }

    /// Drops requests whose client went away, then runs one step: schedule, forward, output.
    pub fn step(&mut self) {
        self.drop_cancelled();
        if self.sched.is_idle() {
            self.publish();
            return;
        }
        self.propose();
        let plan = self.sched.schedule();
        self.admit(&plan);
        let hidden = self
            .spec
            .as_ref()
            .is_some_and(|s| s.proposer.wants_hidden());
        let t0 = Instant::now();
        let result = self.runner.run(&plan, hidden);
        if let Some(sp) = self.spec.as_mut() {
            let rows = plan.scheduled.iter().map(|sc| sc.tokens.len()).sum();
            sp.costs.record_step(rows, t0.elapsed().as_secs_f64());
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        match result {
            Err(msg) => {
                for sc in &plan.scheduled {
                    self.forget(sc.id);
                    if let Some(mut out) = self.outputs.remove(&sc.id) {
                        out.send(Event::Error(msg.clone()));
                    }
                }
            }
            Ok(logits) => {
                let prefill: usize = plan
                    .scheduled
                    .iter()
                    .map(|sc| {
                        let prompt_len = self.outputs.get(&sc.id).map_or(0, Output::prompt_len);
                        prompt_len
                            .min(sc.start + sc.tokens.len())
                            .saturating_sub(sc.start)
                    })
                    .sum();
                self.stats
                    .prompt_tokens_computed
                    .fetch_add(prefill as u64, Ordering::Relaxed);
                self.sched.update(&plan);
                let mut done = Vec::new();
                let width = self.runner.model.config().hidden;
                // The target's hidden states of request `k`'s first `kept` tokens, for a
                // proposer that reads them.
                let observe = |spec: &mut Option<Speculator>, k: usize, kept: usize| {
                    if let Some(sp) = spec.as_mut().filter(|_| !logits.hidden.is_empty()) {
                        let (sc, r) = (&plan.scheduled[k], &logits.tokens[k]);
                        let rows = &logits.hidden[r.start * width..(r.start + kept) * width];
                        sp.proposer.observe(sc.id, sc.start, rows);
                    }
                };
                for (k, (sc, rows)) in plan.scheduled.iter().zip(&logits.rows).enumerate() {
                    let Some(out) = self.outputs.get_mut(&sc.id) else {
                        continue;
                    };
                    let n = sc.prompt_rows.len();
                    if n > 0 {
                        let first = sc.start + sc.prompt_rows.start;
                        let rows = (rows.start..rows.start + n).map(|r| logits.row(r));
                        let prompt = self.sched.tokens(sc.id).unwrap_or(&[]);
                        if !out.prompt_rows(first, rows, prompt) {
                            let ev = out.finish(FinishReason::Cancelled, String::new());
                            out.send(ev);
                            done.push(sc.id);
                            continue;
                        }
                    }
                    if !sc.sample {
                        observe(&mut self.spec, k, sc.tokens.len());
                        continue;
                    }
                    // The last `drafts + 1` rows: the row after the request's last token, then
                    // one after each draft. Row `i` is valid only if drafts `..i` were accepted.
                    let nd = sc.drafts;
                    let drafts = &sc.tokens[sc.tokens.len() - nd..];
                    let first_row = rows.end - 1 - nd;
                    let mut accepted = 0;
                    let mut finished = None;
                    for (i, r) in (first_row..rows.end).enumerate() {
                        let history = self.sched.tokens(sc.id).unwrap_or(&[]);
                        let sampled =
                            out.sample(logits.row(r), history, self.cfg.ctx_len, &self.eog);
                        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = sampled.token {
                            self.sched.append(sc.id, t);
                        }
                        let hit = i < nd && sampled.token == Some(drafts[i]);
                        accepted += usize::from(hit);
                        if sampled.done.is_some() {
                            finished = sampled.done;
                            break;
                        }
                        if !hit {
                            break;
                        }
                    }
                    if nd > 0 {
                        self.stats.spec_drafts.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .spec_draft_tokens
                            .fetch_add(nd as u64, Ordering::Relaxed);
                        self.stats
                            .spec_accepted_tokens
                            .fetch_add(accepted as u64, Ordering::Relaxed);
                        if let (Some(a), Some(sp)) = (out.spec.as_mut(), &self.spec) {
                            a.record(&sp.cfg, nd, accepted);
                        }
                    }
                    match finished {
                        Some(mut ev) => {
                            observe(&mut self.spec, k, sc.tokens.len() - nd + accepted);
                            // The usage in the final event counts this step's drafts too.
                            if let (Event::Done(f), Some(a)) = (&mut ev, &out.spec) {
                                f.spec = Some(SpecUsage {
                                    draft_tokens: a.drafted,
                                    accepted_tokens: a.accepted,
                                });
                            }
                            out.send(ev);
                            done.push(sc.id);
                        }
                        None if nd > 0 => {
                            observe(&mut self.spec, k, sc.tokens.len() - nd + accepted);
                            // A recurrent state took every draft in: back to the accepted.
                            if let Some(slot) = sc.state_slot.filter(|_| accepted < nd) {
                                if let Err(msg) = self.runner.rollback_drafts(slot, accepted) {
                                    out.send(Event::Error(msg));
                                    done.push(sc.id);
                                    continue;
                                }
                            }
                            self.sched.accept_drafts(sc.id, accepted)
                        }
                        None => observe(&mut self.spec, k, sc.tokens.len()),
                    }
                }
                for id in done {
                    self.forget(id);
                    self.outputs.remove(&id);
                }
            }
        }
        self.publish();
    }

    /// Asks the proposer for drafts for each request that decodes next step, as many as its
    /// adaptive k, its remaining tokens and the context allow; none while the batch is larger
    /// than `disable_by_batch_size`.
    fn propose(&mut self) {
        let Some(sp) = self.spec.as_mut() else {
            return;
        };
        if sp
            .cfg
            .disable_by_batch_size
            .is_some_and(|n| self.sched.num_running() > n)
        {
            return;
        }
        sp.buf.clear();
        sp.proposals.clear();
        // Rows of the step without drafts: one per decoding request.
        let base = self.sched.decoding().count();
        for (id, tokens) in self.sched.decoding() {
            let Some(out) = self.outputs.get_mut(&id) else {
                continue;
            };
            // Every draft accepted still leaves room for the bonus token, inside the limits.
            let room = out
                .remaining()
                .saturating_sub(1)
                .min(self.cfg.ctx_len.saturating_sub(tokens.len() + 1));
            let Some(adaptive) = out.spec.as_mut() else {
                continue;
            };
            if room == 0 {
                continue;
            }
            let k = adaptive.want(&sp.cfg).min(room);
            if k == 0 {
                continue;
            }
            // As many as pay for their rows and their making, at this request's acceptance.
            let k = match sp.cfg.adaptive {
                true => sp.costs.best_k(adaptive.token_rate(), k, base),
                false => k,
            };
            if k == 0 {
                adaptive.skip();
                continue;
            }
            let from = sp.buf.len();
            let t0 = Instant::now();
            sp.proposer.propose(id, tokens, k, &mut sp.buf);
            sp.buf.truncate(from + k);
            sp.costs
                .record_drafts(sp.buf.len() - from, t0.elapsed().as_secs_f64());
            if sp.buf.len() > from {
                sp.proposals.push((id, from..sp.buf.len()));
            }
        }
        for (id, r) in &sp.proposals {
            self.sched.set_drafts(*id, &sp.buf[r.clone()]);
        }
    }

    /// Accounts for the plan's admissions, preemptions and requests out of room.
    fn admit(&mut self, plan: &Plan) {
        for a in &plan.admitted {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            let queried = self.outputs.get(&a.id).map_or(0, Output::prompt_len);
            self.stats
                .prefix_query_tokens
                .fetch_add(queried as u64, Ordering::Relaxed);
            self.stats
                .prefix_hit_tokens
                .fetch_add(a.cached_tokens as u64, Ordering::Relaxed);
            if let Some(out) = self.outputs.get_mut(&a.id) {
                out.cached_tokens = a.cached_tokens;
            }
        }
        self.stats
            .preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        // A preempted request's proposer cache goes with its blocks (it is rebuilt on resume),
        // so that the proposer never holds more positions than the pool does.
        if let Some(sp) = self.spec.as_mut() {
            for &id in &plan.preempted {
                sp.proposer.release(id);
            }
        }
        for r in &plan.out_of_room {
            if !r.was_admitted {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
            // The scheduler has dropped it already.
            if let Some(sp) = self.spec.as_mut() {
                sp.proposer.release(r.id);
            }
            if let Some(mut out) = self.outputs.remove(&r.id) {
                let ev = out.finish_length();
                out.send(ev);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<RequestId> = self
            .outputs
            .iter()
            .filter(|(_, o)| o.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.outputs.remove(&id);
            if self.forget(id) == Some(false) {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends the prefix cache's block events to `sink` after each step from now on.
    pub fn send_block_events(&mut self, sink: BlockEventSink) {
        self.sched.pool().log_events();
        self.block_events = Some(sink);
    }

    fn publish(&mut self) {
        if let Some(sink) = &mut self.block_events {
            let events = self.sched.pool().take_events();
            if !events.is_empty() {
                sink(events);
            }
        }
        let st = &self.stats;
        st.waiting
            .store(self.queued.load(Ordering::Relaxed), Ordering::Relaxed);
        st.running
            .store(self.sched.num_running(), Ordering::Relaxed);
        let pool = self.sched.pool();
        st.blocks_in_use.store(pool.num_in_use(), Ordering::Relaxed);
        st.blocks_cached.store(pool.num_cached(), Ordering::Relaxed);
        st.prefix_refused_hits
            .store(pool.refused_hits(), Ordering::Relaxed);
        drop(pool);
        st.kv_leases.store(self.num_leases(), Ordering::Relaxed);
        st.spec_cache_bytes.store(
            self.spec.as_ref().map_or(0, |sp| sp.proposer.cache_bytes()),
            Ordering::Relaxed,
        );
    }

    /// The KV cache's buffers by address, for a transfer agent ([`connector`]).
    pub fn kv_regions(&mut self) -> Vec<KvRegion> {
        self.runner.kv_regions()
    }

    /// Whether the prefix cache is on (it is off by configuration or for models with recurrent
    /// state): the KV connector can import only where it is.
    pub fn prefix_caching(&self) -> bool {
        self.sched.pool().prefix_caching()
    }
}

enum Msg {
    Submit(RequestId, Box<Request>),
    Cancel(RequestId),
    /// Embed these inputs between two steps (see [`crate::embed`]) and hand over the result.
    Embed(Vec<Vec<u32>>, EmbedReply),
    /// Send the prefix cache's block events there from now on.
    BlockEvents(BlockEventSink),
    /// A KV connector operation, between two steps.
    Kv(KvOp),
    /// Cancel everything and exit.
    Abort,
}

/// Where the embeddings of [`EngineHandle::embed`] go: one vector per input, or the error.
pub type EmbedReply = Box<dyn FnOnce(Result<Vec<Vec<f32>>, EngineError>) + Send>;

/// The handle the server holds: an [`Engine`] on its own thread; submit requests, read
/// stats, cancel, shut down.
pub struct EngineHandle {
    tx: Option<Sender<Msg>>,
    stats: Arc<EngineStats>,
    queued: Arc<AtomicUsize>,
    cfg: EngineConfig,
    max_model_len: usize,
    vocab_size: usize,
    regions: Vec<KvRegion>,
    prefix_caching: bool,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the engine thread over `model` with a KV cache of `cfg.num_blocks` blocks.
    pub fn start(
        model: Box<dyn Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        cfg: EngineConfig,
    ) -> Result<EngineHandle, EngineError> {
        let mut engine = Engine::new(model, tokenizer, cfg.clone())?;
        // The cache's buffers do not move with the engine (they are on the heap).
        let regions = engine.kv_regions();
        let prefix_caching = engine.prefix_caching();
        let stats = engine.stats.clone();
        let queued = engine.queued.clone();
        let (max_model_len, vocab_size) = (engine.max_model_len(), engine.vocab_size);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("supernode-engine".into())
            .spawn(move || run(engine, rx))
            .map_err(|e| EngineError::Invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx: Some(tx),
            stats,
            queued,
            cfg,
            max_model_len,
            vocab_size,
            regions,
            prefix_caching,
            thread: Some(thread),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Ids in the model's logits rows (the vocabulary grammars and `logit_bias` must fit).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Tokens the KV cache holds in all.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.cfg.num_blocks * BLOCK_SIZE
    }

    /// The most tokens, prompt and generated together, one request can hold: the context, or
    /// what the KV cache holds if that is less.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Checks `req` and queues it; its events go to its sink. A request whose `max_tokens` does
    /// not fit beside its prompt runs until the context is full (the server refuses such
    /// requests before they get here, as OpenAI's API does).
    pub fn submit(&self, req: Request) -> Result<RequestId, SubmitError> {
        self.submit_all(vec![req]).map(|ids| ids[0])
    }

    /// Checks every request, then queues them all or none: the choices of one client request.
    /// The queue limit counts the group as one arrival.
    pub fn submit_all(&self, reqs: Vec<Request>) -> Result<Vec<RequestId>, SubmitError> {
        for req in &reqs {
            check(req, self.max_model_len, self.vocab_size)?;
        }
        let waiting = self.queued.load(Ordering::Relaxed);
        if waiting >= self.cfg.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        let mut ids = Vec::with_capacity(reqs.len());
        for req in reqs {
            let id = RequestId::fresh();
            self.queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(Msg::Submit(id, Box::new(req))).is_err() {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(SubmitError::Stopped);
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// Computes the embeddings of `inputs` on the engine thread, between two steps, and gives
    /// them to `reply`.
    pub fn embed(&self, inputs: Vec<Vec<u32>>, reply: EmbedReply) -> Result<(), SubmitError> {
        let tx = self.tx.as_ref().ok_or(SubmitError::Stopped)?;
        tx.send(Msg::Embed(inputs, reply))
            .map_err(|_| SubmitError::Stopped)
    }

    /// Ends request `id` (it hears `Done` with `Cancelled`); unknown or finished ids are
    /// ignored.
    pub fn cancel(&self, id: RequestId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Cancel(id));
        }
    }

    /// Sends the prefix cache's block events (full blocks stored, cached blocks evicted) to
    /// `sink`, in order, a batch after each engine step, from the next step on.
    pub fn send_block_events(&self, sink: BlockEventSink) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::BlockEvents(sink));
        }
    }

    /// The KV cache's buffers by address ([`connector`]), valid while the engine runs.
    pub fn kv_regions(&self) -> &[KvRegion] {
        &self.regions
    }

    /// Whether the prefix cache is on (where it is not, the KV connector cannot import).
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Sends `op` to the KV connector, carried out between two steps; `false` if the engine
    /// has stopped (the op's reply is then never called).
    pub fn kv(&self, op: KvOp) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Kv(op)).is_ok())
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

/// The engine thread: waits while idle, takes every message that arrived, steps.
fn run(mut engine: Engine, rx: Receiver<Msg>) {
    let mut open = true;
    // Takes one message; `false` to exit.
    let handle = |engine: &mut Engine, msg: Msg| match msg {
        Msg::Submit(id, req) => {
            engine.enqueue(id, *req);
            true
        }
        Msg::Cancel(id) => {
            engine.cancel(id);
            true
        }
        Msg::Embed(inputs, reply) => {
            let chunk = engine.cfg.max_num_batched_tokens;
            reply(
                inputs
                    .iter()
                    .map(|t| crate::embed::embed(engine.model(), t, chunk))
                    .collect(),
            );
            true
        }
        Msg::BlockEvents(sink) => {
            engine.send_block_events(sink);
            true
        }
        Msg::Kv(op) => {
            engine.kv_op(op);
            true
        }
        Msg::Abort => {
            engine.abort_all();
            false
        }
    };
    loop {
        if !engine.has_unfinished() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(m) => {
                    if !handle(&mut engine, m) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(m) => {
                    if !handle(&mut engine, m) {
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
        engine.step();
    }
}
