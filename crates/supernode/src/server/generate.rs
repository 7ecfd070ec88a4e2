//! `POST /v1/chat/completions` and `POST /v1/completions`: submit to the engine, then answer
//! with one JSON body or a stream of server-sent events, as OpenAI shapes them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use supernode_engine::engine::{
    Event, Finish, FinishReason, PromptLogprobs, Request, Sink, SubmitError, TokenLogprobs,
};
use supernode_engine::tool_parser;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::api::{self, ApiError, ApiResult, GenSpec, Prompt};
use super::structured;
use super::tools;
use super::{unknown_model, AppState, Shared};

/// Forwards one choice's events to its handler.
struct ChannelSink {
    index: usize,
    tx: UnboundedSender<(usize, Event)>,
}

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send((self.index, event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

pub async fn chat(State(st): State<Shared>, body: Bytes) -> Response {
    let r = off_the_async_threads(&st, body, chat_inner).await;
    answer(&st, r).await
}

pub async fn completions(State(st): State<Shared>, body: Bytes) -> Response {
    let r = off_the_async_threads(&st, body, completion_inner).await;
    answer(&st, r).await
}

/// Parsing, template rendering and tokenising a long prompt take CPU time (seconds for
/// megabytes): they run on tokio's blocking pool so the HTTP threads keep answering.
async fn off_the_async_threads(
    st: &Shared,
    body: Bytes,
    f: fn(&Shared, &[u8]) -> ApiResult<Started>,
) -> ApiResult<Started> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(&st, &body))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "preparing the request failed: {e}"
            )))
        })
}

async fn answer(st: &Shared, started: ApiResult<Started>) -> Response {
    match started {
        Ok(s) if s.stream => stream_response(s),
        // A started request counts its own outcome.
        Ok(s) => collect(s).await.unwrap_or_else(IntoResponse::into_response),
        Err(e) => {
            count_refused(st, &e);
            e.into_response()
        }
    }
}

/// Counts a request refused before it started in `supernode_requests_total`.
pub(super) fn count_refused(st: &AppState, e: &ApiError) {
    let outcome = match e.status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "rejected",
        s if s.is_server_error() => "error",
        _ => "invalid",
    };
    st.metrics.requests.with_label_values(&[outcome]).inc();
}

fn chat_inner(st: &Shared, body: &[u8]) -> ApiResult<Started> {
    start_chat(st, &api::parse_body(body)?)
}

/// Starts a chat completion from its parsed body: the way in for the APIs translated onto
/// chat completions (Anthropic's messages, OpenAI's responses).
pub(super) fn start_chat(st: &Shared, body: &serde_json::Map<String, Value>) -> ApiResult<Started> {
    let mut req = api::chat_request(body)?;
    check_model(st, &req.spec)?;
    let control = |text: &str| tools::control_token(st.tokenizer.as_deref(), text);
    if let Some(spec) = tools::forced_call(&st.tooling, &req.tools, &control) {
        if let Some(other) = &req.spec.structured.constraint {
            return Err(ApiError::invalid(
                other.param,
                format!(
                    "`{}` cannot be combined with a `tool_choice` that forces a call",
                    other.param
                ),
            ));
        }
        req.spec.structured.constraint = Some(structured::Requested::new("tool_choice", spec));
    }
    let tok = st.tokenizer.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no tokenizer: use /v1/completions with a prompt of token ids",
        )
    })?;
    let tmpl = st.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "this model has no chat template (it is likely a base model): use /v1/completions",
        )
    })?;
    if req.tools.extras.tools.is_some() && !st.tooling.renders_tools {
        return Err(ApiError::invalid(
            "tools",
            "this model's chat template cannot render tools",
        ));
    }
    let (text, prompt) = tmpl
        .prompt_with(tok, &req.messages, &req.tools.extras)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // A model that may reason first is constrained once its reasoning ends.
    if let Some(c) = &mut req.spec.structured.constraint {
        if st.tooling.reasoning.is_some() && tool_parser::may_reason(&text) {
            c.after = Some(tool_parser::REASONING_END);
        }
    }
    let mut s = start(st, vec![(prompt, None)], req.spec, Kind::Chat)?;
    s.parse = tools::ParseSpec::new(&st.tooling, &req.tools, text, &s.id);
    if let Some(spec) = &s.parse {
        for (i, c) in s.choices.iter_mut().enumerate() {
            c.parser = Some(spec.parser(i));
        }
    }
    Ok(s)
}

fn completion_inner(st: &Shared, body: &[u8]) -> ApiResult<Started> {
    let req = api::completion_request(&api::parse_body(body)?)?;
    check_model(st, &req.spec)?;
    let echo = req.spec.echo;
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for p in req.prompts {
        prompts.push(match p {
            Prompt::Tokens(t) => {
                let text = echo.then(|| {
                    st.tokenizer
                        .as_ref()
                        .map(|tok| tok.decode(&t, true))
                        .unwrap_or_default()
                });
                (t, text)
            }
            Prompt::Text(text) => {
                let tok = st.tokenizer.as_ref().ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        "this model has no tokenizer: give the prompt as token ids",
                    )
                })?;
                (tok.encode(&text, true, true), echo.then_some(text))
            }
        });
    }
    start(st, prompts, req.spec, Kind::Completion)
}

fn check_model(st: &AppState, spec: &GenSpec) -> ApiResult<()> {
    if spec.model != st.model_id {
        return Err(unknown_model(st, &spec.model));
    }
    Ok(())
}

/// A request submitted to the engine, before its answer.
pub(super) struct Started {
    st: Shared,
    rx: UnboundedReceiver<(usize, Event)>,
    kind: Kind,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    prompt_len: usize,
    id: String,
    created: u64,
    arrival: Instant,
    choices: Vec<Choice>,
    /// The first token of any choice has arrived.
    first_token: bool,
    /// The request's outcome is in `supernode_requests_total`.
    counted: bool,
    /// `echo`: every choice's text starts with its prompt's.
    echo: bool,
    /// Chat: how outputs split into reasoning, content and tool calls.
    parse: Option<tools::ParseSpec>,
}

#[derive(Default)]
struct Choice {
    text: String,
    finish: Option<Finish>,
    error: Option<String>,
    tokens: usize,
    last: Option<Instant>,
    /// `echo` while streaming: the prompt's chunk was sent.
    echoed: bool,
    /// `echo`: the prompt's text, and its tokens (for their logprobs).
    echo_text: String,
    prompt: Vec<u32>,
    /// Chat: the `logprobs.content` entries; completions: the legacy columns.
    lp_content: Vec<Value>,
    lp_tokens: Vec<Value>,
    lp_values: Vec<Value>,
    lp_top: Vec<Value>,
    lp_offsets: Vec<Value>,
    offset: usize,
    /// Streaming chat with tools or reasoning: the incremental parser.
    parser: Option<supernode_engine::tool_parser::OutputParser>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn request_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{prefix}-{t:016x}{n:08x}")
}

/// Submits `spec.n` choices for each prompt (with its text if `echo`); choice `p * n + i` is
/// prompt `p`'s `i`-th, as OpenAI numbers them.
fn start(
    st: &Shared,
    prompts: Vec<(Vec<u32>, Option<String>)>,
    spec: GenSpec,
    kind: Kind,
) -> ApiResult<Started> {
    let arrival = Instant::now();
    let param = if kind == Kind::Chat {
        "messages"
    } else {
        "prompt"
    };
    let (tx, rx) = unbounded_channel();
    let prompt_len: usize = prompts.iter().map(|(p, _)| p.len()).sum();
    // A prompt longer than the context is the engine's to refuse; one that fits but leaves less
    // room than `max_tokens` is refused here, as OpenAI and vLLM do.
    let ctx = st.max_model_len;
    for (prompt, _) in &prompts {
        let len = prompt.len();
        if let Some(m) = spec.max_tokens.filter(|&m| len <= ctx && m > ctx - len) {
            return Err(ApiError::invalid(
                spec.max_tokens_param,
                format!(
                    "this model's context holds {ctx} tokens, but {} were asked for ({len} in \
                     the prompt, {m} to generate): lower `{}` or shorten the prompt",
                    len + m,
                    spec.max_tokens_param
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    let constraint = match &spec.structured.constraint {
        Some(c) => Some(structured::compile(st, c)?),
        None => None,
    };
    structured::check_logit_bias(&spec.structured.logit_bias, st.engine.vocab_size())?;
    let n = spec.n;
    let mut reqs = Vec::with_capacity(prompts.len() * n);
    for (p, (prompt, echo)) in prompts.iter().enumerate() {
        for i in 0..n {
            let mut params = spec.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            reqs.push(Request {
                prompt: prompt.clone(),
                params,
                // The server's `--max-tokens` caps a request that sets none; unlike an asked-for
                // cap it is never refused for want of room (the context ends the answer first).
                max_tokens: spec
                    .max_tokens
                    .or(st.default_max_tokens)
                    .unwrap_or(usize::MAX),
                stop: spec.stop.clone(),
                ignore_eos: spec.ignore_eos,
                min_tokens: spec.min_tokens,
                logprobs: spec.logprobs,
                cache_salt: spec.cache_salt.clone(),
                prompt_logits: false,
                prompt_logprobs: if echo.is_some() { spec.logprobs } else { None },
                logit_bias: spec.structured.logit_bias.clone(),
                constraint: constraint.clone(),
                sink: Box::new(ChannelSink {
                    index: p * n + i,
                    tx: tx.clone(),
                }) as Box<dyn Sink>,
            });
        }
    }
    st.engine.submit_all(reqs).map_err(|e| match e {
        SubmitError::PromptTooLong { prompt, ctx } => ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {ctx} tokens, but the prompt has {prompt} tokens"
            ),
        )
        .with_code("context_length_exceeded"),
        SubmitError::Invalid(m) => ApiError::invalid(param, m),
        SubmitError::QueueFull(_) => ApiError::overloaded(e.to_string()),
        SubmitError::Stopped => ApiError::overloaded("the server is shutting down"),
    })?;
    let id_prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let logprobs = spec.logprobs.is_some();
    let echo = prompts.iter().any(|(_, e)| e.is_some());
    let mut s = Started {
        st: st.clone(),
        rx,
        kind,
        stream: spec.stream,
        include_usage: spec.include_usage,
        logprobs,
        prompt_len,
        id: request_id(id_prefix),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        arrival,
        choices: (0..prompts.len() * n).map(|_| Choice::default()).collect(),
        first_token: false,
        counted: false,
        echo,
        parse: None,
    };
    for (p, (prompt, text)) in prompts.into_iter().enumerate() {
        let Some(text) = text else { continue };
        // The first prompt token has no context, so no logprob; the rest come from the engine.
        let first = (logprobs && !prompt.is_empty()).then(|| s.token_text(prompt[0]).0);
        for c in &mut s.choices[p * n..(p + 1) * n] {
            c.text = text.clone();
            c.offset = text.len();
            if let Some(t) = &first {
                c.lp_tokens.push(json!(t));
                c.lp_values.push(Value::Null);
                c.lp_top.push(Value::Null);
                c.lp_offsets.push(json!(0));
            }
            c.echo_text = text.clone();
            c.prompt = prompt.clone();
        }
    }
    Ok(s)
}

impl Started {
    /// Tokens in the prompt(s).
    pub(super) fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    /// The response id (`chatcmpl-…`).
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The stream chunks (chat completion chunks, or an error object) of the next engine event;
    /// `None` once every choice has finished.
    pub(super) async fn next_chunks(&mut self) -> Option<Vec<Value>> {
        if self.done() {
            return None;
        }
        Some(match self.rx.recv().await {
            Some((i, ev)) => self.on_event(i, ev),
            None => {
                let msg = "the engine stopped before the request finished";
                for c in &mut self.choices {
                    if c.finish.is_none() && c.error.is_none() {
                        c.error = Some(msg.into());
                    }
                }
                vec![ApiError::overloaded(msg).body()]
            }
        })
    }

    /// Waits for the end and returns the chat completion body.
    pub(super) async fn body_json(mut self) -> ApiResult<Value> {
        while !self.done() {
            match self.rx.recv().await {
                Some((i, ev)) => {
                    self.on_event(i, ev);
                }
                None => {
                    return Err(ApiError::overloaded(
                        "the engine stopped before the request finished",
                    ))
                }
            }
        }
        if let Some(e) = self.choices.iter().find_map(|c| c.error.clone()) {
            return Err(ApiError::internal(e));
        }
        Ok(self.body())
    }
}

fn finish_reason(f: &Finish) -> &'static str {
    match f.reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

impl Started {
    fn done(&self) -> bool {
        self.choices
            .iter()
            .all(|c| c.finish.is_some() || c.error.is_some())
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .st
            .tokenizer
            .as_ref()
            .map(|t| t.token_bytes(id, true))
            .unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// Adds the legacy logprob columns of prompt tokens `p.start..` to choice `i`.
    fn prompt_logprobs(&mut self, i: usize, p: &PromptLogprobs) {
        let prompt = std::mem::take(&mut self.choices[i].prompt);
        let mut offset: usize = prompt[..p.start.min(prompt.len())]
            .iter()
            .map(|&t| self.token_text(t).0.len())
            .sum();
        for (lp, &id) in p.logprobs.iter().zip(prompt.get(p.start..).unwrap_or(&[])) {
            let text = self.token_text(id).0;
            let top: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|&(t, l)| (self.token_text(t).0, json!(l)))
                .collect();
            let c = &mut self.choices[i];
            c.lp_tokens.push(json!(text));
            c.lp_values.push(json!(lp.logprob));
            c.lp_top.push(json!(top));
            c.lp_offsets.push(json!(offset));
            offset += text.len();
        }
        self.choices[i].prompt = prompt;
    }

    /// The stream chunk of choice `i` that carries the prompt (`echo`), with the prompt's
    /// logprob columns if asked.
    fn echo_chunk(&mut self, i: usize) -> Value {
        self.choices[i].echoed = true;
        let c = &self.choices[i];
        let lp = if self.logprobs {
            json!({
                "tokens": c.lp_tokens, "token_logprobs": c.lp_values,
                "top_logprobs": c.lp_top, "text_offset": c.lp_offsets,
            })
        } else {
            Value::Null
        };
        let text = c.echo_text.clone();
        self.chunk(i, &text, lp, None)
    }

    fn chat_logprob(&self, id: u32, lp: &TokenLogprobs) -> Value {
        let (text, bytes) = self.token_text(id);
        let top: Vec<Value> = lp
            .top
            .iter()
            .map(|&(t, l)| {
                let (tt, tb) = self.token_text(t);
                json!({ "token": tt, "logprob": l, "bytes": tb })
            })
            .collect();
        json!({ "token": text, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top })
    }

    /// Takes one engine event; returns the stream chunks it makes (when streaming).
    fn on_event(&mut self, i: usize, ev: Event) -> Vec<Value> {
        let now = Instant::now();
        let mut chunks = Vec::new();
        if let Event::PromptLogprobs(p) = &ev {
            self.prompt_logprobs(i, p);
            return chunks;
        }
        if self.stream && self.echo && !self.choices[i].echoed {
            chunks.push(self.echo_chunk(i));
        }
        let st = self.st.clone();
        let m = &st.metrics;
        match ev {
            Event::Token(t) => {
                if !self.first_token {
                    self.first_token = true;
                    m.first_token((now - self.arrival).as_secs_f64());
                }
                if let Some(prev) = self.choices[i].last {
                    m.next_token((now - prev).as_secs_f64());
                }
                let lp_chat = match (&t.logprobs, self.kind) {
                    (Some(lp), Kind::Chat) => Some(self.chat_logprob(t.id, lp)),
                    _ => None,
                };
                let lp_legacy = match (&t.logprobs, self.kind) {
                    (Some(lp), Kind::Completion) => {
                        let (text, _) = self.token_text(t.id);
                        let top: serde_json::Map<String, Value> = lp
                            .top
                            .iter()
                            .map(|&(id, l)| (self.token_text(id).0, json!(l)))
                            .collect();
                        Some((text, lp.logprob, top))
                    }
                    _ => None,
                };
                let c = &mut self.choices[i];
                c.last = Some(now);
                c.tokens += 1;
                c.text.push_str(&t.text);
                let offset = c.offset;
                c.offset += t.text.len();
                if let Some(v) = &lp_chat {
                    c.lp_content.push(v.clone());
                }
                if let Some((text, l, top)) = &lp_legacy {
                    c.lp_tokens.push(json!(text));
                    c.lp_values.push(json!(l));
                    c.lp_top.push(json!(top));
                    c.lp_offsets.push(json!(offset));
                }
                if self.stream && self.choices[i].parser.is_some() {
                    let ds = self.choices[i].parser.as_mut().map(|p| p.push(&t.text));
                    chunks.extend(self.delta_chunks(i, ds.unwrap_or_default(), lp_chat, None));
                } else if self.stream && (!t.text.is_empty() || self.logprobs) {
                    let lp = match (lp_chat, lp_legacy) {
                        (Some(v), _) => json!({ "content": [v] }),
                        (_, Some((text, l, top))) => json!({
                            "tokens": [text], "token_logprobs": [l],
                            "top_logprobs": [top], "text_offset": [offset],
                        }),
                        _ => Value::Null,
                    };
                    chunks.push(self.chunk(i, &t.text, lp, None));
                }
            }
            Event::Done(f) => {
                if i == 0 {
                    m.prompt(f.prompt_tokens, f.cached_tokens);
                }
                m.generated(f.completion_tokens);
                let c = &mut self.choices[i];
                c.text.push_str(&f.text);
                if let (true, Some(p)) = (self.stream, c.parser.as_mut()) {
                    let mut ds = p.push(&f.text);
                    ds.extend(p.finish());
                    let reason = match finish_reason(&f) {
                        "stop" if p.called() => "tool_calls",
                        r => r,
                    };
                    self.choices[i].finish = Some(f);
                    chunks.extend(self.delta_chunks(i, ds, None, Some(reason)));
                } else if self.stream {
                    let tail = f.text.clone();
                    let reason = finish_reason(&f);
                    let stop = f.stop_string.clone();
                    self.choices[i].finish = Some(f);
                    let mut c = self.chunk(i, &tail, Value::Null, Some(reason));
                    c["choices"][0]["stop_reason"] = json!(stop);
                    chunks.push(c);
                } else {
                    c.finish = Some(f);
                }
            }
            // Never asked for by the server; prompt logprobs were taken above.
            Event::PromptLogits(_) | Event::PromptLogprobs(_) => {}
            Event::Error(msg) => {
                if self.stream {
                    chunks.push(ApiError::internal(msg.clone()).body());
                }
                self.choices[i].error = Some(msg);
            }
        }
        if self.done() && !self.counted {
            self.counted = true;
            self.st
                .metrics
                .finished(self.outcome(), Some((now - self.arrival).as_secs_f64()));
        }
        if self.stream && self.done() && self.include_usage {
            let mut u = self.base("chunk");
            u["choices"] = json!([]);
            u["usage"] = self.usage();
            chunks.push(u);
        }
        chunks
    }

    /// The metrics label of a finished request: `error` if any choice failed, else the first
    /// choice's finish reason.
    fn outcome(&self) -> &'static str {
        if self.choices.iter().any(|c| c.error.is_some()) {
            return "error";
        }
        match self.choices[0].finish.as_ref().map(|f| f.reason) {
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            _ => "cancelled",
        }
    }

    fn base(&self, what: &str) -> Value {
        let object = match (self.kind, what) {
            (Kind::Chat, "chunk") => "chat.completion.chunk",
            (Kind::Chat, _) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.st.model_id })
    }

    fn chunk(&self, i: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        let mut v = self.base("chunk");
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (finish, text.is_empty()) {
                    (Some(_), true) => json!({}),
                    _ => json!({ "content": text }),
                };
                json!({ "index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
            Kind::Completion => {
                json!({ "index": i, "text": text, "logprobs": logprobs, "finish_reason": finish })
            }
        };
        v["choices"] = json!([choice]);
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// Stream chunks of parsed pieces of choice `i`: one per delta, the logprobs on the first,
    /// the finish reason on the last (an empty delta carries them if there is none).
    fn delta_chunks(
        &self,
        i: usize,
        ds: Vec<supernode_engine::tool_parser::Delta>,
        lp: Option<Value>,
        finish: Option<&str>,
    ) -> Vec<Value> {
        let mut deltas = self
            .parse
            .as_ref()
            .map(|p| p.deltas(ds))
            .unwrap_or_default();
        if deltas.is_empty() && (lp.is_some() || finish.is_some()) {
            deltas.push(json!({}));
        }
        let n = deltas.len();
        let mut lp = lp.map(|v| json!({ "content": [v] }));
        deltas
            .into_iter()
            .enumerate()
            .map(|(k, d)| {
                let last = k + 1 == n;
                let mut c = self.chunk(
                    i,
                    "",
                    lp.take().unwrap_or(Value::Null),
                    if last { finish } else { None },
                );
                c["choices"][0]["delta"] = d;
                c
            })
            .collect()
    }

    fn usage(&self) -> Value {
        let completion: usize = self
            .choices
            .iter()
            .map(|c| c.finish.as_ref().map_or(c.tokens, |f| f.completion_tokens))
            .sum();
        let cached = self
            .choices
            .iter()
            .filter_map(|c| c.finish.as_ref().map(|f| f.cached_tokens))
            .max()
            .unwrap_or(0);
        let mut usage = json!({
            "prompt_tokens": self.prompt_len,
            "completion_tokens": completion,
            "total_tokens": self.prompt_len + completion,
            "prompt_tokens_details": { "cached_tokens": cached },
        });
        // Speculative decoding's drafts, in OpenAI's predicted-outputs fields.
        let spec = self
            .choices
            .iter()
            .filter_map(|c| c.finish.as_ref().and_then(|f| f.spec))
            .fold(None, |acc: Option<(usize, usize)>, u| {
                let (d, a) = acc.unwrap_or((0, 0));
                Some((d + u.draft_tokens, a + u.accepted_tokens))
            });
        if let Some((drafted, accepted)) = spec {
            usage["completion_tokens_details"] = json!({
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": drafted - accepted,
            });
        }
        usage
    }

    /// The non-streaming body.
    fn body(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut reason = c.finish.as_ref().map(finish_reason);
                let message = match &self.parse {
                    Some(p) => {
                        let (m, called) = p.message(i, &c.text);
                        if called && reason == Some("stop") {
                            reason = Some("tool_calls");
                        }
                        m
                    }
                    None => json!({ "role": "assistant", "content": c.text }),
                };
                match self.kind {
                    Kind::Chat => json!({
                        "index": i,
                        "message": message,
                        "logprobs": if self.logprobs { json!({ "content": c.lp_content }) } else { Value::Null },
                        "finish_reason": reason,
                        "stop_reason": c.finish.as_ref().and_then(|f| f.stop_string.clone()),
                    }),
                    Kind::Completion => json!({
                        "index": i,
                        "text": c.text,
                        "logprobs": if self.logprobs {
                            json!({
                                "tokens": c.lp_tokens, "token_logprobs": c.lp_values,
                                "top_logprobs": c.lp_top, "text_offset": c.lp_offsets,
                            })
                        } else { Value::Null },
                        "finish_reason": reason,
                    }),
                }
            })
            .collect();
        let mut v = self.base("body");
        v["choices"] = json!(choices);
        v["usage"] = self.usage();
        v
    }
}

impl Drop for Started {
    /// A request dropped before it finished: its client went away (the engine cancels it).
    fn drop(&mut self) {
        if !self.counted {
            self.st
                .metrics
                .requests
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

async fn collect(s: Started) -> ApiResult<Response> {
    Ok(Json(s.body_json().await?).into_response())
}

fn stream_response(s: Started) -> Response {
    let mut out: VecDeque<Value> = VecDeque::new();
    if s.kind == Kind::Chat {
        // The first chunk of each choice carries the role, as OpenAI's do.
        for i in 0..s.choices.len() {
            let mut c = s.chunk(i, "", Value::Null, None);
            c["choices"][0]["delta"] = json!({ "role": "assistant", "content": "" });
            out.push_back(c);
        }
    }
    let state = (s, out, false);
    let events = futures_util::stream::unfold(state, |(mut s, mut out, ended)| async move {
        loop {
            if let Some(v) = out.pop_front() {
                let ev = SseEvent::default().data(v.to_string());
                return Some((Ok::<_, Infallible>(ev), (s, out, ended)));
            }
            if ended {
                return None;
            }
            match s.next_chunks().await {
                Some(chunks) => out.extend(chunks),
                None => {
                    let ev = SseEvent::default().data("[DONE]");
                    return Some((Ok(ev), (s, out, true)));
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
