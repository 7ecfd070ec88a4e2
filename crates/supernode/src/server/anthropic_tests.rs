//! The Messages translation both ways, against request and response shapes from Anthropic's
//! API reference.

use super::*;

use crate::server::translate::obj;

#[test]
fn requests_become_chat_bodies() {
    let chat = to_chat(&obj(json!({
        "model": "m", "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}],
        "stop_sequences": ["END"], "stream": true, "metadata": {"user_id": "u"},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    })))
    .unwrap();
    assert_eq!(
        Value::Object(chat),
        json!({
            "model": "m", "max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "stop": ["END"], "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be brief\nand kind"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "a\nb"},
            ],
        })
    );
}

#[test]
fn tool_blocks_and_tools_become_openai_tool_calls() {
    let chat = to_chat(&obj(json!({
        "model": "m", "max_tokens": 8,
        "tools": [{"name": "get_weather", "description": "Get the weather",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "Thanks"},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no", "is_error": true},
            ]},
        ],
    })))
    .unwrap();
    assert_eq!(
        chat["tools"],
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(chat["parallel_tool_calls"], json!(false));
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "user", "content": "Thanks"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no"},
        ])
    );
    for (c, want) in [
        (json!({"type": "auto"}), json!("auto")),
        (json!({"type": "any"}), json!("required")),
        (json!({"type": "none"}), json!("none")),
    ] {
        assert_eq!(tool_choice(&c).unwrap().0, want);
    }
    assert!(tool_choice(&json!({"type": "tool"})).is_err());
}

#[test]
fn bad_requests_name_the_field() {
    let cases = [
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (json!({"model": "m", "max_tokens": 5}), "messages"),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            "messages[0]",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}),
            "messages[0]",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "system": 5, "messages": [{"role": "user", "content": "x"}]}),
            "system",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "stop_sequences": "x", "messages": [{"role": "user", "content": "x"}]}),
            "stop_sequences",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
            "temperature",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "metadata": 1, "messages": [{"role": "user", "content": "x"}]}),
            "metadata",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "thinking": {"type": "enabled"}, "messages": [{"role": "user", "content": "x"}]}),
            "thinking",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "tools": [{"type": "bash_20250124", "name": "bash"}], "messages": [{"role": "user", "content": "x"}]}),
            "tools",
        ),
    ];
    for (body, param) in cases {
        let e = to_chat(&obj(body.clone())).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
}

fn chat_body(finish: &str, stop: Value, content: &str, calls: Value) -> Value {
    json!({
        "id": "chatcmpl-abc", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": finish, "stop_reason": stop,
                     "message": {"role": "assistant", "content": content, "tool_calls": calls}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    })
}

#[test]
fn answers_become_messages() {
    let m = message_of(
        &chat_body("stop", Value::Null, "Hello!", Value::Null),
        "chatcmpl-abc",
        "m",
    );
    assert_eq!(
        m,
        json!({
            "id": "msg_abc", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "Hello!"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 4},
        })
    );
    let s = message_of(&chat_body("stop", json!("END"), "x", Value::Null), "c", "m");
    assert_eq!(
        (s["stop_reason"].clone(), s["stop_sequence"].clone()),
        (json!("stop_sequence"), json!("END"))
    );
    let l = message_of(
        &chat_body("length", Value::Null, "x", Value::Null),
        "c",
        "m",
    );
    assert_eq!(l["stop_reason"], "max_tokens");
    let calls = json!([{"id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{\"a\": 1}"}}]);
    let t = message_of(&chat_body("tool_calls", Value::Null, "", calls), "c", "m");
    assert_eq!(t["stop_reason"], "tool_use");
    assert_eq!(
        t["content"],
        json!([{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
    );
}

fn names(evs: &[(&'static str, Value)]) -> Vec<&'static str> {
    evs.iter().map(|(n, _)| *n).collect()
}

#[test]
fn streams_follow_anthropics_event_sequence() {
    let mut s = EventStream::new("chatcmpl-x", "m", 7);
    let (name, start) = s.start();
    assert_eq!(name, "message_start");
    assert_eq!(
        start["message"]["usage"],
        json!({"input_tokens": 7, "output_tokens": 0})
    );
    let mut evs = Vec::new();
    for p in [
        Piece::Text("Hel".into()),
        Piece::Text("lo".into()),
        Piece::ToolStart {
            index: 0,
            id: "call_1".into(),
            name: "f".into(),
        },
        Piece::ToolArgs {
            index: 0,
            args: "{\"a\"".into(),
        },
        Piece::ToolArgs {
            index: 0,
            args: ": 1}".into(),
        },
        Piece::End(End::ToolCalls),
        Piece::Usage(super::super::translate::Usage {
            prompt: 7,
            completion: 5,
            cached: 0,
        }),
    ] {
        evs.extend(s.on(p));
    }
    evs.extend(s.finish());
    assert_eq!(
        names(&evs),
        [
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        evs[0].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        evs[2].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(
        evs[5].1,
        json!({"type": "content_block_start", "index": 1,
               "content_block": {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}})
    );
    assert_eq!(
        evs[6].1["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"a\""})
    );
    assert_eq!(evs[8].1, json!({"type": "content_block_stop", "index": 1}));
    assert_eq!(
        evs[9].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
               "usage": {"output_tokens": 5}})
    );
    // A stop sequence; an empty answer still pings.
    let mut s = EventStream::new("c", "m", 1);
    let mut evs = s.on(Piece::End(End::StopString("###".into())));
    evs.extend(s.finish());
    assert_eq!(names(&evs), ["ping", "message_delta", "message_stop"]);
    assert_eq!(
        evs[1].1["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "###"})
    );
    // An error ends the stream.
    let mut s = EventStream::new("c", "m", 1);
    let evs = s.on(Piece::Error("boom".into()));
    assert_eq!(
        evs,
        vec![(
            "error",
            json!({"type": "error", "error": {"type": "api_error", "message": "boom"}})
        )]
    );
    assert!(s.finish().is_empty());
}

#[test]
fn error_types_follow_the_status() {
    assert_eq!(error_type(StatusCode::BAD_REQUEST), "invalid_request_error");
    assert_eq!(error_type(StatusCode::UNAUTHORIZED), "authentication_error");
    assert_eq!(error_type(StatusCode::NOT_FOUND), "not_found_error");
    assert_eq!(
        error_type(StatusCode::PAYLOAD_TOO_LARGE),
        "request_too_large"
    );
    assert_eq!(
        error_type(StatusCode::SERVICE_UNAVAILABLE),
        "overloaded_error"
    );
    assert_eq!(error_type(StatusCode::INTERNAL_SERVER_ERROR), "api_error");
}
