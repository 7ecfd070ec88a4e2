//! Anthropic's Messages API, `POST /v1/messages` and `POST /v1/messages/count_tokens`, as a
//! translation onto chat completions: the request becomes a chat completions body
//! ([`to_chat`]: `system` first, `tool_use` blocks as assistant `tool_calls`, `tool_result`
//! blocks as `role: tool` messages, `tools` as function tools), runs through the same pipeline,
//! and its answer comes back as a message ([`message_of`]) or as Anthropic's event stream
//! ([`EventStream`]: `message_start`, `content_block_start`, `ping`, `content_block_delta`,
//! `content_block_stop`, `message_delta`, `message_stop`). Errors take Anthropic's shape
//! (`{"type":"error","error":{"type","message"}}`, [`errors`]).

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{self, ApiError, ApiResult, Fields};
use super::generate::{count_refused, start_chat, Started};
use super::translate::{
    answer_of, arguments_value, event_stream, function_tool, rename_param, stream_and_metadata,
    tool_call_message, End, Events, Piece, ToolCall,
};
use super::Shared;

/// Translates a Messages request into a chat completions body.
pub fn to_chat(body: &Map<String, Value>) -> ApiResult<Map<String, Value>> {
    let f = Fields(body);
    let mut out = Map::new();
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    out.insert("model".into(), json!(model));
    let max = f
        .int("max_tokens", 1, i64::from(u32::MAX))?
        .ok_or_else(|| ApiError::invalid("max_tokens", "`max_tokens` is required"))?;
    out.insert("max_tokens".into(), json!(max));
    out.insert("messages".into(), Value::Array(messages(&f)?));
    if let Some(t) = f.number("temperature", 0.0, 1.0)? {
        out.insert("temperature".into(), json!(t));
    }
    for name in ["top_p", "top_k"] {
        if let Some(v) = f.get(name) {
            out.insert(name.into(), v.clone());
        }
    }
    match f.get("stop_sequences") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if a.len() > api::MAX_STOP {
                return Err(ApiError::invalid(
                    "stop_sequences",
                    format!(
                        "`stop_sequences` may hold at most {} strings",
                        api::MAX_STOP
                    ),
                ));
            }
            out.insert("stop".into(), json!(a));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop_sequences",
                "`stop_sequences` must be a list of strings",
            ))
        }
    }
    stream_and_metadata(&f, &mut out)?;
    if let Some(t) = f.get("thinking") {
        if t["type"] != "disabled" {
            return Err(ApiError::invalid(
                "thinking",
                "`thinking` is not supported (only `{\"type\": \"disabled\"}`)",
            ));
        }
    }
    if let Some(tools) = f.get("tools") {
        out.insert("tools".into(), Value::Array(tools_of(tools)?));
    }
    if let Some(c) = f.get("tool_choice") {
        let (choice, parallel) = tool_choice(c)?;
        out.insert("tool_choice".into(), choice);
        if let Some(p) = parallel {
            out.insert("parallel_tool_calls".into(), json!(p));
        }
    }
    Ok(out)
}

fn system_text(v: &Value) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(i, b)| match (b["type"].as_str(), b["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(ApiError::invalid(
                    "system",
                    format!("`system[{i}]` must be a text block"),
                )),
            })
            .collect::<ApiResult<Vec<_>>>()
            .map(|t| t.join("\n")),
        _ => Err(ApiError::invalid(
            "system",
            "`system` must be a string or a list of text blocks",
        )),
    }
}

fn messages(f: &Fields) -> ApiResult<Vec<Value>> {
    let mut out = Vec::new();
    if let Some(s) = f.get("system") {
        out.push(json!({ "role": "system", "content": system_text(s)? }));
    }
    let list = match f.get("messages") {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must be a non-empty list of messages",
            ))
        }
    };
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m["role"].as_str() {
            Some(r @ ("user" | "assistant")) => r,
            _ => {
                return Err(ApiError::invalid(
                    &at,
                    format!("`{at}.role` must be `user` or `assistant`"),
                ))
            }
        };
        match &m["content"] {
            Value::String(s) => out.push(json!({ "role": role, "content": s })),
            Value::Array(blocks) => out.extend(blocks_to_chat(role, blocks, &at)?),
            _ => {
                return Err(ApiError::invalid(
                    &at,
                    format!("`{at}.content` must be a string or a list of content blocks"),
                ))
            }
        }
    }
    Ok(out)
}

/// One message's content blocks as chat messages: text (and tool calls) in one message of
/// `role`, tool results as `role: tool` messages before it.
fn blocks_to_chat(role: &str, blocks: &[Value], at: &str) -> ApiResult<Vec<Value>> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}.content[{j}]");
        let field = |name: &str| {
            b[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ApiError::invalid(&bat, format!("`{bat}.{name}` must be a string")))
        };
        match (b["type"].as_str(), role) {
            (Some("text"), _) => texts.push(field("text")?),
            (Some("tool_use"), "assistant") => calls.push(ToolCall {
                id: field("id")?,
                name: field("name")?,
                arguments: b.get("input").unwrap_or(&json!({})).to_string(),
            }),
            (Some("tool_result"), "user") => {
                let content = match &b["content"] {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    Value::Array(parts) => parts
                        .iter()
                        .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                            (Some("text"), Some(t)) => Ok(t.to_string()),
                            _ => Err(ApiError::invalid(
                                &bat,
                                format!("`{bat}.content` may hold only text blocks"),
                            )),
                        })
                        .collect::<ApiResult<Vec<_>>>()?
                        .join("\n"),
                    _ => {
                        return Err(ApiError::invalid(
                            &bat,
                            format!("`{bat}.content` must be a string or a list of text blocks"),
                        ))
                    }
                };
                let content = if b["is_error"] == true {
                    format!("Error: {content}")
                } else {
                    content
                };
                results.push(json!({
                    "role": "tool", "tool_call_id": field("tool_use_id")?, "content": content,
                }));
            }
            (Some(t @ ("tool_use" | "tool_result")), _) => {
                return Err(ApiError::invalid(
                    &bat,
                    format!("`{t}` blocks are not allowed in a `{role}` message"),
                ))
            }
            (Some(other), _) => {
                return Err(ApiError::invalid(
                    &bat,
                    format!("content blocks of type `{other}` are not supported"),
                ))
            }
            (None, _) => return Err(ApiError::invalid(&bat, format!("`{bat}.type` is required"))),
        }
    }
    let text = texts.join("\n");
    let mut out = results;
    if !calls.is_empty() {
        out.push(tool_call_message(
            (!text.is_empty()).then_some(text),
            &calls,
        ));
    } else if !text.is_empty() || out.is_empty() {
        out.push(json!({ "role": role, "content": text }));
    }
    Ok(out)
}

fn tools_of(v: &Value) -> ApiResult<Vec<Value>> {
    let Value::Array(tools) = v else {
        return Err(ApiError::invalid(
            "tools",
            "`tools` must be a list of tools",
        ));
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t["name"].as_str().ok_or_else(|| {
                ApiError::invalid("tools", format!("`tools[{i}].name` must be a string"))
            })?;
            if t.get("type").is_some_and(|ty| ty != "custom") {
                return Err(ApiError::invalid(
                    "tools",
                    format!("`tools[{i}]`: only custom (client) tools are supported"),
                ));
            }
            Ok(function_tool(
                name,
                t.get("description"),
                t.get("input_schema"),
            ))
        })
        .collect()
}

/// Anthropic's `tool_choice` as chat completions' `tool_choice` and `parallel_tool_calls`.
fn tool_choice(v: &Value) -> ApiResult<(Value, Option<bool>)> {
    let parallel = v["disable_parallel_tool_use"].as_bool().map(|d| !d);
    let choice = match (v["type"].as_str(), v["name"].as_str()) {
        (Some("auto"), _) => json!("auto"),
        (Some("any"), _) => json!("required"),
        (Some("none"), _) => json!("none"),
        (Some("tool"), Some(name)) => json!({ "type": "function", "function": { "name": name } }),
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` must be {\"type\": \"auto\" | \"any\" | \"none\"} or \
                 {\"type\": \"tool\", \"name\": ...}",
            ))
        }
    };
    Ok((choice, parallel))
}

fn stop_fields(end: &End) -> (&'static str, Value) {
    match end {
        End::StopString(s) => ("stop_sequence", json!(s)),
        End::Length => ("max_tokens", Value::Null),
        End::ToolCalls => ("tool_use", Value::Null),
        End::Stop | End::Cancelled => ("end_turn", Value::Null),
    }
}

fn message_id(chat_id: &str) -> String {
    format!("msg_{}", chat_id.trim_start_matches("chatcmpl-"))
}

/// A chat completion body as a Messages response.
pub fn message_of(chat: &Value, id: &str, model: &str) -> Value {
    let a = answer_of(chat);
    let mut content = Vec::new();
    if !a.text.is_empty() {
        content.push(json!({ "type": "text", "text": a.text }));
    }
    for c in &a.tool_calls {
        content.push(json!({
            "type": "tool_use", "id": c.id, "name": c.name, "input": arguments_value(&c.arguments),
        }));
    }
    let (reason, seq) = stop_fields(&a.end);
    json!({
        "id": message_id(id), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": reason, "stop_sequence": seq,
        "usage": { "input_tokens": a.usage.prompt, "output_tokens": a.usage.completion },
    })
}

/// The content block open in a stream.
#[derive(Clone, Copy, PartialEq)]
enum Open {
    None,
    Text,
    Tool(usize),
}

/// Turns the chat pipeline's stream pieces into Anthropic's events, `(name, data)`.
pub struct EventStream {
    id: String,
    model: String,
    input_tokens: u64,
    open: Open,
    /// Content blocks started so far.
    blocks: usize,
    pinged: bool,
    end: Option<End>,
    output_tokens: u64,
    /// An `error` event was sent: nothing follows.
    failed: bool,
}

impl EventStream {
    pub fn new(chat_id: &str, model: &str, input_tokens: u64) -> EventStream {
        EventStream {
            id: message_id(chat_id),
            model: model.to_string(),
            input_tokens,
            open: Open::None,
            blocks: 0,
            pinged: false,
            end: None,
            output_tokens: 0,
            failed: false,
        }
    }

    /// The first event.
    pub fn start(&self) -> (&'static str, Value) {
        (
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": self.input_tokens, "output_tokens": 0 },
            }}),
        )
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if self.open != Open::None {
            let index = self.blocks - 1;
            out.push((
                "content_block_stop",
                json!({ "type": "content_block_stop", "index": index }),
            ));
            self.open = Open::None;
        }
    }

    fn open_block(&mut self, kind: Open, block: Value, out: &mut Vec<(&'static str, Value)>) {
        self.close(out);
        out.push((
            "content_block_start",
            json!({ "type": "content_block_start", "index": self.blocks, "content_block": block }),
        ));
        self.blocks += 1;
        self.open = kind;
        if !self.pinged {
            self.pinged = true;
            out.push(("ping", json!({ "type": "ping" })));
        }
    }
}

impl Events for EventStream {
    /// The events of one piece.
    fn on(&mut self, piece: Piece) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        match piece {
            Piece::Text(t) => {
                if self.open != Open::Text {
                    self.open_block(Open::Text, json!({ "type": "text", "text": "" }), &mut out);
                }
                out.push((
                    "content_block_delta",
                    json!({
                        "type": "content_block_delta", "index": self.blocks - 1,
                        "delta": { "type": "text_delta", "text": t },
                    }),
                ));
            }
            Piece::ToolStart { index, id, name } => {
                let block = json!({ "type": "tool_use", "id": id, "name": name, "input": {} });
                self.open_block(Open::Tool(index), block, &mut out);
            }
            Piece::ToolArgs { index, args } => {
                if self.open == Open::Tool(index) {
                    out.push((
                        "content_block_delta",
                        json!({
                            "type": "content_block_delta", "index": self.blocks - 1,
                            "delta": { "type": "input_json_delta", "partial_json": args },
                        }),
                    ));
                }
            }
            Piece::End(e) => self.end = Some(e),
            Piece::Usage(u) => self.output_tokens = u.completion,
            Piece::Error(m) => {
                self.failed = true;
                out.push((
                    "error",
                    json!({ "type": "error", "error": { "type": "api_error", "message": m } }),
                ))
            }
        }
        out
    }

    /// The closing events.
    fn finish(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        self.close(&mut out);
        if !self.pinged {
            out.push(("ping", json!({ "type": "ping" })));
        }
        let (reason, seq) = stop_fields(self.end.as_ref().unwrap_or(&End::Stop));
        out.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": { "stop_reason": reason, "stop_sequence": seq },
                "usage": { "output_tokens": self.output_tokens },
            }),
        ));
        out.push(("message_stop", json!({ "type": "message_stop" })));
        out
    }
}

/// Parses and translates a request body, then starts it (on the blocking pool).
async fn start(st: &Shared, body: Bytes) -> ApiResult<(Started, bool)> {
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || {
        let chat = to_chat(&api::parse_body(&body)?)?;
        let stream = chat.get("stream") == Some(&json!(true));
        start_chat(&st2, &chat)
            .map(|s| (s, stream))
            .map_err(|e| rename_param(e, "stop", "stop_sequences"))
    })
    .await
    .unwrap_or_else(|e| {
        Err(ApiError::internal(format!(
            "preparing the request failed: {e}"
        )))
    });
    if let Err(e) = &r {
        count_refused(st, e);
    }
    r
}

pub async fn messages_handler(State(st): State<Shared>, body: Bytes) -> Response {
    let (started, stream) = match start(&st, body).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let model = st.model_id.clone();
    if !stream {
        let id = started.id().to_string();
        return match started.body_json().await {
            Ok(chat) => Json(message_of(&chat, &id, &model)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let conv = EventStream::new(started.id(), &model, started.prompt_tokens() as u64);
    let first = vec![conv.start()];
    event_stream(started, conv, first)
}

pub async fn count_tokens(State(st): State<Shared>, body: Bytes) -> Response {
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || -> ApiResult<usize> {
        let mut b = api::parse_body(&body)?;
        // `max_tokens` is not part of a count_tokens request.
        b.insert("max_tokens".into(), json!(1));
        let chat = to_chat(&b)?;
        let req = api::chat_request(&chat)?;
        if req.spec.model != st2.model_id {
            return Err(super::unknown_model(&st2, &req.spec.model));
        }
        let (tok, tmpl) = match (&st2.tokenizer, &st2.template) {
            (Some(t), Some(c)) => (t, c),
            _ => {
                return Err(ApiError::invalid(
                    "messages",
                    "this model has no tokenizer or no chat template",
                ))
            }
        };
        tmpl.prompt_with(tok, &req.messages, &req.tools.extras)
            .map(|(_, p)| p.len())
            .map_err(|e| ApiError::invalid("messages", e.to_string()))
    })
    .await
    .unwrap_or_else(|e| Err(ApiError::internal(format!("counting failed: {e}"))));
    match r {
        Ok(n) => Json(json!({ "input_tokens": n })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Anthropic's error type for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Middleware of the whole app that rewrites every error answer under `/v1/messages` (from the
/// handlers, the API key check, routing or the body reader) from OpenAI's shape into
/// Anthropic's; other paths pass through.
pub async fn errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path != "/v1/messages" && !path.starts_with("/v1/messages/") {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match http_body_util::BodyExt::collect(body).await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let out =
        json!({ "type": "error", "error": { "type": error_type(status), "message": message } });
    let bytes = out.to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
#[path = "anthropic_tests.rs"]
mod tests;
