//! What the APIs translated onto chat completions (Anthropic's `/v1/messages`, OpenAI's
//! `/v1/responses`) share: their requests become a chat completions body (messages with
//! OpenAI-style `tool_calls` and `role: tool` results, function-tool definitions), run through
//! the chat pipeline, and its answer — a chat completion body or stream chunks — is read back
//! here into plain parts each API shapes in its own way.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::api::{ApiError, ApiResult, Fields};
use super::generate::Started;

/// One tool call of an answer, as chat completions gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// Token counts of an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

/// Why an answer ended.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// An end-of-generation token.
    Stop,
    /// A stop string (which one).
    StopString(String),
    /// The token limit or the end of the context.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The request was cancelled.
    Cancelled,
}

impl End {
    fn from_chat(reason: &str, stop_reason: Option<&Value>) -> End {
        match (reason, stop_reason.and_then(Value::as_str)) {
            ("stop", Some(s)) => End::StopString(s.to_string()),
            ("length", _) => End::Length,
            ("tool_calls" | "function_call", _) => End::ToolCalls,
            ("abort", _) => End::Cancelled,
            _ => End::Stop,
        }
    }
}

/// A whole answer: choice 0 of a chat completion body.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub end: End,
    pub usage: Usage,
}

fn usage_of(v: &Value) -> Usage {
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    Usage {
        prompt: n(&v["prompt_tokens"]),
        completion: n(&v["completion_tokens"]),
        cached: n(&v["prompt_tokens_details"]["cached_tokens"]),
    }
}

fn tool_call_of(v: &Value) -> ToolCall {
    let s = |x: &Value| x.as_str().unwrap_or_default().to_string();
    ToolCall {
        id: s(&v["id"]),
        name: s(&v["function"]["name"]),
        arguments: s(&v["function"]["arguments"]),
    }
}

/// Reads a chat completion body.
pub fn answer_of(body: &Value) -> Answer {
    let choice = &body["choices"][0];
    let msg = &choice["message"];
    Answer {
        text: msg["content"].as_str().unwrap_or_default().to_string(),
        tool_calls: msg["tool_calls"]
            .as_array()
            .map(|a| a.iter().map(tool_call_of).collect())
            .unwrap_or_default(),
        end: End::from_chat(
            choice["finish_reason"].as_str().unwrap_or("stop"),
            choice.get("stop_reason"),
        ),
        usage: usage_of(&body["usage"]),
    }
}

/// One piece of a streamed answer, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    /// A tool call begins (its `index` among the answer's calls).
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the arguments of tool call `index`.
    ToolArgs {
        index: usize,
        args: String,
    },
    End(End),
    Usage(Usage),
    Error(String),
}

/// Reads one chat completion chunk (or an error object sent in the stream).
pub fn pieces_of(chunk: &Value) -> Vec<Piece> {
    let mut out = Vec::new();
    if let Some(e) = chunk.get("error") {
        out.push(Piece::Error(
            e["message"]
                .as_str()
                .unwrap_or("generation failed")
                .to_string(),
        ));
        return out;
    }
    if let Some(choice) = chunk["choices"].as_array().and_then(|a| a.first()) {
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            out.push(Piece::Text(t.to_string()));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0) as usize;
            if let Some(name) = call["function"]["name"].as_str() {
                out.push(Piece::ToolStart {
                    index,
                    id: call["id"].as_str().unwrap_or_default().to_string(),
                    name: name.to_string(),
                });
            }
            if let Some(a) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                out.push(Piece::ToolArgs {
                    index,
                    args: a.to_string(),
                });
            }
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            out.push(Piece::End(End::from_chat(r, choice.get("stop_reason"))));
        }
    }
    if chunk.get("usage").is_some_and(|u| !u.is_null()) {
        out.push(Piece::Usage(usage_of(&chunk["usage"])));
    }
    out
}

/// A function tool in chat completions' shape.
pub fn function_tool(name: &str, description: Option<&Value>, parameters: Option<&Value>) -> Value {
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    if let Some(d) = description.filter(|d| !d.is_null()) {
        f.insert("description".into(), d.clone());
    }
    if let Some(p) = parameters.filter(|p| !p.is_null()) {
        f.insert("parameters".into(), p.clone());
    }
    json!({ "type": "function", "function": f })
}

/// An assistant message carrying tool calls, in chat completions' shape.
pub fn tool_call_message(text: Option<String>, calls: &[ToolCall]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            json!({
                "id": c.id, "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            })
        })
        .collect();
    json!({ "role": "assistant", "content": text, "tool_calls": calls })
}

/// An error of the chat pipeline in the words of the translated API: its parameter `from`
/// becomes `to`, in `param` and in the message.
pub fn rename_param(mut e: ApiError, from: &str, to: &str) -> ApiError {
    if e.param.as_deref() == Some(from) {
        e.param = Some(to.to_string());
    }
    e.message = e.message.replace(&format!("`{from}`"), &format!("`{to}`"));
    e
}

/// The arguments of a tool call as a JSON value: the parsed text, or, if the model wrote
/// something that does not parse, the text as a string (so that nothing is lost).
pub fn arguments_value(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| json!(arguments))
}

/// The translated APIs' `stream` (asking for usage in the last chunk, which their closing events
/// need) and `metadata` (an object, checked and not passed on).
pub fn stream_and_metadata(f: &Fields, out: &mut Map<String, Value>) -> ApiResult<()> {
    if let Some(s) = f.bool("stream")? {
        out.insert("stream".into(), json!(s));
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    match f.get("metadata") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::invalid(
            "metadata",
            "`metadata` must be an object",
        )),
    }
}

/// A JSON object literal as a map (the translation tests' requests).
#[cfg(test)]
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object: {v}"),
    }
}

/// A translated API's stream: the events that each piece of the chat stream becomes, and those
/// that close it.
pub trait Events: Send + 'static {
    fn on(&mut self, piece: Piece) -> Vec<(&'static str, Value)>;
    fn finish(&mut self) -> Vec<(&'static str, Value)>;
}

/// The SSE answer of a translated API: `first`, then the events of every piece of the chat
/// stream `started`, then the closing ones.
pub fn event_stream<E: Events>(
    started: Started,
    conv: E,
    first: Vec<(&'static str, Value)>,
) -> Response {
    let events = futures_util::stream::unfold(
        (started, conv, first, false),
        |(mut s, mut conv, mut out, mut ended)| async move {
            loop {
                if !out.is_empty() {
                    let (name, data) = out.remove(0);
                    let ev = SseEvent::default().event(name).data(data.to_string());
                    return Some((Ok::<_, Infallible>(ev), (s, conv, out, ended)));
                }
                if ended {
                    return None;
                }
                match s.next_chunks().await {
                    Some(chunks) => {
                        for c in &chunks {
                            for p in pieces_of(c) {
                                out.extend(conv.on(p));
                            }
                        }
                    }
                    None => {
                        out = conv.finish();
                        ended = true;
                    }
                }
            }
        },
    );
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_are_read() {
        let body = json!({
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "hi",
                "tool_calls": [{"id": "c1", "type": "function",
                                "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                      "prompt_tokens_details": {"cached_tokens": 2}},
        });
        let a = answer_of(&body);
        assert_eq!(a.text, "hi");
        assert_eq!(
            a.tool_calls,
            vec![ToolCall {
                id: "c1".into(),
                name: "f".into(),
                arguments: "{\"a\":1}".into()
            }]
        );
        assert_eq!(a.end, End::ToolCalls);
        assert_eq!(
            a.usage,
            Usage {
                prompt: 5,
                completion: 3,
                cached: 2
            }
        );
        let stop = json!({"choices": [{"finish_reason": "stop", "stop_reason": "END",
                                       "message": {"content": "x"}}], "usage": {}});
        assert_eq!(answer_of(&stop).end, End::StopString("END".into()));
        let eos = json!({"choices": [{"finish_reason": "stop", "stop_reason": null,
                                      "message": {"content": "x"}}], "usage": {}});
        assert_eq!(answer_of(&eos).end, End::Stop);
        let len = json!({"choices": [{"finish_reason": "length", "message": {"content": ""}}]});
        assert_eq!(answer_of(&len).end, End::Length);
    }

    #[test]
    fn stream_chunks_are_read() {
        let text =
            json!({"choices": [{"index": 0, "delta": {"content": "ab"}, "finish_reason": null}]});
        assert_eq!(pieces_of(&text), vec![Piece::Text("ab".into())]);
        let role =
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]});
        assert_eq!(pieces_of(&role), vec![]);
        let tool = json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\""}}
        ]}}]});
        assert_eq!(
            pieces_of(&tool),
            vec![
                Piece::ToolStart {
                    index: 1,
                    id: "c".into(),
                    name: "f".into()
                },
                Piece::ToolArgs {
                    index: 1,
                    args: "{\"x\"".into()
                }
            ]
        );
        let more = json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "function": {"arguments": ": 2}"}}]}}]});
        assert_eq!(
            pieces_of(&more),
            vec![Piece::ToolArgs {
                index: 1,
                args: ": 2}".into()
            }]
        );
        let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "Q"}],
                         "usage": null});
        assert_eq!(
            pieces_of(&end),
            vec![Piece::End(End::StopString("Q".into()))]
        );
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}});
        assert_eq!(
            pieces_of(&usage),
            vec![Piece::Usage(Usage {
                prompt: 4,
                completion: 2,
                cached: 0
            })]
        );
        let err = json!({"error": {"message": "boom", "type": "server_error"}});
        assert_eq!(pieces_of(&err), vec![Piece::Error("boom".into())]);
    }

    #[test]
    fn tools_and_calls_are_written_in_chat_shape() {
        let t = function_tool(
            "f",
            Some(&json!("does f")),
            Some(&json!({"type": "object"})),
        );
        assert_eq!(
            t,
            json!({"type": "function", "function": {"name": "f", "description": "does f",
                                                     "parameters": {"type": "object"}}})
        );
        assert_eq!(
            function_tool("g", None, None),
            json!({"type": "function", "function": {"name": "g"}})
        );
        let m = tool_call_message(
            None,
            &[ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
        );
        assert_eq!(
            m,
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        assert_eq!(arguments_value("{\"a\": [1]}"), json!({"a": [1]}));
        assert_eq!(arguments_value(""), json!({}));
        assert_eq!(arguments_value("{oops"), json!("{oops"));
        let e = rename_param(
            ApiError::invalid("max_tokens", "lower `max_tokens` or `max_tokensx`"),
            "max_tokens",
            "max_output_tokens",
        );
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"));
        assert_eq!(e.message, "lower `max_output_tokens` or `max_tokensx`");
    }
}
