"""Tool calling on /v1/chat/completions with the official `openai` SDK, on qwen2.5-0.5b
(Qwen2.5-Coder-0.5B-Instruct, whose own chat template renders the tools): a call chosen by the
model, the tool's result sent back for a final answer, streamed call deltas reassembled by the
SDK, `tool_choice: none`, and the errors for bad tool fields."""

from __future__ import annotations

import json
import re

import openai
import pytest

MODEL = "qwen2.5-0.5b"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def qclient(qwen_server):
    return qwen_server.client()


def test_auto_tool_call_then_result_then_answer(qclient):
    r = qclient.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"].lower() == "paris"
    assert not choice.message.content

    # The result goes back through the template; the model answers from it.
    messages = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 23, "sky": "sunny"})},
    ]
    r2 = qclient.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=60)
    final = r2.choices[0]
    assert final.finish_reason == "stop"
    assert not final.message.tool_calls
    assert "23" in final.message.content or "sunny" in final.message.content.lower(), final.message.content


def test_streamed_tool_call_is_reassembled_by_the_sdk(qclient):
    whole = qclient.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80)
    with qclient.chat.completions.stream(
        model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    got = final.choices[0]
    assert got.finish_reason == "tool_calls"
    want = whole.choices[0].message.tool_calls[0]
    call = got.message.tool_calls[0]
    assert call.function.name == want.function.name
    assert json.loads(call.function.arguments) == json.loads(want.function.arguments)

    # The raw deltas: the first names the call (index, id, type, name), later ones add arguments.
    chunks = list(
        qclient.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80, stream=True
        )
    )
    tc = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert tc[0].index == 0 and tc[0].id and tc[0].type == "function" and tc[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in tc) == want.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_forced_call_streams_its_arguments_as_they_are_written(qclient):
    """A forced call is written in the template's `<tool_call>` tags, so its arguments stream
    piece by piece as the model writes them (vLLM's behaviour); the SDK's events see several
    argument deltas before `done`, and the pieces add up to the non-streamed call."""
    ask = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    whole = qclient.chat.completions.create(**ask).choices[0].message.tool_calls[0]
    with qclient.chat.completions.stream(**ask) as stream:
        events = [e for e in stream]
        final = stream.get_final_completion()
    kinds = [e.type for e in events]
    pieces = [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len([p for p in pieces if p]) >= 3, kinds
    assert kinds.count("tool_calls.function.arguments.done") == 1
    assert kinds.index("tool_calls.function.arguments.delta") < kinds.index("tool_calls.function.arguments.done")
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    assert json.loads(call.function.arguments)["city"].lower() == "paris"


def test_tool_choice_none_answers_in_text(qclient):
    r = qclient.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    c = r.choices[0]
    assert not c.message.tool_calls
    assert c.finish_reason in ("stop", "length")
    assert c.message.content


def test_named_tool_choice_and_legacy_functions(qclient):
    r = qclient.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    legacy = qclient.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER["function"]], temperature=0, max_tokens=80
    )
    m = legacy.choices[0].message
    assert m.function_call is not None and m.function_call.name == "get_weather"


TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
        },
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_always_calls(qclient, choice):
    """`required` and a named choice are enforced by a grammar: sampled at temperature 1 on a
    prompt that needs no tool, every answer is a well-formed call of an offered function whose
    arguments match its schema (required keys, types, the enum)."""
    r = qclient.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short poem about autumn leaves."}],
        tools=[WEATHER, TIME],
        tool_choice=choice,
        temperature=1.0,
        seed=7,
        n=6,
        max_tokens=60,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        if choice != "required":
            assert call.function.name == "get_time"
        if call.function.name == "get_time":
            assert args["zone"] in ("UTC", "CET", "PST"), args
        else:
            # (The schema allows other keys: it does not set additionalProperties.)
            assert call.function.name == "get_weather" and isinstance(args["city"], str), args


def test_forced_tool_choice_and_response_format_conflict(qclient):
    with pytest.raises(openai.BadRequestError) as e:
        qclient.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
            response_format={"type": "json_object"}, max_tokens=10,
        )
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": 3}, "chat_template_kwargs"),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(qclient, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        qclient.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_bad_tool_messages_are_400s(qclient):
    bad_args = ASK + [
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError) as e:
        qclient.chat.completions.create(model=MODEL, messages=bad_args, max_tokens=5)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"
    no_id = ASK + [{"role": "tool", "content": "21C"}]
    with pytest.raises(openai.BadRequestError) as e:
        qclient.chat.completions.create(model=MODEL, messages=no_id, max_tokens=5)
    assert e.value.body["param"] == "messages[1].tool_call_id"


def test_template_without_tools_refuses_them(client):
    # smollm2-135m's template has no tool support.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER], max_tokens=5)
    assert e.value.body["param"] == "tools"
    assert "cannot render tools" in e.value.body["message"]


# --- Forced calls in other families' formats (--chat-template) ------------------------------

FORECAST = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "Get the forecast for a number of days",
        "parameters": {
            "type": "object",
            "properties": {
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
            },
            "required": ["days", "unit"],
        },
    },
}


@pytest.fixture(
    scope="module",
    params=[
        ("Qwen3-Coder.jinja", "qwen3_coder"),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
        ("mistralai-mistral-common-v11.jinja", "mistral_v11"),
        ("vllm-tool_chat_template_deepseekv31.jinja", "deepseek_v31"),
        ("vllm-tool_chat_template_deepseekv3.jinja", "deepseek_v3"),
    ],
    ids=["qwen3_coder", "mistral", "mistral_v11", "deepseek_v31", "deepseek_v3"],
)
def other_format_server(request):
    """qwen2.5-0.5b served with another family's real chat template (`--chat-template`): the
    prompt renders the tools that family's way, and a forced call is written in that family's
    format (Qwen3-Coder's XML-like tags; Mistral's `[TOOL_CALLS]` list, or v11's
    `[TOOL_CALLS]N[CALL_ID]id[ARGS]{..}`; DeepSeek's markers, V3.1's `N<sep>{..}` or V3's
    fenced JSON, with vLLM's tool templates for DeepSeek, whose own templates do not render
    tools), whatever the model would have written by itself."""
    from conftest import ROOT, running

    template, family = request.param
    path = ROOT / "tests" / "fixtures" / "templates" / template
    with running("--ctx", "4096", "--chat-template", str(path), model=MODEL) as s:
        yield s, family, path


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_forecast"}}])
def test_forced_calls_in_other_families_formats_always_parse(other_format_server, choice):
    """Sampled at temperature 1 on a prompt that needs no tool, with a template the model was
    not trained on: every answer is a call of an offered tool whose arguments match its schema
    (the integer's range, the enum, the boolean), which only the grammar makes sure of."""
    server, family, path = other_format_server
    client = server.client()
    with server.http() as h:
        info = h.get("/tokenizer_info").json()
    assert info["chat_template"] == path.read_text(), "the server is not using the given template"
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short poem about autumn leaves."}],
        tools=[FORECAST, TIME],
        tool_choice=choice,
        temperature=1.0,
        seed=11,
        n=4,
        max_tokens=300,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls", (family, c)
        [call] = c.message.tool_calls
        args = json.loads(call.function.arguments)
        if choice != "required":
            assert call.function.name == "get_forecast", (family, call)
        if call.function.name == "get_forecast":
            assert isinstance(args["days"], int) and 1 <= args["days"] <= 7, (family, args)
            assert args["unit"] in ("celsius", "fahrenheit"), (family, args)
            assert isinstance(args.get("hourly", False), bool), (family, args)
        else:
            assert call.function.name == "get_time" and args["zone"] in ("UTC", "CET", "PST"), (family, args)
        if family.startswith("mistral"):
            # Mistral's templates take call ids of 9 letters or digits (v11's refuses others).
            assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id), (family, call.id)
    # The call and its result go back through the template for the answer (v11's template
    # raises on an id that is not 9 characters).
    c = r.choices[0]
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Write a short poem about autumn leaves."},
            c.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": '{"result": "ok"}'},
        ],
        tools=[FORECAST, TIME],
        max_tokens=4,
        temperature=0,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls"), (family, follow)


# --- A grammar after the reasoning (Qwen3's template) -----------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
POEM = [{"role": "user", "content": "Write a short poem about autumn leaves."}]


@pytest.fixture(scope="module")
def qwen3_template_server():
    """qwen2.5-0.5b served with Qwen3's real chat template, which makes it a model that may
    reason first (`<think>`): the server detects the `qwen3` reasoning parser from it."""
    from conftest import ROOT, running

    path = ROOT / "tests" / "fixtures" / "templates" / "Qwen-Qwen3-0.6B.jinja"
    with running("--ctx", "4096", "--chat-template", str(path), model=MODEL) as s:
        yield s


def test_a_grammar_applies_once_the_reasoning_ends(qwen3_template_server):
    """With `enable_thinking: false` the template closes the reasoning block in the prompt, so a
    schema and a forced call apply from the first token: every answer sampled at temperature 1
    is valid. With thinking on, the grammar waits for `</think>` (as vLLM's reasoning-aware
    structured output does): this model, not trained to think, never closes a block, so its
    answer stays the free text it would write anyway instead of being forced into JSON."""
    client = qwen3_template_server.client()
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(
        model=MODEL, messages=POEM, response_format=schema, temperature=1.0, seed=5, n=4, max_tokens=60, extra_body=off
    )
    for c in r.choices:
        assert c.finish_reason == "stop", c
        v = json.loads(c.message.content)
        assert set(v) == {"name", "age"} and isinstance(v["age"], int) and 0 <= v["age"] <= 120, v
    r = client.chat.completions.create(
        model=MODEL, messages=POEM, tools=[FORECAST], tool_choice="required", temperature=1.0, seed=5, n=4,
        max_tokens=60, extra_body=off,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls[0].function.name == "get_forecast"
    thinking = client.chat.completions.create(
        model=MODEL, messages=POEM, response_format=schema, temperature=0, max_tokens=30
    ).choices[0].message
    assert thinking.content and not thinking.content.lstrip().startswith("{"), thinking
