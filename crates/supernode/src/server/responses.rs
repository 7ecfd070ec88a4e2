//! OpenAI's Responses API, `POST /v1/responses`, stateless, as a translation onto chat
//! completions: `instructions` and the `input` items (messages with `input_text` /
//! `output_text` parts, `function_call`, `function_call_output`) become chat messages
//! ([`to_chat`]), the answer comes back as `output` items ([`response_of`]) or as the
//! Responses event stream ([`EventStream`]: `response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`,
//! …, `response.completed`, each with its `sequence_number`). Nothing is stored: `store` is
//! answered `false` and `previous_response_id` is refused.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{self, ApiError, ApiResult, Fields};
use super::generate::{count_refused, start_chat, Started};
use super::translate::{
    answer_of, event_stream, function_tool, rename_param, stream_and_metadata, tool_call_message,
    End, Events, Piece, ToolCall, Usage,
};
use super::Shared;

/// Translates a Responses request into a chat completions body.
pub fn to_chat(body: &Map<String, Value>) -> ApiResult<Map<String, Value>> {
    let f = Fields(body);
    if f.get("previous_response_id").is_some() {
        return Err(ApiError::invalid(
            "previous_response_id",
            "this server is stateless and stores no responses: send the whole conversation in \
             `input` instead of `previous_response_id`",
        ));
    }
    if f.get("conversation").is_some() {
        return Err(ApiError::invalid(
            "conversation",
            "this server is stateless and keeps no conversations: send the whole conversation \
             in `input`",
        ));
    }
    f.bool("store")?;
    f.bool("background")?.filter(|&b| b).map_or(Ok(()), |_| {
        Err(ApiError::invalid(
            "background",
            "`background` is not supported",
        ))
    })?;
    let mut out = Map::new();
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    out.insert("model".into(), json!(model));
    let mut messages = Vec::new();
    if let Some(i) = f.string("instructions")? {
        messages.push(json!({ "role": "system", "content": i }));
    }
    match f.get("input") {
        None => return Err(ApiError::invalid("input", "`input` is required")),
        Some(Value::String(s)) => messages.push(json!({ "role": "user", "content": s })),
        Some(Value::Array(items)) if !items.is_empty() => messages.extend(input_items(items)?),
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string or a non-empty list of input items",
            ))
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(m) = f.int("max_output_tokens", 1, i64::from(u32::MAX))? {
        out.insert("max_tokens".into(), json!(m));
    }
    for name in ["temperature", "top_p", "parallel_tool_calls"] {
        if let Some(v) = f.get(name) {
            out.insert(name.into(), v.clone());
        }
    }
    stream_and_metadata(&f, &mut out)?;
    if let Some(tools) = f.get("tools") {
        out.insert("tools".into(), Value::Array(tools_of(tools)?));
    }
    if let Some(c) = f.get("tool_choice") {
        out.insert("tool_choice".into(), tool_choice(c)?);
    }
    if let Some(fmt) = f.get("text").and_then(|t| t.get("format")) {
        if fmt["type"] != "text" {
            out.insert("response_format".into(), response_format(fmt)?);
        }
    }
    Ok(out)
}

/// The text of a message item's content: a string or a list of text parts.
fn item_text(content: &Value, at: &str) -> ApiResult<String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("input_text" | "output_text" | "text"), Some(t)) => Ok(t.to_string()),
                (Some(other), _) => Err(ApiError::invalid(
                    "input",
                    format!("`{at}.content[{j}]`: content of type `{other}` is not supported (only input_text and output_text)"),
                )),
                (None, _) => Err(ApiError::invalid(
                    "input",
                    format!("`{at}.content[{j}].type` is required"),
                )),
            })
            .collect::<ApiResult<Vec<_>>>()
            .map(|t| t.join("\n")),
        _ => Err(ApiError::invalid(
            "input",
            format!("`{at}.content` must be a string or a list of content parts"),
        )),
    }
}

fn input_items(items: &[Value]) -> ApiResult<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let field = |name: &str| {
            item[name].as_str().map(str::to_string).ok_or_else(|| {
                ApiError::invalid("input", format!("`{at}.{name}` must be a string"))
            })
        };
        let kind = item["type"]
            .as_str()
            .unwrap_or(if item.get("role").is_some() {
                "message"
            } else {
                ""
            });
        match kind {
            "message" => {
                let role = match item["role"].as_str() {
                    Some(r @ ("user" | "assistant" | "system")) => r,
                    Some("developer") => "system",
                    _ => {
                        return Err(ApiError::invalid(
                            "input",
                            format!("`{at}.role` must be user, assistant, system or developer"),
                        ))
                    }
                };
                out.push(json!({ "role": role, "content": item_text(&item["content"], &at)? }));
            }
            "function_call" => {
                let call = ToolCall {
                    id: field("call_id")?,
                    name: field("name")?,
                    arguments: field("arguments")?,
                };
                // Consecutive calls are one assistant turn.
                match out.last_mut() {
                    Some(last) if last.get("tool_calls").is_some() => {
                        let m = tool_call_message(None, std::slice::from_ref(&call));
                        if let (Some(a), Some(b)) = (
                            last["tool_calls"].as_array_mut(),
                            m["tool_calls"].as_array(),
                        ) {
                            a.extend(b.iter().cloned());
                        }
                    }
                    _ => out.push(tool_call_message(None, &[call])),
                }
            }
            "function_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    v @ Value::Array(_) => item_text(v, &at)?,
                    _ => {
                        return Err(ApiError::invalid(
                            "input",
                            format!("`{at}.output` must be a string"),
                        ))
                    }
                };
                out.push(
                    json!({ "role": "tool", "tool_call_id": field("call_id")?, "content": output }),
                );
            }
            // Reasoning items carry nothing a model without reasoning output can use.
            "reasoning" => {}
            "" => {
                return Err(ApiError::invalid(
                    "input",
                    format!("`{at}.type` is required"),
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    "input",
                    format!("`{at}`: input items of type `{other}` are not supported"),
                ))
            }
        }
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
        .map(|(i, t)| match (t["type"].as_str(), t["name"].as_str()) {
            (Some("function"), Some(name)) => {
                let mut tool = function_tool(name, t.get("description"), t.get("parameters"));
                if let Some(s) = t.get("strict").filter(|s| !s.is_null()) {
                    tool["function"]["strict"] = s.clone();
                }
                Ok(tool)
            }
            _ => Err(ApiError::invalid(
                "tools",
                format!("`tools[{i}]`: only function tools (with a `name`) are supported"),
            )),
        })
        .collect()
}

fn tool_choice(v: &Value) -> ApiResult<Value> {
    match v {
        Value::String(s) if ["auto", "none", "required"].contains(&s.as_str()) => Ok(v.clone()),
        Value::Object(o) if o.get("type") == Some(&json!("function")) => match o.get("name") {
            Some(Value::String(n)) => Ok(json!({ "type": "function", "function": { "name": n } })),
            _ => Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice.name` must be a string",
            )),
        },
        _ => Err(ApiError::invalid(
            "tool_choice",
            "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// `text.format` as chat completions' `response_format`.
fn response_format(fmt: &Value) -> ApiResult<Value> {
    match fmt["type"].as_str() {
        Some("json_object") => Ok(json!({ "type": "json_object" })),
        Some("json_schema") => {
            let mut s = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = fmt.get(k) {
                    s.insert(k.into(), v.clone());
                }
            }
            Ok(json!({ "type": "json_schema", "json_schema": s }))
        }
        _ => Err(ApiError::invalid(
            "text",
            "`text.format.type` must be text, json_object or json_schema",
        )),
    }
}

/// The request's settings echoed in a response object.
#[derive(Clone)]
pub struct Echo {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fields: Map<String, Value>,
}

impl Echo {
    pub fn new(chat_id: &str, model: &str, body: &Map<String, Value>) -> Echo {
        let mut fields = Map::new();
        let get = |k: &str, d: Value| body.get(k).filter(|v| !v.is_null()).cloned().unwrap_or(d);
        fields.insert("instructions".into(), get("instructions", Value::Null));
        fields.insert(
            "max_output_tokens".into(),
            get("max_output_tokens", Value::Null),
        );
        fields.insert("temperature".into(), get("temperature", json!(1.0)));
        fields.insert("top_p".into(), get("top_p", json!(1.0)));
        fields.insert("tools".into(), get("tools", json!([])));
        fields.insert("tool_choice".into(), get("tool_choice", json!("auto")));
        fields.insert(
            "parallel_tool_calls".into(),
            get("parallel_tool_calls", json!(true)),
        );
        fields.insert("metadata".into(), get("metadata", json!({})));
        fields.insert(
            "text".into(),
            get("text", json!({ "format": { "type": "text" } })),
        );
        fields.insert("user".into(), get("user", Value::Null));
        Echo {
            id: format!("resp_{}", chat_id.trim_start_matches("chatcmpl-")),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: model.to_string(),
            fields,
        }
    }

    /// A response object with `output` and, once finished, `usage`.
    fn response(
        &self,
        status: &str,
        end: Option<&End>,
        output: Vec<Value>,
        usage: Option<Usage>,
    ) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "error": null,
            "incomplete_details": match end {
                Some(End::Length) => json!({ "reason": "max_output_tokens" }),
                _ => Value::Null,
            },
            "previous_response_id": null, "reasoning": null, "store": false,
            "truncation": "disabled",
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt, "input_tokens_details": { "cached_tokens": u.cached },
                "output_tokens": u.completion, "output_tokens_details": { "reasoning_tokens": 0 },
                "total_tokens": u.prompt + u.completion,
            })),
        });
        for (k, v) in &self.fields {
            r[k] = v.clone();
        }
        r
    }
}

fn status_of(end: &End) -> &'static str {
    match end {
        End::Length | End::Cancelled => "incomplete",
        _ => "completed",
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{ "type": "output_text", "text": text, "annotations": [], "logprobs": [] }],
    })
}

fn call_item(call: &ToolCall, status: &str) -> Value {
    json!({
        "type": "function_call", "id": format!("fc_{}", call.id), "call_id": call.id,
        "name": call.name, "arguments": call.arguments, "status": status,
    })
}

/// A chat completion body as a response object.
pub fn response_of(chat: &Value, echo: &Echo) -> Value {
    let a = answer_of(chat);
    let mut output = Vec::new();
    if !a.text.is_empty() || a.tool_calls.is_empty() {
        output.push(message_item(
            &format!("msg_{}", &echo.id[5..]),
            &a.text,
            "completed",
        ));
    }
    output.extend(a.tool_calls.iter().map(|c| call_item(c, "completed")));
    echo.response(status_of(&a.end), Some(&a.end), output, Some(a.usage))
}

/// The item open in a stream.
enum Open {
    None,
    Text(String),
    Call(usize, ToolCall),
}

/// Turns the chat pipeline's stream pieces into the Responses events, `(type, data)`, each
/// numbered.
pub struct EventStream {
    echo: Echo,
    seq: u64,
    open: Open,
    /// Finished output items.
    done: Vec<Value>,
    end: Option<End>,
    usage: Usage,
    /// `response.failed` was sent: nothing follows.
    failed: bool,
}

impl EventStream {
    pub fn new(echo: Echo) -> EventStream {
        EventStream {
            echo,
            seq: 0,
            open: Open::None,
            done: Vec::new(),
            end: None,
            usage: Usage::default(),
            failed: false,
        }
    }

    fn push(&mut self, out: &mut Vec<(&'static str, Value)>, kind: &'static str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push((kind, data));
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        let r = self.echo.response("in_progress", None, Vec::new(), None);
        self.push(&mut out, "response.created", json!({ "response": r }));
        self.push(&mut out, "response.in_progress", json!({ "response": r }));
        out
    }

    fn message_id(&self) -> String {
        format!("msg_{}_{}", &self.echo.id[5..], self.done.len())
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        let index = self.done.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Text(text) => {
                let id = self.message_id();
                let part = json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] });
                self.push(out, "response.output_text.done", json!({
                    "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": [],
                }));
                self.push(
                    out,
                    "response.content_part.done",
                    json!({
                        "item_id": id, "output_index": index, "content_index": 0, "part": part,
                    }),
                );
                let item = message_item(&id, &text, "completed");
                self.push(
                    out,
                    "response.output_item.done",
                    json!({ "output_index": index, "item": item }),
                );
                self.done.push(item);
            }
            Open::Call(_, call) => {
                let item = call_item(&call, "completed");
                self.push(
                    out,
                    "response.function_call_arguments.done",
                    json!({
                        "item_id": item["id"], "output_index": index, "name": call.name,
                        "arguments": call.arguments,
                    }),
                );
                self.push(
                    out,
                    "response.output_item.done",
                    json!({ "output_index": index, "item": item }),
                );
                self.done.push(item);
            }
        }
    }
}

impl Events for EventStream {
    /// The events of one piece.
    fn on(&mut self, piece: Piece) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        let index = self.done.len();
        match piece {
            Piece::Text(t) => {
                if !matches!(self.open, Open::Text(_)) {
                    self.close(&mut out);
                    let id = self.message_id();
                    let item = json!({ "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": [] });
                    let index = self.done.len();
                    self.push(
                        &mut out,
                        "response.output_item.added",
                        json!({ "output_index": index, "item": item }),
                    );
                    self.push(&mut out, "response.content_part.added", json!({
                        "item_id": id, "output_index": index, "content_index": 0,
                        "part": { "type": "output_text", "text": "", "annotations": [], "logprobs": [] },
                    }));
                    self.open = Open::Text(String::new());
                }
                let id = self.message_id();
                let index = self.done.len();
                if let Open::Text(s) = &mut self.open {
                    s.push_str(&t);
                }
                self.push(&mut out, "response.output_text.delta", json!({
                    "item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": [],
                }));
            }
            Piece::ToolStart {
                index: call,
                id,
                name,
            } => {
                self.close(&mut out);
                let c = ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                };
                let item = call_item(&c, "in_progress");
                let index = self.done.len();
                self.push(
                    &mut out,
                    "response.output_item.added",
                    json!({ "output_index": index, "item": item }),
                );
                self.open = Open::Call(call, c);
            }
            Piece::ToolArgs { index: call, args } => {
                let item_id = match &mut self.open {
                    Open::Call(open, c) if *open == call => {
                        c.arguments.push_str(&args);
                        Some(format!("fc_{}", c.id))
                    }
                    _ => None,
                };
                if let Some(item_id) = item_id {
                    self.push(
                        &mut out,
                        "response.function_call_arguments.delta",
                        json!({
                            "item_id": item_id, "output_index": index, "delta": args,
                        }),
                    );
                }
            }
            Piece::End(e) => self.end = Some(e),
            Piece::Usage(u) => self.usage = u,
            Piece::Error(m) => {
                self.failed = true;
                let mut r = self.echo.response("failed", None, self.done.clone(), None);
                r["error"] = json!({ "code": "server_error", "message": m });
                self.push(&mut out, "response.failed", json!({ "response": r }));
            }
        }
        out
    }

    /// The closing events: the open item's, then `response.completed` (or
    /// `response.incomplete`).
    fn finish(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        self.close(&mut out);
        let end = self.end.clone().unwrap_or(End::Stop);
        let status = status_of(&end);
        let r = self
            .echo
            .response(status, Some(&end), self.done.clone(), Some(self.usage));
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.push(&mut out, kind, json!({ "response": r }));
        out
    }
}

pub async fn handler(State(st): State<Shared>, body: Bytes) -> Response {
    let st2 = st.clone();
    let r =
        tokio::task::spawn_blocking(move || -> ApiResult<(Started, bool, Map<String, Value>)> {
            let body = api::parse_body(&body)?;
            let chat = to_chat(&body)?;
            let stream = chat.get("stream") == Some(&json!(true));
            start_chat(&st2, &chat)
                .map(|s| (s, stream, body))
                .map_err(|e| {
                    let e = rename_param(e, "max_tokens", "max_output_tokens");
                    rename_param(e, "messages", "input")
                })
        })
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::internal(format!(
                "preparing the request failed: {e}"
            )))
        });
    let (started, stream, body) = match r {
        Ok(x) => x,
        Err(e) => {
            count_refused(&st, &e);
            return e.into_response();
        }
    };
    let echo = Echo::new(started.id(), &st.model_id, &body);
    if !stream {
        return match started.body_json().await {
            Ok(chat) => Json(response_of(&chat, &echo)).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let mut conv = EventStream::new(echo);
    let first = conv.start();
    event_stream(started, conv, first)
}

#[cfg(test)]
#[path = "responses_tests.rs"]
mod tests;
