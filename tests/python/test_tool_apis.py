"""Tool calls through the translated APIs on qwen2.5-0.5b, with the official SDKs: Anthropic's
`tool_use`/`tool_result` blocks (plain and streamed) and the Responses API's `function_call` /
`function_call_output` items, each carried to the chat pipeline's tool support and back."""

from __future__ import annotations

import json

import anthropic
import pytest

MODEL = "qwen2.5-0.5b"
ASK = "What is the weather like in Paris today?"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "The city name"}},
    "required": ["city"],
}


@pytest.fixture(scope="module")
def claude(qwen_server):
    return anthropic.Anthropic(base_url=qwen_server.url, api_key="unused", max_retries=0)


def test_anthropic_tool_use_then_result(claude):
    tools = [{"name": "get_weather", "description": "Get the current weather in a city", "input_schema": SCHEMA}]
    msgs = [{"role": "user", "content": ASK}]
    m = claude.messages.create(
        model=MODEL, max_tokens=80, messages=msgs, tools=tools, extra_body={"temperature": 0}
    )
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id
    assert uses[0].input["city"].lower() == "paris"

    # Streamed, the SDK reassembles the same call from input_json_delta events.
    with claude.messages.stream(
        model=MODEL, max_tokens=80, messages=msgs, tools=tools, extra_body={"temperature": 0}
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in streamed] == [(u.name, u.input) for u in uses]

    # The result goes back as a tool_result block; the answer uses it.
    msgs += [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": json.dumps({"temperature_c": 23, "sky": "sunny"})}]},
    ]
    m2 = claude.messages.create(
        model=MODEL, max_tokens=60, messages=msgs, tools=tools, extra_body={"temperature": 0}
    )
    assert m2.stop_reason == "end_turn", m2
    text = "".join(b.text for b in m2.content if b.type == "text")
    assert "23" in text or "sunny" in text.lower(), text
    n = claude.messages.count_tokens(model=MODEL, messages=msgs, tools=tools).input_tokens
    assert n > claude.messages.count_tokens(model=MODEL, messages=msgs).input_tokens


def test_responses_function_call_then_output(qwen_server):
    client = qwen_server.client()
    tools = [{"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
              "parameters": SCHEMA}]
    r = client.responses.create(model=MODEL, input=ASK, tools=tools, temperature=0, max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments)["city"].lower() == "paris"

    r2 = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": ASK},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id,
             "output": json.dumps({"temperature_c": 23, "sky": "sunny"})},
        ],
        tools=tools,
        temperature=0,
        max_output_tokens=60,
    )
    assert not [o for o in r2.output if o.type == "function_call"]
    assert "23" in r2.output_text or "sunny" in r2.output_text.lower(), r2.output_text
