"""instructor, unchanged, against the server: a pydantic model out of a chat completion in each of
the modes that speak the OpenAI API (JSON object, JSON schema, markdown JSON, tools, strict tools),
its partial-object streaming, its async client, and its retry loop.

instructor 1.17 (the current release) pins `jiter<0.15`, which the `openai` of requirements.txt
excludes, so it is in the second venv with the newest `openai` it accepts (requirements-extra.txt);
scripts/python-tests.sh runs this file there. In the main venv it is skipped.

Every call sets `max_retries=0` unless it tests retries: the first answer must already parse
and validate. The grammar behind `response_format` and forced tool calls is what makes that
hold even for the 135M model sampled at temperature 1."""

from __future__ import annotations

import asyncio
import os

import pytest

if os.environ.get("SUPERNODE_EXTRA_VENV"):
    import instructor
else:
    instructor = pytest.importorskip("instructor", reason="instructor runs in the second venv (scripts/python-tests.sh)")

from openai import AsyncOpenAI, OpenAI  # noqa: E402
from pydantic import BaseModel, Field, field_validator  # noqa: E402

from instructor.core import InstructorRetryException  # noqa: E402

QWEN = "qwen2.5-0.5b"
SMOL = "smollm2-135m"
TEXT = "Extract the person: Jason is 25 years old and lives in Paris."


class User(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)


def openai_client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def request(text: str = TEXT, model: str = QWEN, **kw) -> dict:
    """The arguments of one extraction: greedy and without retries unless `kw` says otherwise."""
    return {
        "model": model,
        "response_model": User,
        "messages": [{"role": "user", "content": text}],
        "max_retries": 0,
        "temperature": 0,
        "max_tokens": 100,
        **kw,
    }


def extract(server, mode, **kw) -> User:
    client = instructor.from_openai(openai_client(server), mode=mode)
    return client.chat.completions.create(**request(**kw))


@pytest.mark.parametrize(
    "mode",
    ["JSON", "JSON_SCHEMA", "MD_JSON", "TOOLS"],
)
def test_each_openai_mode_extracts_the_person(qwen_server, mode):
    user = extract(qwen_server, getattr(instructor.Mode, mode))
    assert isinstance(user, User)
    assert user.name == "Jason" and user.age == 25


def test_the_tiny_model_at_temperature_one_always_validates(server):
    # SmolLM2-135M sampled at temperature 1 writes valid JSON rarely by itself: every answer
    # validating (types, required fields, 0 <= age <= 150) is the grammar's doing. (Its chat
    # template cannot render tools, so the tools modes get a 400 from it.)
    for seed in range(4):
        user = extract(server, instructor.Mode.JSON_SCHEMA, model=SMOL, temperature=1.0, seed=seed)
        assert isinstance(user, User) and 0 <= user.age <= 150


@pytest.mark.parametrize("mode", ["TOOLS", "JSON"])
def test_partial_streaming_ends_in_the_whole_object(qwen_server, mode):
    client = instructor.from_openai(openai_client(qwen_server), mode=getattr(instructor.Mode, mode))
    parts = list(client.chat.completions.create_partial(**request()))
    assert parts, "no partial object"
    last = parts[-1]
    assert (last.name, last.age) == ("Jason", 25)
    # The same answer as the non-streamed call.
    whole = extract(qwen_server, getattr(instructor.Mode, mode))
    assert (whole.name, whole.age) == (last.name, last.age)


def test_async_client(qwen_server):
    async def go():
        client = instructor.from_openai(
            AsyncOpenAI(base_url=qwen_server.url + "/v1", api_key="unused", timeout=300, max_retries=0),
            mode=instructor.Mode.TOOLS,
        )
        texts = (TEXT, "Extract the person: Maria, aged 31, is a doctor.")
        users = await asyncio.gather(*(client.chat.completions.create(**request(t)) for t in texts))
        return [(u.name, u.age) for u in users]

    assert asyncio.run(go()) == [("Jason", 25), ("Maria", 31)]


class ShoutedUser(BaseModel):
    name: str
    age: int

    @field_validator("name")
    @classmethod
    def upper_case(cls, v: str) -> str:
        if v != v.upper():
            raise ValueError("the name must be in upper case, e.g. JASON")
        return v


def test_a_failed_validation_is_retried_with_the_error_in_the_conversation(qwen_server):
    # The first answer ("Jason") fails the validator; instructor sends the conversation back
    # with the error (an assistant tool call and a tool message through the chat template) and
    # takes the second answer. Whether the model corrects itself is the model's business; the
    # server's part is to accept the follow-up request and answer it with a parsable call.
    client = instructor.from_openai(openai_client(qwen_server), mode=instructor.Mode.TOOLS)
    sent = []
    client.on("completion:kwargs", lambda *a, **kw: sent.append(kw))
    try:
        user = client.chat.completions.create(**request(response_model=ShoutedUser, max_retries=2))
        assert user.name == user.name.upper()
    except InstructorRetryException as e:
        # Every attempt came back as a tool call that parsed; only the validator refused it.
        assert "upper case" in str(e)
    assert len(sent) >= 2, "no retry was sent"
    retry = sent[1]["messages"]
    assert any(m.get("role") == "tool" or m.get("tool_calls") for m in retry), retry
