//! The Responses translation both ways, against the shapes of OpenAI's API reference.

use super::*;

use crate::server::translate::obj;

#[test]
fn requests_become_chat_bodies() {
    let chat = to_chat(&obj(json!({
        "model": "m", "instructions": "be brief", "max_output_tokens": 32,
        "temperature": 0.2, "top_p": 0.5, "store": false, "stream": true,
        "input": [
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "hello"}]},
            {"role": "developer", "content": [{"type": "input_text", "text": "a"},
                                              {"type": "input_text", "text": "b"}]},
        ],
    })))
    .unwrap();
    assert_eq!(
        Value::Object(chat),
        json!({
            "model": "m", "max_tokens": 32, "temperature": 0.2, "top_p": 0.5,
            "stream": true, "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "system", "content": "a\nb"},
            ],
        })
    );
    let plain = to_chat(&obj(json!({"model": "m", "input": "hello"}))).unwrap();
    assert_eq!(
        plain["messages"],
        json!([{"role": "user", "content": "hello"}])
    );
}

#[test]
fn function_items_and_tools_become_openai_tool_calls() {
    let chat = to_chat(&obj(json!({
        "model": "m",
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather",
                   "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
        "input": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_2", "output": "25C"},
        ],
    })))
    .unwrap();
    assert_eq!(
        chat["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                  "parameters": {"type": "object"}, "strict": true}}])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
        ])
    );
}

#[test]
fn bad_requests_name_the_field() {
    let cases = [
        (json!({"input": "x"}), "model"),
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": []}), "input"),
        (json!({"model": "m", "input": 5}), "input"),
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"model": "m", "input": "x", "store": "yes"}), "store"),
        (
            json!({"model": "m", "input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input",
        ),
        (
            json!({"model": "m", "input": [{"type": "web_search_call"}]}),
            "input",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "name": "f"}]}),
            "input",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}),
            "text",
        ),
        (
            json!({"model": "m", "input": "x", "background": true}),
            "background",
        ),
    ];
    for (body, param) in cases {
        let e = to_chat(&obj(body.clone())).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
    }
}

fn echo() -> Echo {
    Echo::new(
        "chatcmpl-abc",
        "m",
        &obj(json!({"model": "m", "input": "x", "max_output_tokens": 9})),
    )
}

#[test]
fn answers_become_responses() {
    let chat = json!({
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi!"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}},
    });
    let r = response_of(&chat, &echo());
    assert_eq!(r["id"], "resp_abc");
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["store"], false);
    assert_eq!(r["max_output_tokens"], 9);
    assert_eq!(
        r["output"],
        json!([{"type": "message", "id": "msg_abc", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}]}])
    );
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 3, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 2,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5})
    );
    let cut =
        json!({"choices": [{"finish_reason": "length", "message": {"content": "a"}}], "usage": {}});
    let r = response_of(&cut, &echo());
    assert_eq!(
        (r["status"].clone(), r["incomplete_details"].clone()),
        (json!("incomplete"), json!({"reason": "max_output_tokens"}))
    );
    let calls = json!({"choices": [{"finish_reason": "tool_calls", "message": {"content": null, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}], "usage": {}});
    assert_eq!(
        response_of(&calls, &echo())["output"],
        json!([{"type": "function_call", "id": "fc_call_9", "call_id": "call_9", "name": "f",
                "arguments": "{}", "status": "completed"}])
    );
}

#[test]
fn streams_follow_the_responses_event_sequence() {
    let mut s = EventStream::new(echo());
    let mut evs = s.start();
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
            args: "{\"a\":".into(),
        },
        Piece::ToolArgs {
            index: 0,
            args: "1}".into(),
        },
        Piece::End(End::ToolCalls),
        Piece::Usage(Usage {
            prompt: 3,
            completion: 4,
            cached: 0,
        }),
    ] {
        evs.extend(s.on(p));
    }
    evs.extend(s.finish());
    let names: Vec<&str> = evs.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (k, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["sequence_number"], json!(k), "{name}");
        assert_eq!(data["type"], json!(name));
    }
    assert_eq!(evs[0].1["response"]["status"], "in_progress");
    assert_eq!(evs[6].1["text"], "Hello");
    assert_eq!(evs[12].1["arguments"], "{\"a\":1}");
    let done = &evs[14].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["output"][1]["arguments"], "{\"a\":1}");
    assert_eq!(done["usage"]["output_tokens"], 4);
    // A failure ends the stream with `response.failed`.
    let mut s = EventStream::new(echo());
    let evs = s.on(Piece::Error("boom".into()));
    assert_eq!(evs[0].0, "response.failed");
    assert_eq!(evs[0].1["response"]["error"]["message"], "boom");
    assert!(s.finish().is_empty());
}
