//! `supernode worker`: the engine as an NVIDIA Dynamo backend (cargo feature `dynamo`).
//!
//! Tokens in, tokens out. Dynamo's frontend (`python -m dynamo.frontend`) does the HTTP, the
//! chat templates, tokenising, detokenising, stop strings and the parsers; it routes to the
//! workers it finds in discovery (the file backend for local runs, Kubernetes or etcd in a
//! cluster). `dynamo-backend-common`'s `Worker` owns the lifecycle: registration, the generate
//! endpoint, cancellation monitoring, drain on SIGTERM, health. This module is the engine
//! behind it ([`DynamoEngine`]) and the model card the frontend tokenises with ([`card`]).
//!
//! Each request becomes one engine [`Request`] with a channel sink; its token events become
//! Dynamo chunks, and the terminal chunk carries the finish reason and the usage. A stopped
//! context (the client went away, or the frontend saw a stop string) cancels the request in
//! the engine, which frees its blocks, and ends the stream with `cancelled`. The engine's
//! prefix-cache blocks are announced to Dynamo's KV-aware router as they are stored and
//! evicted ([`kv_events`]).

mod card;
mod disagg;
mod kv_events;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use async_trait::async_trait;
use clap::Args;
use dynamo_backend_common::engine::GenerateContext;
use dynamo_backend_common::{
    chunk, usage, BackendError, CommonArgs, DisaggregationMode, DynamoError, EngineConfig,
    ErrorType, GuidedDecodingOptions, KvEventSource, LLMEngine, LLMEngineOutput,
    LLMEngineOutputExt, LlmRegistration, MetricsBindings, MetricsCtx, PreprocessedRequest,
    TopLogprob, WorkerConfig,
};
use futures::stream::{self, BoxStream, StreamExt};
use supernode_engine::constraint::{
    schema_of, unenforceable_reason, Constraint, ConstraintSpec, LazyGrammars,
};
use supernode_engine::engine::connector::KvOp;
use supernode_engine::engine::{
    EngineHandle, Event, FinishReason, Request, Sink, SubmitError, BLOCK_SIZE,
};
use supernode_engine::sampler::SamplingParams;
use supernode_engine::tokenizer::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use self::disagg::{Handoff, KvTransfer, LeaseGuard};
use crate::model_args::ModelArgs;
use crate::server::{start_engine, EngineArgs};
use crate::spec_args::SpecArgs;

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: SpecArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    dynamo: CommonArgs,
    /// The model name clients give (default: the short or Hub name, else the file's stem).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Decode workers: a KV transfer from a prefill worker not done within this many
    /// milliseconds is abandoned, and the prompt is computed here (same output).
    /// [default: 10000]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    kv_transfer_timeout_ms: Option<u64>,
    /// Prefill workers: how long a prompt's blocks stay pinned for a decode worker that does
    /// not say it has read them.
    /// [default: 60000]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    kv_hold_ms: Option<u64>,
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let mode = a.dynamo.disaggregation_mode;
    if mode.is_encode() {
        bail!("--disaggregation-mode encode: this worker has no multimodal encoder");
    }
    // Each role's own options, refused where they would do nothing.
    if a.kv_transfer_timeout_ms.is_some() && mode != DisaggregationMode::Decode {
        bail!("--kv-transfer-timeout-ms is for decode workers (--disaggregation-mode decode)");
    }
    if a.kv_hold_ms.is_some() && !mode.is_prefill() {
        bail!("--kv-hold-ms is for prefill workers (--disaggregation-mode prefill)");
    }
    let started = start_engine(&a.model, &a.spec, &a.engine, a.served_model_name.as_deref())?;
    let Some(tokenizer) = started.tokenizer.clone() else {
        bail!(
            "{} has no tokenizer: Dynamo's frontend needs one to tokenise prompts",
            started.path.display()
        );
    };
    let card_dir = card::write(
        &started.path,
        &started.config,
        &tokenizer,
        &started.model_id,
    )?;
    let handle = Arc::new(started.handle);
    let transfer = match mode {
        DisaggregationMode::Prefill | DisaggregationMode::Decode => {
            if !handle.prefix_caching() {
                bail!(
                    "--disaggregation-mode {mode}: prompts are handed over as prefix-cache blocks, \
                     and this worker has no prefix cache (--no-prefix-caching, or a model with \
                     recurrent state): run it as `agg`"
                );
            }
            let t = KvTransfer::new(
                handle.kv_regions(),
                Duration::from_millis(a.kv_transfer_timeout_ms.unwrap_or(10_000)),
            )?;
            eprintln!(
                "{mode} worker: {} KV cache buffers registered with NIXL (UCX)",
                handle.kv_regions().len()
            );
            Some(Arc::new(t))
        }
        _ => None,
    };
    let engine = DynamoEngine {
        handle,
        mode,
        transfer,
        hold: Duration::from_millis(a.kv_hold_ms.unwrap_or(60_000)),
        tokenizer,
        model_id: started.model_id.clone(),
        num_blocks: started.num_blocks,
        max_num_seqs: a.engine.max_num_seqs,
        max_num_batched_tokens: a.engine.max_num_batched_tokens,
        stopped: Arc::new(AtomicBool::new(false)),
        grammars: Arc::new(LazyGrammars::default()),
    };
    let d = a.dynamo;
    let config = WorkerConfig {
        namespace: d.namespace,
        component: d.component,
        endpoint: d.endpoint,
        model_name: card_dir.display().to_string(),
        served_model_name: Some(started.model_id),
        endpoint_types: d.endpoint_types,
        custom_jinja_template: d.custom_jinja_template,
        tool_call_parser: d.dyn_tool_call_parser,
        reasoning_parser: d.dyn_reasoning_parser,
        exclude_tools_when_tool_choice_none: d.exclude_tools_when_tool_choice_none,
        // KV events describe this worker's prefix cache, which is off without it.
        enable_kv_routing: !a.engine.no_prefix_caching,
        disaggregation_mode: d.disaggregation_mode,
        runtime: d.runtime,
        route_to_encoder: d.route_to_encoder,
        enable_rl: d.enable_rl,
        ..WorkerConfig::default()
    };
    let transfer = engine.transfer.clone();
    let result = dynamo_backend_common::run(Arc::new(engine), config);
    if let Some(t) = transfer {
        // Whether or not `cleanup` ran: NIXL's threads stop first. Then the process ends
        // without running the libraries' exit handlers: one of those NIXL's UCX loads (the
        // wheel's libnl-route, for InfiniBand) crashes in its destructor at exit.
        t.shutdown();
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        };
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: every thread of ours that writes anything has stopped or flushed; `_exit`
        // ends the process at once.
        unsafe { libc::_exit(code) };
    }
    result
}

/// The engine behind a Dynamo `Worker`.
struct DynamoEngine {
    handle: Arc<EngineHandle>,
    tokenizer: Arc<Tokenizer>,
    model_id: String,
    num_blocks: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    /// The vocabulary's grammars for guided decoding, built on first use.
    grammars: Arc<LazyGrammars>,
    /// Set by `cleanup`: no new requests, and the load publisher ends.
    stopped: Arc<AtomicBool>,
    /// Aggregated, prefill or decode ([`disagg`]).
    mode: DisaggregationMode,
    /// The NIXL agent of a prefill or decode worker.
    transfer: Option<Arc<KvTransfer>>,
    /// How long a prefill worker keeps a handed-off prompt's blocks pinned at most.
    hold: Duration,
}

/// A request the worker refuses; the message (about the request only) is shown to the client.
fn invalid(msg: impl Into<String>) -> DynamoError {
    let msg = msg.into();
    DynamoError::builder()
        .error_type(ErrorType::Backend(BackendError::InvalidArgument))
        .public_message(msg.clone())
        .message(msg)
        .build()
}

fn backend_error(kind: BackendError, msg: impl Into<String>) -> DynamoError {
    DynamoError::builder()
        .error_type(ErrorType::Backend(kind))
        .message(msg)
        .build()
}

/// Forwards one request's events to its stream.
struct ChannelSink(UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The output constraint Dynamo's guided-decoding options ask for (vLLM's `guided_json`,
/// `guided_regex`, `guided_choice`, `guided_grammar`, and OpenAI's `response_format`, which the
/// frontend turns into them), if any. A grammar is llguidance's Lark dialect, as in
/// `supernode serve`.
fn constraint_spec(g: &GuidedDecodingOptions) -> Result<Option<ConstraintSpec>, DynamoError> {
    if g.structural_tag.is_some() {
        return Err(invalid("structural tags are not supported by this worker"));
    }
    if g.whitespace_pattern.is_some() {
        return Err(invalid(
            "`whitespace_pattern` is not supported: JSON is written with single spaces",
        ));
    }
    let mut found = Vec::new();
    if let Some(json) = &g.json {
        let schema = schema_of(json).ok_or_else(|| {
            invalid("the guided JSON schema must be an object, or the JSON text of one")
        })?;
        found.push(ConstraintSpec::JsonSchema {
            schema,
            strict: true,
        });
    }
    if let Some(re) = &g.regex {
        found.push(ConstraintSpec::Regex(re.clone()));
    }
    if let Some(choice) = &g.choice {
        if choice.is_empty() {
            return Err(invalid("the guided choice has no options"));
        }
        found.push(ConstraintSpec::Choice(choice.clone()));
    }
    if let Some(grammar) = &g.grammar {
        found.push(ConstraintSpec::Lark(grammar.clone()));
    }
    if found.len() > 1 {
        return Err(invalid(
            "only one of guided json, regex, choice and grammar may be given",
        ));
    }
    Ok(found.pop())
}

/// The engine request for a Dynamo request, or why it cannot be served.
fn engine_request(
    r: &PreprocessedRequest,
    max_model_len: usize,
    constraint: Option<Constraint>,
    sink: ChannelSink,
) -> Result<Request, DynamoError> {
    if r.token_ids.is_empty() {
        return Err(invalid("the prompt has no tokens"));
    }
    if r.prompt_embeds.is_some() || r.multi_modal_data.is_some() {
        return Err(invalid(
            "this worker takes token prompts only (no embeddings or multimodal data)",
        ));
    }
    let s = &r.sampling_options;
    if s.n.is_some_and(|n| n > 1) || s.best_of.is_some_and(|n| n > 1) {
        return Err(invalid(
            "`n` and `best_of` above 1 are not supported by this worker",
        ));
    }
    if s.use_beam_search == Some(true) {
        return Err(invalid("beam search is not supported by this worker"));
    }
    let stop = &r.stop_conditions;
    if stop.max_thinking_tokens.is_some() {
        return Err(invalid(
            "`max_thinking_tokens` is not supported by this worker",
        ));
    }
    if r.output_options.prompt_logprobs.is_some() {
        return Err(invalid("`prompt_logprobs` is not supported by this worker"));
    }
    let hints = r.routing.as_ref();
    if hints.is_some_and(|h| h.lora_name.is_some()) {
        return Err(invalid("LoRA adapters are not supported by this worker"));
    }
    let d = SamplingParams::default();
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: match s.top_k {
            Some(k) if k > 0 => k as usize,
            _ => 0,
        },
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: s.seed.map(|v| v as u64),
        ..d
    };
    let room = max_model_len.saturating_sub(r.token_ids.len());
    Ok(Request {
        prompt: r.token_ids.to_vec(),
        params,
        max_tokens: stop.max_tokens.map_or(room, |m| m as usize),
        // Stop strings are the frontend's: it detokenises, trims and stops the stream, which
        // cancels the request here.
        stop: Vec::new(),
        ignore_eos: stop.ignore_eos.unwrap_or(false),
        // The frontend's stop strings are not held back by this: it applies them itself.
        min_tokens: stop.min_tokens.unwrap_or(0) as usize,
        logprobs: r.output_options.logprobs.map(|n| n as usize),
        // Requests with different salts share no cached prompt blocks.
        cache_salt: hints.and_then(|h| h.cache_namespace.clone()),
        prompt_logits: false,
        prompt_logprobs: None,
        logit_bias: Vec::new(),
        constraint,
        sink: Box::new(sink),
    })
}

/// What a request's stream carries between items.
struct Stream {
    rx: UnboundedReceiver<Event>,
    ctx: GenerateContext,
    handle: Arc<EngineHandle>,
    tokenizer: Arc<Tokenizer>,
    id: supernode_engine::engine::RequestId,
    prompt_tokens: u32,
    completion_tokens: u32,
    done: bool,
    /// The imported prompt blocks, held until the request has found them (decode workers).
    _import: Option<LeaseGuard>,
}

impl Stream {
    /// The next chunk: tokens, or the one terminal chunk; `None` after it.
    async fn next(&mut self) -> Option<Result<LLMEngineOutput, DynamoError>> {
        if self.done {
            return None;
        }
        loop {
            let event = tokio::select! {
                biased;
                _ = self.ctx.stopped() => {
                    self.handle.cancel(self.id);
                    self.done = true;
                    return Some(Ok(LLMEngineOutput::cancelled()
                        .with_usage(usage(self.prompt_tokens, self.completion_tokens))));
                }
                e = self.rx.recv() => e,
            };
            let Some(event) = event else {
                self.done = true;
                return Some(Err(backend_error(
                    BackendError::StreamIncomplete,
                    "the engine stopped before the request finished",
                )));
            };
            match event {
                Event::Token(t) => {
                    self.completion_tokens += 1;
                    let mut out = chunk::token(t.id);
                    if let Some(lp) = t.logprobs {
                        out.log_probs = Some(vec![f64::from(lp.logprob)]);
                        out.top_logprobs = Some(vec![lp
                            .top
                            .iter()
                            .enumerate()
                            .map(|(rank, &(id, logprob))| TopLogprob {
                                rank: rank as u32 + 1,
                                token_id: id,
                                token: Some(self.tokenizer.decode(&[id], true)),
                                logprob: f64::from(logprob),
                                bytes: Some(self.tokenizer.token_bytes(id, true)),
                            })
                            .collect()]);
                    }
                    return Some(Ok(out));
                }
                Event::Done(f) => {
                    self.done = true;
                    let out = match f.reason {
                        FinishReason::Stop => LLMEngineOutput::stop(),
                        FinishReason::Length => LLMEngineOutput::length(),
                        FinishReason::Cancelled => LLMEngineOutput::cancelled(),
                    };
                    let mut u = usage(f.prompt_tokens as u32, f.completion_tokens as u32);
                    u.prompt_tokens_details = Some(dynamo_backend_common::PromptTokensDetails {
                        cached_tokens: Some(f.cached_tokens as u32),
                        ..Default::default()
                    });
                    return Some(Ok(out.with_usage(u)));
                }
                Event::Error(m) => {
                    self.done = true;
                    return Some(Err(backend_error(BackendError::Unknown, m)));
                }
                Event::PromptLogits(_) | Event::PromptLogprobs(_) => continue,
            }
        }
    }
}

impl DynamoEngine {
    fn submit(&self, req: Request) -> Result<supernode_engine::engine::RequestId, DynamoError> {
        self.handle.submit(req).map_err(|e| match e {
            SubmitError::PromptTooLong { .. } | SubmitError::Invalid(_) => invalid(e.to_string()),
            SubmitError::QueueFull(_) => backend_error(BackendError::Unknown, e.to_string()),
            SubmitError::Stopped => backend_error(BackendError::EngineShutdown, e.to_string()),
        })
    }

    /// A prefill worker's answer: once the engine has computed the prompt, one terminal chunk
    /// (finish `length`, no tokens) whose `disaggregated_params` name the prompt's pinned
    /// blocks.
    fn prefill(
        &self,
        id: supernode_engine::engine::RequestId,
        tokens: Vec<u32>,
        cache_salt: Option<String>,
        mut rx: UnboundedReceiver<Event>,
        ctx: GenerateContext,
    ) -> BoxStream<'static, Result<LLMEngineOutput, DynamoError>> {
        let (handle, hold) = (self.handle.clone(), self.hold);
        let transfer = self
            .transfer
            .clone()
            .expect("prefill workers have an agent");
        let model = self.model_id.clone();
        let prompt_tokens = tokens.len() as u32;
        let answer = async move {
            loop {
                let event = tokio::select! {
                    biased;
                    _ = ctx.stopped() => {
                        handle.cancel(id);
                        return Ok(LLMEngineOutput::cancelled().with_usage(usage(prompt_tokens, 0)));
                    }
                    e = rx.recv() => e,
                };
                match event {
                    Some(Event::Done(f)) if f.reason == FinishReason::Cancelled => {
                        return Ok(LLMEngineOutput::cancelled().with_usage(usage(prompt_tokens, 0)))
                    }
                    Some(Event::Done(_)) => break,
                    Some(Event::Error(m)) => return Err(backend_error(BackendError::Unknown, m)),
                    Some(_) => continue,
                    None => {
                        return Err(backend_error(
                            BackendError::StreamIncomplete,
                            "the engine stopped before the prompt was computed",
                        ))
                    }
                }
            }
            let (tx, pinned) = tokio::sync::oneshot::channel();
            let op = KvOp::Pin {
                tokens,
                cache_salt,
                reply: Box::new(move |p| {
                    let _ = tx.send(p);
                }),
            };
            let stopped = || backend_error(BackendError::EngineShutdown, "the engine stopped");
            if !handle.kv(op) {
                return Err(stopped());
            }
            let pinned = pinned.await.map_err(|_| stopped())?;
            let lease = pinned.lease;
            // Released by the decode worker's notification, or at the latest now.
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                handle.kv(KvOp::Release { lease });
            });
            let mut out = LLMEngineOutput::length().with_usage(usage(prompt_tokens, 0));
            out.disaggregated_params =
                Some(transfer.handoff(&model, pinned.blocks, lease).to_params());
            Ok(out)
        };
        stream::once(answer).boxed()
    }

    /// A decode worker's import of the prompt blocks `h` names: blocks reserved, read through
    /// NIXL, committed to the prefix cache; the lease to hold until the request has found them.
    /// `None` when the prompt is to be computed here (the reason is logged and counted).
    async fn import(
        &self,
        t: &Arc<KvTransfer>,
        h: &Handoff,
        tokens: Vec<u32>,
        cache_salt: Option<String>,
    ) -> Option<LeaseGuard> {
        if h.model != self.model_id {
            tracing::warn!(
                "a KV handoff for model {} reached a worker of {}: computing the prompt here",
                h.model,
                self.model_id
            );
            t.stats.fallback.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let (tx, reserved) = tokio::sync::oneshot::channel();
        let op = KvOp::Reserve {
            tokens,
            cache_salt,
            max_blocks: h.blocks.len(),
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        };
        if !self.handle.kv(op) {
            return None;
        }
        let res = reserved.await.ok()?;
        let guard = LeaseGuard::new(self.handle.clone(), res.lease);
        let (t2, h2, handle) = (t.clone(), h.clone(), self.handle.clone());
        if res.fill.is_empty() {
            // Everything usable is cached here already.
            tokio::task::spawn_blocking(move || t2.release_peer(&h2));
            t.stats.pulled.fetch_add(1, Ordering::Relaxed);
            return Some(guard);
        }
        let filled = res.fill.len();
        let lease = res.lease;
        let pulled = tokio::task::spawn_blocking(move || {
            let r = t2.pull(&h2, &res, &handle);
            if matches!(r, Err((false, _))) {
                t2.release_peer(&h2);
            }
            r
        })
        .await;
        match pulled {
            Ok(Ok(())) => {
                self.handle.kv(KvOp::Commit { lease, filled });
                t.stats.pulled.fetch_add(1, Ordering::Relaxed);
                Some(guard)
            }
            Ok(Err((in_flight, why))) => {
                tracing::warn!(
                    "KV transfer from {} failed, computing the prompt here: {why}",
                    h.agent
                );
                t.stats.fallback.fetch_add(1, Ordering::Relaxed);
                if in_flight {
                    guard.forget();
                }
                None
            }
            Err(e) => {
                // The transfer's state is unknown: its blocks stay reserved.
                tracing::warn!("KV transfer task failed, computing the prompt here: {e}");
                t.stats.fallback.fetch_add(1, Ordering::Relaxed);
                guard.forget();
                None
            }
        }
    }

    /// `spec` compiled against the vocabulary (whose grammars are built on first use), on the
    /// blocking pool: a large schema takes a while.
    async fn compile(&self, spec: ConstraintSpec) -> Result<Constraint, DynamoError> {
        let (grammars, tokenizer) = (self.grammars.clone(), self.tokenizer.clone());
        let vocab = self.handle.vocab_size();
        tokio::task::spawn_blocking(move || {
            let g = grammars.get(Some(&tokenizer), vocab).map_err(invalid)?;
            g.compile(&spec).map_err(|e| {
                invalid(format!(
                    "the guided decoding constraint cannot be enforced: {}",
                    unenforceable_reason(e)
                ))
            })
        })
        .await
        .map_err(|e| {
            backend_error(
                BackendError::Unknown,
                format!("compiling the constraint failed: {e}"),
            )
        })?
    }
}

#[async_trait]
impl LLMEngine for DynamoEngine {
    async fn start(&self, _worker_id: u64) -> Result<EngineConfig, DynamoError> {
        if let (Some(t), true) = (&self.transfer, self.mode.is_prefill()) {
            t.serve_releases(self.handle.clone());
        }
        Ok(EngineConfig {
            model: self.model_id.clone(),
            served_model_name: Some(self.model_id.clone()),
            llm: Some(LlmRegistration {
                context_length: Some(self.handle.max_model_len() as u32),
                kv_cache_block_size: Some(BLOCK_SIZE as u32),
                total_kv_blocks: Some(self.num_blocks as u64),
                max_num_seqs: Some(self.max_num_seqs as u64),
                max_num_batched_tokens: Some(self.max_num_batched_tokens as u64),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn generate(
        &self,
        request: PreprocessedRequest,
        ctx: GenerateContext,
    ) -> Result<BoxStream<'static, Result<LLMEngineOutput, DynamoError>>, DynamoError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(backend_error(
                BackendError::EngineShutdown,
                "the worker is shutting down",
            ));
        }
        let constraint = match request.sampling_options.guided_decoding.as_ref() {
            Some(g) => match constraint_spec(g)? {
                Some(spec) => Some(self.compile(spec).await?),
                None => None,
            },
            None => None,
        };
        let (tx, rx) = unbounded_channel();
        let mut req = engine_request(
            &request,
            self.handle.max_model_len(),
            constraint,
            ChannelSink(tx),
        )?;
        let prompt_tokens = req.prompt.len() as u32;
        if self.mode.is_prefill() {
            // The prompt only: its blocks go to a decode worker, which samples the first token.
            req.max_tokens = 0;
            let (tokens, salt) = (req.prompt.clone(), req.cache_salt.clone());
            let id = self.submit(req)?;
            return Ok(self.prefill(id, tokens, salt, rx, ctx));
        }
        let import = match (&self.transfer, &request.prefill_result) {
            (Some(t), Some(p)) => match Handoff::from_params(&p.disaggregated_params) {
                Ok(Some(h)) => {
                    let (tokens, salt) = (req.prompt.clone(), req.cache_salt.clone());
                    self.import(t, &h, tokens, salt).await
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!("unusable KV handoff, computing the prompt here: {e}");
                    t.stats.fallback.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            _ => None,
        };
        let id = self.submit(req)?;
        let s = Stream {
            rx,
            ctx,
            handle: self.handle.clone(),
            tokenizer: self.tokenizer.clone(),
            id,
            prompt_tokens,
            completion_tokens: 0,
            done: false,
            _import: import,
        };
        Ok(stream::unfold(
            s,
            |mut s| async move { s.next().await.map(|item| (item, s)) },
        )
        .boxed())
    }

    async fn is_quiescent(&self) -> Result<Option<bool>, DynamoError> {
        let st = self.handle.stats();
        // A prefill worker's pins are transfers a decode worker may still be reading.
        let busy = st.running.load(Ordering::Relaxed)
            + st.waiting.load(Ordering::Relaxed)
            + st.kv_leases.load(Ordering::Relaxed);
        Ok(Some(busy == 0))
    }

    async fn kv_event_sources(&self) -> Result<Vec<KvEventSource>, DynamoError> {
        Ok(vec![kv_events::source(&self.handle)])
    }

    async fn setup_metrics(&self, ctx: MetricsCtx<'_>) -> Result<MetricsBindings, DynamoError> {
        let (handle, transfer) = (self.handle.clone(), self.transfer.clone());
        ctx.metrics.add_expfmt_callback(Arc::new(move || {
            Ok(disagg::metrics_text(&handle, transfer.as_deref()))
        }));
        let (handle, stopped) = (self.handle.clone(), self.stopped.clone());
        Ok(MetricsBindings {
            dp_ranks: vec![0],
            on_publisher_ready: Some(Box::new(move |publisher| {
                kv_events::publish_load(handle, publisher, stopped);
                Ok(())
            })),
        })
    }

    async fn cleanup(&self) -> Result<(), DynamoError> {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            // NIXL lets go of the cache before the engine frees it.
            if let Some(t) = &self.transfer {
                t.shutdown();
            }
            self.handle.abort();
        }
        Ok(())
    }
}
