//! `supernode serve`: the OpenAI-compatible HTTP API over the engine loop.
//!
//! axum on a small tokio runtime; the model runs on the engine's own thread (and the compute
//! pool). Each request is validated here (400 naming the parameter), rendered and tokenised,
//! then submitted to the engine with a sink that forwards its events to the handler through a
//! channel. A client that goes away drops the receiving end, which the engine notices and
//! cancels the request, freeing its blocks. SIGTERM or Ctrl-C stops accepting connections,
//! closes those that serve no request, lets running requests finish for `--shutdown-timeout`
//! seconds, cancels the rest, and exits 0 within that time. Connection limits and timeouts are
//! `conn.rs`'s; request bodies are read whole by [`read_body`], under a size and a time limit.
//! Every error, including those of routing, body reading and HTTP parsing, is OpenAI's JSON.

mod anthropic;
mod api;
mod conn;
mod cors;
mod embeddings;
#[cfg(test)]
mod fuzz;
mod generate;
mod metrics;
mod responses;
mod structured;
mod tokens;
mod tools;
mod translate;
mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde_json::json;
use supernode_engine::chat::ChatTemplate;
use supernode_engine::constraint::LazyGrammars;
use supernode_engine::engine::{EngineConfig, EngineHandle};
use supernode_engine::load::load_with_tokenizer;
use supernode_engine::tokenizer::Tokenizer;
use supernode_models::KvCache;

use crate::model_args::{prepare, status_line, ModelArgs};
use api::ApiError;
use metrics::Metrics;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    spec: crate::spec_args::SpecArgs,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this key on the /v1 endpoints, as `Authorization: Bearer KEY` or `x-api-key: KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// The model id clients name (default: the short name or the file name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Tokens a request generates at most when it does not say (llama-server's `-n`); default:
    /// all the room the context has left.
    #[arg(short = 'n', long = "max-tokens", value_name = "N")]
    max_tokens: Option<usize>,
    /// A chat template file (Jinja) to use instead of the model's own (vLLM's `--chat-template`,
    /// llama-server's `--chat-template-file`); the tool-call and reasoning formats are then
    /// detected from it.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<std::path::PathBuf>,
    /// Tool-call format (hermes, qwen3_coder, llama3_json, deepseek_v3, mistral, none);
    /// default: detected from the chat template.
    #[arg(long)]
    tool_call_parser: Option<String>,
    /// Reasoning format (deepseek_r1, qwen3, none); default: detected from the chat template.
    #[arg(long)]
    reasoning_parser: Option<String>,
    /// Seconds to let running requests finish after SIGTERM before cancelling them.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Connections held at once; at the cap the quietest idle one is closed for a new one.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
    /// Seconds a request's body may take to arrive.
    #[arg(long, default_value_t = 60)]
    body_timeout: u64,
    /// Seconds an idle kept-alive connection stays open.
    #[arg(long, default_value_t = 5)]
    keep_alive_timeout: u64,
    /// The largest request body, in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mib: usize,
    /// Serve a chat page at `/` (streams, renders markdown, folds reasoning).
    #[arg(long)]
    ui: bool,
    /// Allow web pages from these origins to call the server (CORS): `*`, or
    /// `scheme://host[:port]` origins separated by commas. Off by default.
    #[arg(long)]
    cors_origins: Option<String>,
}

/// What every handler shares.
pub struct AppState {
    engine: EngineHandle,
    tokenizer: Option<Arc<Tokenizer>>,
    template: Option<ChatTemplate>,
    /// The chat template's source (`--chat-template`'s, else the model's).
    template_source: Option<String>,
    tooling: tools::Tooling,
    model_id: String,
    api_key: Option<String>,
    metrics: Metrics,
    created: u64,
    /// The longest prompt plus completion a request may ask for.
    max_model_len: usize,
    /// `--max-tokens`: the cap of a request that sets none.
    default_max_tokens: Option<usize>,
    max_body_bytes: usize,
    body_timeout: Duration,
    /// Whether `/` serves the chat page.
    ui: bool,
    /// The model's hidden size (the embeddings' length) and vocabulary size.
    hidden: usize,
    vocab_size: usize,
    cors: Option<Arc<cors::Cors>>,
    /// The vocabulary's grammars for structured output, built on first use.
    grammars: LazyGrammars,
}

type Shared = Arc<AppState>;

/// The engine's options, shared by `serve` and `worker`.
#[derive(Args)]
pub(crate) struct EngineArgs {
    /// Sequences computed at once.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_num_seqs: usize,
    /// Tokens computed per engine step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 256)]
    pub(crate) max_num_batched_tokens: usize,
    /// Memory for the KV cache, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub(crate) kv_cache_mib: usize,
    /// Requests allowed to wait for admission; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_waiting: usize,
    /// Do not reuse the KV blocks of shared prompt prefixes.
    #[arg(long)]
    pub(crate) no_prefix_caching: bool,
    /// A secret that keys every prefix-cache block hash of this deployment, so that its hashes
    /// (seen by routers and other workers) cannot be matched or predicted from outside.
    #[arg(long, default_value = "")]
    pub(crate) prefix_cache_salt: String,
}

/// A started engine and what its callers need to know of the model.
pub(crate) struct Engine {
    pub(crate) handle: EngineHandle,
    pub(crate) tokenizer: Option<Arc<Tokenizer>>,
    /// The model's file or directory.
    #[cfg_attr(not(feature = "dynamo"), allow(dead_code))]
    pub(crate) path: std::path::PathBuf,
    /// The name clients give (`--served-model-name`, else the short or Hub name, else the
    /// file's stem).
    pub(crate) model_id: String,
    pub(crate) config: supernode_models::ModelConfig,
    pub(crate) num_blocks: usize,
    /// The status line saying what was loaded, for the caller to print once it has checked
    /// the rest of its options (an error stays the only line).
    pub(crate) loaded: String,
}

/// Loads the model that `model` names and starts the engine loop over it.
pub(crate) fn start_engine(
    model: &ModelArgs,
    spec: &crate::spec_args::SpecArgs,
    e: &EngineArgs,
    served_model_name: Option<&str>,
) -> Result<Engine> {
    spec.check()?;
    let (path, mut opts) = prepare(model)?;
    opts.mtp = spec.wants_mtp();
    let t0 = std::time::Instant::now();
    let (m, tokenizer) = load_with_tokenizer(&path, &opts)?;
    let speculative = spec.config(&opts, m.as_ref(), tokenizer.as_deref())?;
    if let Some(note) = supernode_models::partial_load_note(&path) {
        status_line(true, &note);
    }
    if let Some(total) = memory_mib() {
        if e.kv_cache_mib > total {
            bail!(
                "--kv-cache-mib {} is more than this machine's memory ({total} MiB): give the \
                 KV cache less",
                e.kv_cache_mib
            );
        }
    }
    let specs = m.kv_specs();
    // A hybrid model's recurrent state slots come out of the same budget as its KV blocks.
    // With speculation a slot also keeps a journal to roll rejected drafts back (each head's
    // state before the drafts, and the drafts' inputs): counted as a second slot.
    let widths: Vec<usize> = m
        .state_widths()
        .into_iter()
        .map(|w| if speculative.is_some() { 2 * w } else { w })
        .collect();
    // A draft model's or MTP layer's own caches hold at most the running requests' positions
    // (and their drafts), so the budget is shared between the two in proportion to their bytes
    // per token: the engine's blocks and the proposer's caches together stay within it.
    let per_token = KvCache::bytes_per_token(&specs);
    let proposer_per_token = speculative
        .as_ref()
        .map_or(0, |s| s.cache_bytes_per_token(m.as_ref()));
    let kv_bytes = e.kv_cache_mib << 20;
    let engine_bytes = match (per_token, proposer_per_token) {
        (0, _) | (_, 0) => kv_bytes,
        (t, d) => (kv_bytes as u128 * t as u128 / (t + d) as u128) as usize,
    };
    let (num_blocks, state_slots) =
        EngineConfig::budget(&specs, &widths, engine_bytes, e.max_num_seqs);
    let hybrid = widths.iter().any(|&w| w > 0);
    if num_blocks == 0 || (hybrid && state_slots == 0) {
        bail!(
            "--kv-cache-mib {} holds no KV block and recurrent state of this model ({} bytes per token, {} bytes \
             of recurrent state per sequence)",
            e.kv_cache_mib,
            KvCache::bytes_per_token(&specs),
            KvCache::bytes_per_state_slot(&widths)
        );
    }
    if hybrid && state_slots < e.max_num_seqs {
        status_line(
            true,
            &format!(
                "--kv-cache-mib {} holds the recurrent state of {state_slots} sequences ({} \
                 bytes each): at most {state_slots} run at once",
                e.kv_cache_mib,
                KvCache::bytes_per_state_slot(&widths)
            ),
        );
    }
    let config = m.config().clone();
    let model_ctx = config.context_len;
    let ctx_len = match model.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(c) if c > model_ctx => bail!("--ctx {c} exceeds the model's context of {model_ctx}"),
        Some(c) => c,
        None => model_ctx,
    };
    let cfg = EngineConfig {
        max_num_seqs: e.max_num_seqs,
        max_num_batched_tokens: e.max_num_batched_tokens,
        num_blocks,
        ctx_len,
        max_waiting: e.max_waiting,
        prefix_caching: !e.no_prefix_caching,
        prefix_cache_salt: e.prefix_cache_salt.clone(),
        speculative,
        state_slots,
    };
    let handle = EngineHandle::start(m, tokenizer.clone(), cfg)?;
    let model_id = served_model_name.map(str::to_string).unwrap_or_else(|| {
        // A short name or a Hub name (which has no local path of that name) serves as itself.
        let named = crate::fetch::known(&model.model).is_some()
            || (!std::path::Path::new(&model.model).exists()
                && crate::hub::HubSpec::parse(&model.model).is_some());
        if named {
            model.model.clone()
        } else {
            path.file_stem()
                .or(path.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.model.clone())
        }
    });
    let proposer = match proposer_per_token {
        0 => String::new(),
        d => format!(" and the draft caches' {d} bytes/token"),
    };
    let loaded = format!(
        "loaded {} in {:.2}s; KV cache {} blocks ({} tokens, {} bytes/token{proposer}), context {}",
        path.display(),
        t0.elapsed().as_secs_f64(),
        num_blocks,
        handle.kv_capacity_tokens(),
        per_token,
        ctx_len,
    );
    Ok(Engine {
        handle,
        tokenizer,
        path,
        model_id,
        config,
        num_blocks,
        loaded,
    })
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key is empty: give a key, or leave the option out to serve without one");
    }
    for (name, v) in [
        ("--max-connections", a.max_connections as u64),
        ("--header-timeout", a.header_timeout),
        ("--body-timeout", a.body_timeout),
        ("--keep-alive-timeout", a.keep_alive_timeout),
        ("--max-body-mib", a.max_body_mib as u64),
        ("--max-tokens", a.max_tokens.map_or(1, |n| n as u64)),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    let cors = match &a.cors_origins {
        Some(o) => Some(Arc::new(cors::Cors::parse(o).map_err(anyhow::Error::msg)?)),
        None => None,
    };
    let given = match &a.chat_template {
        Some(p) => {
            let path = p.display().to_string();
            let src = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read --chat-template {path}: {e}"))?;
            Some((path, src))
        }
        None => None,
    };
    let Engine {
        handle: engine,
        tokenizer,
        model_id,
        config,
        num_blocks,
        loaded,
        ..
    } = start_engine(&a.model, &a.spec, &a.engine, a.served_model_name.as_deref())?;
    let template = match (&tokenizer, &given) {
        (Some(t), Some((path, src))) => Some(
            ChatTemplate::with_source(t, src)
                .map_err(|e| anyhow::anyhow!("--chat-template {path}: {e}"))?,
        ),
        (Some(t), None) => ChatTemplate::for_tokenizer(t)?,
        (None, Some(_)) => bail!("--chat-template needs a model with a tokenizer"),
        (None, None) => None,
    };
    let source: Option<String> = given.map(|(_, src)| src).or_else(|| {
        tokenizer
            .as_ref()
            .and_then(|t| t.chat_template())
            .map(str::to_string)
    });
    let tooling = tools::Tooling::new(
        template.as_ref().zip(source.as_deref()),
        a.tool_call_parser.as_deref(),
        a.reasoning_parser.as_deref(),
    )?;
    status_line(true, &loaded);
    let (hidden, vocab_size) = (config.hidden, config.vocab_size);
    let limits = conn::Limits {
        max_connections: a.max_connections,
        header_timeout: Duration::from_secs(a.header_timeout),
        keep_alive_timeout: Duration::from_secs(a.keep_alive_timeout),
    };
    let max_model_len = engine.max_model_len();
    let metrics = Metrics::new(
        &model_id,
        &metrics::CacheInfo {
            num_blocks,
            prefix_caching: !a.engine.no_prefix_caching,
        },
    );
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        template_source: source,
        template,
        tooling,
        model_id,
        api_key: a.api_key.clone(),
        metrics,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        max_model_len,
        default_max_tokens: a.max_tokens,
        max_body_bytes: a.max_body_mib.saturating_mul(1 << 20),
        body_timeout: Duration::from_secs(a.body_timeout),
        ui: a.ui,
        hidden,
        vocab_size,
        cors,
        grammars: LazyGrammars::default(),
    });
    // Requests are parsed, templated and tokenised on the blocking pool: two threads kept for
    // the server's life (new threads would each bring a malloc arena, and the compute pool has
    // the cores anyway).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_http(state, &a.host, a.port, limits, a.shutdown_timeout))
}

async fn run_http(
    state: Shared,
    host: &str,
    port: u16,
    limits: conn::Limits,
    shutdown_timeout: u64,
) -> Result<()> {
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve --host {host}"))?
        .next()
        .with_context(|| format!("--host {host} resolves to no address"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is the port in use? pick another with --port)")
    })?;
    let local = listener.local_addr()?;
    let signals = shutdown_signal();
    status_line(true, &format!("listening on http://{local}"));
    let app = router(state.clone());
    let st = state.clone();
    let stop = async move {
        signals.await;
        status_line(
            true,
            &format!("shutting down: finishing running requests (at most {shutdown_timeout}s)"),
        );
    };
    conn::serve(
        listener,
        app,
        limits,
        stop,
        Duration::from_secs(shutdown_timeout),
        move || {
            status_line(true, "shutdown timeout: cancelling the remaining requests");
            st.engine.abort();
        },
    )
    .await;
    state.engine.abort();
    status_line(true, "stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C. The handlers are installed when this is called, not when the future is
/// first polled, so a signal that comes right after the listening line is not the default
/// action (death by the signal).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match &mut term {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match &mut int {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(generate::chat))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/responses", post(responses::handler))
        .route("/v1/embeddings", post(embeddings::handler))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/tokenizer_info", get(tokens::tokenizer_info))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let pages = match state.ui {
        true => Router::new().route("/", get(ui::page)),
        false => Router::new(),
    };
    let anthropic = Router::new()
        .route("/v1/messages", post(anthropic::messages_handler))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .merge(v1)
        .merge(anthropic)
        .merge(pages)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body,
        ))
        // Outside the body reader and routing: every error under /v1/messages (the handlers',
        // the key check's, a 404 or 405, the body's 408 and 413) in Anthropic's shape.
        .layer(axum::middleware::from_fn(anthropic::errors))
        .layer(axum::extract::DefaultBodyLimit::disable());
    let app = match &state.cors {
        Some(c) => app.layer(axum::middleware::from_fn_with_state(c.clone(), cors::layer)),
        None => app,
    };
    app.with_state(state)
}

/// Reads the request body whole, at most `--max-body-mib` within `--body-timeout`, answering
/// 413, 408 or 400 in OpenAI's shape; from then until its response is sent the request counts
/// as being served on its connection.
async fn read_body(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = st.max_body_bytes;
    let too_large = || {
        ApiError::invalid(
            "",
            format!("the request body is larger than {limit} bytes (see --max-body-mib)"),
        )
        .status(StatusCode::PAYLOAD_TOO_LARGE)
        .into_response()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        st.metrics.requests.with_label_values(&["invalid"]).inc();
        return too_large();
    }
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit));
    let bytes = match tokio::time::timeout(st.body_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            st.metrics.requests.with_label_values(&["invalid"]).inc();
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large();
            }
            return ApiError::invalid("", format!("the request body could not be read: {e}"))
                .into_response();
        }
        Err(_) => {
            st.metrics.requests.with_label_values(&["invalid"]).inc();
            return ApiError::invalid(
                "",
                format!(
                    "the request body did not arrive within {}s (see --body-timeout)",
                    st.body_timeout.as_secs()
                ),
            )
            .status(StatusCode::REQUEST_TIMEOUT)
            .into_response();
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    let busy = conn::Busy::start(&req);
    conn::hold_until_sent(next.run(req).await, busy)
}

/// The API key a request carries: `Authorization: Bearer KEY` (the scheme in any case, as
/// RFC 9110 has it) or `x-api-key: KEY` (what Anthropic's clients send).
fn given_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Compares in time independent of where the keys first differ.
fn same_key(given: &str, key: &str) -> bool {
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let ok = given_key(req.headers()).is_some_and(|given| same_key(given, key));
        if !ok {
            st.metrics.requests.with_label_values(&["invalid"]).inc();
            return ApiError::invalid(
                "",
                "a valid API key is required: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
            )
            .status(StatusCode::UNAUTHORIZED)
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

fn model_card(st: &AppState) -> serde_json::Value {
    json!({
        "id": st.model_id,
        "object": "model",
        "created": st.created,
        "owned_by": "supernode",
        "max_model_len": st.max_model_len,
    })
}

async fn models(State(st): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({ "object": "list", "data": [model_card(&st)] }))
}

async fn model_by_id(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if id != st.model_id {
        return Err(unknown_model(&st, &id));
    }
    Ok(Json(model_card(&st)))
}

fn unknown_model(st: &AppState, id: &str) -> ApiError {
    ApiError::not_found(format!(
        "the model `{id}` does not exist; this server serves `{}`",
        st.model_id
    ))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics_text(State(st): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(st.engine.stats()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::invalid(
        "",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::invalid(
        "",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .status(StatusCode::NOT_FOUND)
}

/// The machine's memory in MiB (`MemTotal`), where the system says.
fn memory_mib() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}
