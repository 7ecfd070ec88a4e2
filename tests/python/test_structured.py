"""Structured output (`response_format`, vLLM's `structured_outputs` and `guided_*`) and
`logit_bias`, end to end on smollm2-135m, judged by the OpenAI SDK's own `parse()`, pydantic
and the `jsonschema` package."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import subprocess

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import BIN, MODEL


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def token_ids(text: str) -> list[int]:
    out = subprocess.run(
        [str(BIN), "tokenize", "--model", MODEL, "--text", text, "--no-add-special"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)


def test_sdk_parse_returns_a_pydantic_object(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=ask("Describe Paris as JSON with its name, country and population."),
        response_format=City,
        temperature=0,
        max_tokens=120,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    city = choice.message.parsed
    assert isinstance(city, City)
    assert City.model_validate_json(choice.message.content) == city


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "pet": {"enum": ["cat", "dog", "none"]},
        "likes": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "likes"],
    "additionalProperties": False,
}


def test_json_schema_holds_for_48_sampled_answers(server):
    # 200 answers from a random-weight model are checked by the engine's tests
    # (crates/supernode-engine/tests/structured.rs); here the real model, fewer for time.
    client = server.client(timeout=900)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def batch(seed: int):
        return client.chat.completions.create(
            model=MODEL,
            messages=ask("Invent a person and describe them as JSON."),
            response_format=fmt,
            temperature=1.0,
            n=16,
            seed=seed,
            max_tokens=150,
        )

    with cf.ThreadPoolExecutor(3) as pool:
        # `n` seeds choice i with seed + i: keep the batches apart.
        answers = [c for r in pool.map(batch, (0, 100, 200)) for c in r.choices]
    assert len(answers) == 48
    invalid = []
    for c in answers:
        try:
            assert c.finish_reason == "stop", c.finish_reason
            jsonschema.validate(json.loads(c.message.content), PERSON)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            invalid.append((c.message.content, str(e)[:200]))
    assert invalid == []
    assert len({c.message.content for c in answers}) > 24


ANSWER_AS_JSON = 'Reply with a JSON object with one key, "answer", whose value is the capital of France.'


def test_json_object_answers_parse(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask(ANSWER_AS_JSON),
        response_format={"type": "json_object"},
        temperature=0.7,
        seed=11,
        n=4,
        max_tokens=200,
    )
    # Every answer that ends is a JSON object. At this temperature SmolLM2 can also nest keys
    # until `max_tokens` (a grammar keeps the text valid, not short): one of the four, with
    # the default precision's numerics, which the length cut leaves as an unfinished object.
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(finished) >= 3, [c.message.content[:80] for c in r.choices]
    for c in finished:
        assert isinstance(json.loads(c.message.content), dict)
    for c in r.choices:
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        assert c.message.content.lstrip().startswith("{"), c.message.content[:80]


def test_json_object_streams(client):
    text = []
    finish = None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=ask(ANSWER_AS_JSON),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
        stream=True,
    ):
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    assert isinstance(json.loads("".join(text)), dict)


def test_a_cut_document_finishes_with_length(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Invent a person."),
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        temperature=0,
        max_tokens=4,
    )
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert c.message.content.startswith("{")
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=MODEL, messages=ask("Describe Paris."), response_format=City, max_tokens=4
        )


def test_regex_choice_and_grammar_extensions(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("What is a phone number?"),
        extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}},
        temperature=1.0,
        seed=3,
        n=4,
        max_tokens=20,
    )
    for c in r.choices:
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", c.message.content), c.message.content
        assert c.finish_reason == "stop"

    for body in ({"guided_choice": ["red", "green", "blue"]},
                 {"structured_outputs": {"choice": ["red", "green", "blue"]}}):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ask("Name a color."),
            extra_body=body,
            temperature=1.0,
            seed=5,
            n=6,
            max_tokens=10,
        )
        assert {c.message.content for c in r.choices} <= {"red", "green", "blue"}

    grammar = r'''
        start: "The answer is " verdict "."
        verdict: "yes" | "no" | "maybe"
    '''
    r = client.chat.completions.create(
        model=MODEL,
        messages=ask("Is the sky blue?"),
        extra_body={"guided_grammar": grammar},
        temperature=1.0,
        seed=9,
        n=3,
        max_tokens=20,
    )
    for c in r.choices:
        assert re.fullmatch(r"The answer is (yes|no|maybe)\.", c.message.content), c.message.content


def test_completions_take_constraints_too(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The year the war ended was",
        extra_body={"guided_regex": r" (19|20)[0-9]{2}"},
        temperature=0,
        max_tokens=10,
    )
    assert re.fullmatch(r" (19|20)[0-9]{2}", r.choices[0].text), r.choices[0].text
    r = client.completions.create(
        model=MODEL,
        prompt="A JSON object:",
        extra_body={"response_format": {"type": "json_object"}},
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(json.loads(r.choices[0].text), dict)


def bad_request(client, **kw) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=5, **kw)
    return e.value


def test_bad_constraints_are_400s_naming_the_field(client):
    e = bad_request(client, response_format={
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "wibble"}, "strict": True},
    })
    assert e.body["param"] == "response_format"
    assert "wibble" in e.body["message"]

    e = bad_request(client, response_format={
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}, "strict": True},
    })
    assert e.body["param"] == "response_format"
    assert "no-such-format" in e.body["message"]

    e = bad_request(client, extra_body={"guided_grammar": "start: missing_rule"})
    assert e.body["param"] == "guided_grammar"
    assert "missing_rule" in e.body["message"]

    e = bad_request(client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"})
    assert e.body["param"] == "guided_regex"

    e = bad_request(client, response_format={"type": "xml"})
    assert e.body["param"] == "response_format"

    e = bad_request(client, extra_body={"guided_choice": []})
    assert e.body["param"] == "guided_choice"


def test_logit_bias_forces_and_bans_tokens(client):
    # +100 on one token: greedy output is that token, over and over.
    [tok] = token_ids(" banana")
    r = client.completions.create(
        model=MODEL, prompt="I like", logit_bias={str(tok): 100}, temperature=1.0, seed=2, max_tokens=4
    )
    assert r.choices[0].text == " banana" * 4

    # -100 on every end-of-turn token: a reply that ends by itself must run to max_tokens.
    msgs = ask("What is the capital of France? Answer in one word.")
    free = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=30, logprobs=True
    )
    assert free.choices[0].finish_reason == "stop"
    eot = token_ids("<|im_end|>") + token_ids("<|endoftext|>")
    banned = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        temperature=0,
        max_tokens=30,
        logit_bias={str(t): -100 for t in eot},
    )
    assert banned.choices[0].finish_reason == "length"
    assert banned.choices[0].message.content.startswith(free.choices[0].message.content)

    # A banned token never appears, though the model would say it first.
    first = free.choices[0].logprobs.content[0].token
    [tok] = token_ids(first)
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, temperature=1.0, seed=1, n=4, max_tokens=5,
        logit_bias={str(tok): -100}, logprobs=True,
    )
    for c in r.choices:
        assert all(t.token != first for t in c.logprobs.content), c.message.content


def test_bad_logit_bias_is_a_400(client):
    for bias in ({"99999999": 1}, {"abc": 1}, {"5": 200}):
        e = bad_request(client, logit_bias=bias)
        assert e.body["param"] == "logit_bias", bias
