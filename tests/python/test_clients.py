"""The client libraries applications use on top of the OpenAI API, unchanged, against the server:
LangChain (`ChatOpenAI`: invoke, stream, `bind_tools`, `with_structured_output`), the OpenAI Agents
SDK (an agent that calls a Python function tool, over chat completions and over the Responses
API) and LiteLLM (`completion`, streamed and not, and its tool calls). Each goes through the
library's own request building and response parsing; the assertions are on what the library
hands the application."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

# LiteLLM would fetch its model price list over the network on import; use the bundled one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

QWEN = "qwen2.5-0.5b"
SMOL = "smollm2-135m"
ASK = "What is the weather like in Paris today?"


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
        city: The city name.
    """
    return json.dumps({"city": city, "temperature_c": 23, "sky": "sunny"})


# ---------------------------------------------------------------- LangChain


@pytest.fixture(scope="module")
def lc_qwen(qwen_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=QWEN, base_url=qwen_server.url + "/v1", api_key="unused",
                      temperature=0, max_tokens=80, max_retries=0, timeout=300)


def test_langchain_invoke_and_stream(server):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=SMOL, base_url=server.url + "/v1", api_key="unused",
                     temperature=0, max_tokens=12, max_retries=0, timeout=300)
    msgs = [SystemMessage("You are brief."), HumanMessage("Name a colour.")]
    full = llm.invoke(msgs)
    assert isinstance(full.content, str) and full.content
    assert full.response_metadata["finish_reason"] in ("stop", "length")
    usage = full.usage_metadata
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    # Streamed greedily, the chunks add up to the same message.
    chunks = list(llm.stream(msgs))
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == full.content


def test_langchain_bind_tools_call_then_answer(lc_qwen):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    llm = lc_qwen.bind_tools([weather])
    msgs = [HumanMessage(ASK)]
    ai = llm.invoke(msgs)
    assert len(ai.tool_calls) == 1, ai
    call = ai.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"]["city"].lower() == "paris" and call["id"]

    # Streamed, LangChain merges the argument fragments into the same call.
    merged = None
    for chunk in llm.stream(msgs):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]

    # The tool runs; its result goes back as a ToolMessage and the answer uses it.
    msgs += [ai, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = llm.invoke(msgs)
    assert not answer.tool_calls
    assert "23" in answer.content or "sunny" in answer.content.lower(), answer.content


def test_langchain_forced_tool_choice(lc_qwen):
    from langchain_core.tools import tool

    llm = lc_qwen.bind_tools([tool(get_weather)], tool_choice="get_weather")
    ai = llm.invoke("Tell me a joke.")
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"], ai
    assert isinstance(ai.tool_calls[0]["args"]["city"], str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(lc_qwen, method):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and the country it is in."""

        name: str = Field(description="the city's name")
        country: str = Field(description="the country's name")
        population_millions: float

    prompt = "Give the capital of France as JSON with the keys name, country and population_millions."
    llm = lc_qwen.with_structured_output(City, method=method, include_raw=True)
    out = llm.invoke(prompt)
    assert out["parsing_error"] is None, out
    city = out["parsed"]
    assert isinstance(city, City)
    assert city.name.lower() == "paris", city


# ---------------------------------------------------------------- OpenAI Agents SDK


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_agents_sdk_runs_a_function_tool(qwen_server, api):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel,
                        Runner, function_tool, set_tracing_disabled)
    from agents.items import ToolCallItem, ToolCallOutputItem
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would upload traces to OpenAI
    client = AsyncOpenAI(base_url=qwen_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    kind = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    seen = []

    @function_tool
    def weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city name.
        """
        seen.append(city)
        return get_weather(city)

    agent = Agent(
        name="assistant",
        instructions="You answer questions about the weather with the weather tool.",
        model=kind(model=QWEN, openai_client=client),
        # Left to itself after the SDK's instructions, the 0.5B model writes its call as bare JSON
        # (no <tool_call> tags), which is text, as in vLLM's hermes parser. "required" forces the
        # first call through the grammar; the SDK resets it to "auto" after a call
        # (reset_tool_choice), so the second turn answers.
        model_settings=ModelSettings(temperature=0, max_tokens=80, tool_choice="required"),
        tools=[weather],
    )
    result = asyncio.run(Runner.run(agent, ASK, max_turns=4))
    # The SDK parsed the model's call, ran the Python function, sent back its output, and the
    # model's final answer came after it.
    assert [c.lower() for c in seen] == ["paris"], seen
    kinds = [type(i) for i in result.new_items]
    assert ToolCallItem in kinds and ToolCallOutputItem in kinds, result.new_items
    assert kinds.index(ToolCallItem) < kinds.index(ToolCallOutputItem)
    out = result.final_output
    assert isinstance(out, str) and ("23" in out or "sunny" in out.lower()), out
    assert ToolCallItem not in kinds[kinds.index(ToolCallOutputItem):], result.new_items
    usage = result.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0


# ---------------------------------------------------------------- LiteLLM


def test_litellm_completion_and_stream(server):
    import litellm

    kw = dict(model="openai/" + SMOL, api_base=server.url + "/v1", api_key="unused",
              messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=12)
    r = litellm.completion(**kw)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12

    chunks = list(litellm.completion(stream=True, **kw))
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    rebuilt = litellm.stream_chunk_builder(chunks, messages=kw["messages"])
    assert rebuilt.choices[0].message.content == text


def test_litellm_tool_calls_streamed_and_not(qwen_server):
    import litellm

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    kw = dict(model="openai/" + QWEN, api_base=qwen_server.url + "/v1", api_key="unused",
              messages=[{"role": "user", "content": ASK}], tools=tools, temperature=0, max_tokens=80)
    r = litellm.completion(**kw)
    assert r.choices[0].finish_reason == "tool_calls", r
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    assert args["city"].lower() == "paris"

    chunks = list(litellm.completion(stream=True, **kw))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=kw["messages"])
    scalls = rebuilt.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in scalls] == [("get_weather", args)]
