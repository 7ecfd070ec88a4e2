"""The APIs beyond chat completions, through the official clients: Anthropic's Messages API (the
`anthropic` SDK), OpenAI's Responses and Embeddings APIs (the `openai` SDK), /tokenize and
/detokenize, CORS, and lists of prompts in /v1/completions.

The embeddings are checked against an independent float64 numpy forward pass of the same GGUF
(tools/f64_reference.py, which reads the weights with the `gguf` package): its final normed
hidden states, mean-pooled and L2-normalised here.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from pathlib import Path

import anthropic
import httpx
import numpy as np
import pytest

from conftest import API_KEY, MODEL, ROOT, Server, running, stop_cleanly

PROMPT = "Name three colours."
# The `anthropic` SDK (2.x) has no sampling keywords in `messages.create`; the API still takes them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def keyed():
    """A server with an API key and CORS for one origin."""
    s = Server("--cors-origins", "https://app.example,http://localhost:5173", api_key=API_KEY)
    try:
        yield s
    finally:
        stop_cleanly(s)


@pytest.fixture(scope="module")
def claude(keyed):
    return anthropic.Anthropic(base_url=keyed.url, api_key=API_KEY, max_retries=0, timeout=120)


def chat_greedy(keyed, messages, max_tokens, stop=None):
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stop:
        body["stop"] = stop
    with keyed.http() as h:
        r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- Anthropic ------------------------------------------------------------------------------


def test_messages_match_chat_completions(keyed, claude):
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=12,
        extra_body=GREEDY,
        system="You are terse.",
        messages=[{"role": "user", "content": PROMPT}],
        metadata={"user_id": "u-1"},
        extra_headers={"anthropic-version": "2023-06-01"},
    )
    chat = chat_greedy(
        keyed,
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}],
        12,
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == chat["choices"][0]["message"]["content"]
    want = {"stop": "end_turn", "length": "max_tokens"}[chat["choices"][0]["finish_reason"]]
    assert msg.stop_reason == want and msg.stop_sequence is None
    assert msg.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert msg.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_messages_max_tokens_and_content_blocks(claude):
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=3,
        extra_body=GREEDY,
        system=[{"type": "text", "text": "Answer briefly."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
            {"role": "user", "content": "Tell me a long story about a dragon."},
        ],
    )
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 3


def test_messages_stop_sequence(claude):
    free = claude.messages.create(
        model=MODEL, max_tokens=24, extra_body=GREEDY, messages=[{"role": "user", "content": PROMPT}]
    )
    text = free.content[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=24,
        extra_body=GREEDY,
        stop_sequences=["@@never@@", stop],
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert msg.stop_reason == "stop_sequence"
    assert msg.stop_sequence == stop
    assert msg.content[0].text == text[: text.index(stop)]


def test_messages_stream_events(keyed, claude):
    kwargs = dict(model=MODEL, max_tokens=10, extra_body=GREEDY, messages=[{"role": "user", "content": PROMPT}])
    whole = claude.messages.create(**kwargs)
    events = list(claude.messages.create(stream=True, **kwargs))
    # The SDK drops `ping` events; the raw stream has them.
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    body = {"model": MODEL, "max_tokens": 10, "stream": True, "messages": kwargs["messages"], **GREEDY}
    with httpx.Client(base_url=keyed.url, headers={"x-api-key": API_KEY}, timeout=120) as h:
        raw = h.post("/v1/messages", json=body)
    names = [line[len("event: "):] for line in raw.text.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[len("data: "):]) for line in raw.text.splitlines() if line.startswith("data: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[3:] == types[2:]
    assert [d["type"] for d in datas] == names
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == whole.content[0].text
    delta = events[-2]
    assert delta.delta.stop_reason == whole.stop_reason
    assert delta.usage.output_tokens == whole.usage.output_tokens
    # The SDK's stream helper assembles the same message.
    with claude.messages.stream(**kwargs) as s:
        final = s.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason


def test_messages_count_tokens(keyed, claude):
    messages = [{"role": "user", "content": PROMPT}]
    counted = claude.messages.count_tokens(model=MODEL, system="Be kind.", messages=messages)
    msg = claude.messages.create(model=MODEL, max_tokens=1, system="Be kind.", messages=messages)
    assert counted.input_tokens == msg.usage.input_tokens > 0


def test_messages_bad_input_gets_anthropic_errors(keyed, claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 400
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=10**7, messages=[{"role": "user", "content": "x"}])
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model=MODEL,
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        )
    assert "tools" in e.value.body["error"]["message"]
    bad = anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    # A body that is not JSON.
    with httpx.Client(base_url=keyed.url, headers={"x-api-key": API_KEY}) as h:
        r = h.post("/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


# --- Responses ------------------------------------------------------------------------------


def test_responses_match_chat_completions(keyed):
    client = keyed.client()
    r = client.responses.create(
        model=MODEL, instructions="You are terse.", input=PROMPT, max_output_tokens=12, temperature=0
    )
    chat = chat_greedy(
        keyed,
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPT}],
        12,
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat["choices"][0]["message"]["content"]
    assert r.store is False
    finish = chat["choices"][0]["finish_reason"]
    assert r.status == ("completed" if finish == "stop" else "incomplete")
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == chat["usage"]["completion_tokens"]
    # Input items: a conversation with output_text from the assistant.
    items = client.responses.create(
        model=MODEL,
        max_output_tokens=5,
        temperature=0,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": "Say one word."},
        ],
    )
    assert items.output[0].type == "message"


def test_responses_stream(keyed):
    client = keyed.client()
    kwargs = dict(model=MODEL, input=PROMPT, max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_responses_bad_input(keyed):
    import openai

    client = keyed.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"
    assert "stateless" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "web_search_call"}])
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", max_output_tokens=10**7)
    assert e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["param"] == "max_output_tokens"


# --- Embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f64_model():
    sys.path.insert(0, str(ROOT / "tools"))
    import f64_reference

    gguf = Path.home() / ".cache" / "supernode" / "models" / f"{MODEL}.gguf"
    if not gguf.exists():
        pytest.fail(f"no model file at {gguf}")
    m = f64_reference.load(str(gguf))
    m.out = np.eye(m.d_model)  # the "head" returns the final normed hidden states
    return m


EMBED_TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics"]


def f64_embeddings(server, f64_model):
    """The texts' ids from the server, and the float64 forward's embeddings of them."""
    with server.http() as h:
        toks = [
            h.post("/tokenize", json={"content": t, "add_special": True, "parse_special": False}).json()["tokens"]
            for t in EMBED_TEXTS
        ]
    want = []
    for ids in toks:
        h = f64_model.forward(ids).mean(axis=0)
        want.append(h / np.linalg.norm(h))
    return toks, want


def test_exact_precision_embeddings_match_an_f64_forward_pass(f64_model):
    """`--precision exact`: the float64 forward's vectors to 1e-5."""
    with running("--precision", "exact") as s:
        r = s.client().embeddings.create(model=MODEL, input=EMBED_TEXTS)
        _, want = f64_embeddings(s, f64_model)
    for d, w in zip(r.data, want):
        got = np.asarray(d.embedding)
        assert np.abs(got - w).max() < 1e-5, np.abs(got - w).max()  # measured: ~4e-7
        assert float(got @ w) > 0.99999


def test_embeddings_match_an_f64_forward_pass(keyed, f64_model):
    """The default (quantized) precision: 8-bit activations move each element of the unit
    vector by up to ~6e-3 (measured) and leave the direction within 1e-3 of the float64
    forward's."""
    client = keyed.client()
    r = client.embeddings.create(model=MODEL, input=EMBED_TEXTS)
    assert [d.index for d in r.data] == [0, 1]
    toks, want = f64_embeddings(keyed, f64_model)
    assert r.usage.prompt_tokens == sum(len(t) for t in toks)
    for d, w in zip(r.data, want):
        got = np.asarray(d.embedding)
        assert got.shape == (f64_model.d_model,)
        assert abs(np.linalg.norm(got) - 1) < 1e-5
        assert np.abs(got - w).max() < 2e-2, np.abs(got - w).max()
        assert float(got @ w) > 0.999, float(got @ w)
    # The two texts are far apart, so the bounds above tell them apart.
    assert float(want[0] @ want[1]) < 0.9
    # Token ids give the same vector; base64 is the same floats, little-endian.
    by_ids = client.embeddings.create(model=MODEL, input=[toks[0]])
    assert np.allclose(by_ids.data[0].embedding, r.data[0].embedding, atol=1e-6)
    with keyed.http() as h:
        b = h.post("/v1/embeddings", json={"model": MODEL, "input": EMBED_TEXTS[0], "encoding_format": "base64"}).json()
    raw = base64.b64decode(b["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert np.allclose(floats, r.data[0].embedding, atol=1e-6)
    # The SDK's default request (base64) decodes to the same.
    assert r.data[0].embedding != r.data[1].embedding


def test_embeddings_bad_input(keyed):
    with keyed.http() as h:
        for body, param in [
            ({"model": MODEL}, "input"),
            ({"model": MODEL, "input": []}, "input"),
            ({"model": MODEL, "input": [1.5]}, "input"),
            ({"model": MODEL, "input": [[10**9]]}, "input"),
            ({"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
            ({"model": MODEL, "input": "x", "dimensions": 3}, "dimensions"),
        ]:
            r = h.post("/v1/embeddings", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        r = h.post("/v1/embeddings", json={"model": "nope", "input": "x"})
        assert r.status_code == 404


# --- tokenize / detokenize ------------------------------------------------------------------


def test_tokenize_and_detokenize(keyed):
    text = "Hello, world! Ünïcödé"
    with keyed.http() as h:
        plain = h.post("/tokenize", json={"content": text}).json()
        with_bos = h.post("/tokenize", json={"content": text, "add_special": True}).json()
        pieces = h.post("/tokenize", json={"content": text, "with_pieces": True}).json()
        vllm = h.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
        chat = h.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": text}]}).json()
        back = h.post("/detokenize", json={"tokens": plain["tokens"]}).json()
        bad = h.post("/detokenize", json={"tokens": [10**9]})
        bad2 = h.post("/tokenize", json={})
    assert back["content"] == text
    # `add_special` adds what the model's metadata asks for (SmolLM2: nothing), as a completion
    # prompt gets it.
    completion = keyed.client().completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert len(with_bos["tokens"]) == completion.usage.prompt_tokens
    assert with_bos["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"] if isinstance(p["piece"], str)).startswith("Hello")
    assert vllm["tokens"] == with_bos["tokens"] and vllm["count"] == len(vllm["tokens"])
    msg = chat_greedy(keyed, [{"role": "user", "content": text}], 1)
    assert chat["count"] == msg["usage"]["prompt_tokens"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert bad2.status_code == 400 and bad2.json()["error"]["param"] == "content"


def test_tokenizer_info_agrees_with_the_gguf(keyed):
    """vLLM's `GET /tokenizer_info` (lm-eval's remote tokenizer reads it): the special tokens as
    text that /tokenize turns back into the GGUF's ids, and the GGUF's chat template, as
    gguf-py reads them."""
    from gguf import GGUFReader

    gguf = Path.home() / ".cache" / "supernode" / "models" / f"{MODEL}.gguf"
    reader = GGUFReader(str(gguf))

    def field(name):
        f = reader.fields[name]
        return f.contents()

    with keyed.http() as h:
        r = h.get("/tokenizer_info")
        assert r.status_code == 200, r.text
        info = r.json()
        ids = {
            k: h.post("/tokenize", json={"prompt": info[k], "add_special_tokens": False}).json()["tokens"]
            for k in ("bos_token", "eos_token")
        }
        anonymous = httpx.get(keyed.url + "/tokenizer_info")
    assert ids["bos_token"] == [field("tokenizer.ggml.bos_token_id")]
    assert ids["eos_token"] == [field("tokenizer.ggml.eos_token_id")]
    assert info["chat_template"] == field("tokenizer.chat_template")
    assert info["vocab_size"] == len(field("tokenizer.ggml.tokens"))
    assert isinstance(info["tokenizer_class"], str) and info["model_max_length"] > 0
    # Behind the API key, as /tokenize is.
    assert anonymous.status_code == 401


# --- CORS -----------------------------------------------------------------------------------


def test_cors_preflight_and_headers(keyed):
    with httpx.Client(base_url=keyed.url) as h:
        pre = h.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
        got = h.get("/v1/models", headers={"Origin": "http://localhost:5173", "Authorization": f"Bearer {API_KEY}"})
        assert got.status_code == 200
        assert got.headers["access-control-allow-origin"] == "http://localhost:5173"
        # Errors carry the header too, so a page can read them.
        denied = h.get("/v1/models", headers={"Origin": "https://app.example"})
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
        # A disallowed origin gets no CORS headers.
        other = h.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert not any(k.startswith("access-control-") for k in other.headers)
        plain = h.get("/health", headers={"Origin": "https://evil.example"})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_cors_is_off_by_default(http):
    r = http.options("/v1/chat/completions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405
    assert "access-control-allow-origin" not in r.headers


def test_cors_star():
    s = Server("--cors-origins", "*")
    try:
        with httpx.Client(base_url=s.url) as h:
            r = h.get("/health", headers={"Origin": "https://any.example"})
            assert r.headers["access-control-allow-origin"] == "*"
    finally:
        stop_cleanly(s)


# --- completions with a list of prompts -----------------------------------------------------


def test_completion_prompt_list(keyed):
    client = keyed.client()
    prompts = ["The capital of France is", [504, 3458, 282], "One, two,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == list(range(6))
    by_index = {c.index: c.text for c in r.choices}
    singles = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    for p, want in enumerate(singles):
        assert by_index[2 * p] == want and by_index[2 * p + 1] == want
    single_usage = sum(
        client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts
    )
    assert r.usage.prompt_tokens == single_usage
    stream = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: singles[i // 2] for i in range(6)}
