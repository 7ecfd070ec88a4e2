"""Speculative decoding (`--speculative ngram`) through the server: the same tokens as a server
without it (greedy, seeded, `n`, stop strings, logprobs, structured output, concurrent requests),
the drafts in each response's usage (OpenAI's `completion_tokens_details`), the proposer's figures
in /metrics, and clear refusals of bad flags. And `--speculative draft` with the model as its own
draft model: the same greedy text, every draft accepted."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BIN, MODEL, metrics, running

CODE = """def average(values):
    total = 0
    count = 0
    for v in values:
        total += v
        count += 1
    return total / count

def average(values):
    total = 0
"""

PROMPTS = [
    CODE,
    "One, two, three, four, five. One, two, three, four, five. One, two,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def spec_server():
    with running("--speculative", "ngram", "--num-speculative-tokens", "4") as s:
        yield s


@pytest.fixture(scope="module")
def spec_client(spec_server):
    return spec_server.client()


def complete(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def test_greedy_completions_are_the_same_and_usage_counts_the_drafts(client, spec_client):
    accepted = 0
    for p in PROMPTS:
        kw = dict(max_tokens=48, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
        a = complete(client, p, **kw)
        b = complete(spec_client, p, **kw)
        assert a.choices[0].text == b.choices[0].text, p
        assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens
        assert a.choices[0].logprobs.token_logprobs == b.choices[0].logprobs.token_logprobs
        assert a.usage.completion_tokens == b.usage.completion_tokens == 48
        assert a.usage.completion_tokens_details is None
        d = b.usage.completion_tokens_details
        assert d is not None and d.accepted_prediction_tokens >= 0
        assert d.rejected_prediction_tokens >= 0
        accepted += d.accepted_prediction_tokens
    assert accepted > 0, "prompt lookup accepted nothing on repetitive prompts"


def test_streamed_chat_is_the_same_and_its_usage_counts_the_drafts(client):
    """Streamed, the deltas add up to the unstreamed text and the last chunk's usage carries the
    same draft counts as the unstreamed answer's. With a fixed k: the adaptive choice learns
    from step times, so two runs of one request may draft differently."""
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    with running("--speculative", "ngram", "--num-speculative-tokens", "4", "--speculative-fixed-k") as s:
        spec_client = s.client()
        plain = spec_client.chat.completions.create(**kw)
        chunks = list(spec_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert text == client.chat.completions.create(**kw).choices[0].message.content
    usage = chunks[-1].usage
    assert usage.completion_tokens == plain.usage.completion_tokens == 40
    d, want = usage.completion_tokens_details, plain.usage.completion_tokens_details
    assert d is not None and want is not None
    assert (d.accepted_prediction_tokens, d.rejected_prediction_tokens) == (
        want.accepted_prediction_tokens, want.rejected_prediction_tokens)


def test_stop_strings_n_and_seeds_are_the_same(client, spec_client):
    for kw in [
        dict(max_tokens=40, temperature=0, stop=["count"]),
        dict(max_tokens=40, temperature=0.8, seed=11, n=3),
        dict(max_tokens=40, temperature=1.0, top_p=0.9, seed=5, frequency_penalty=0.5),
    ]:
        a = complete(client, CODE, **kw)
        b = complete(spec_client, CODE, **kw)
        assert [c.text for c in a.choices] == [c.text for c in b.choices], kw
        assert [c.finish_reason for c in a.choices] == [c.finish_reason for c in b.choices]


def test_chat_with_a_schema_is_the_same(client, spec_client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "tags"],
        "additionalProperties": False,
    }
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON with a name and tags. " * 3}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    a = client.chat.completions.create(**kw)
    b = spec_client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_concurrent_requests_are_the_same(client, spec_client):
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
    kw = dict(max_tokens=32, temperature=0, extra_body={"ignore_eos": True})
    want = [complete(client, p, **kw).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda p: complete(spec_client, p, **kw).choices[0].text, prompts))
    assert got == want


def test_metrics_report_the_proposer(spec_client, spec_server):
    complete(spec_client, PROMPTS[1], max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    with spec_server.http() as h:
        m = metrics(h)
    label = '{proposer="ngram"}'
    drafts = m[f"supernode_spec_decode_num_drafts_total{label}"]
    drafted = m[f"supernode_spec_decode_num_draft_tokens_total{label}"]
    accepted = m[f"supernode_spec_decode_num_accepted_tokens_total{label}"]
    rate = m[f"supernode_spec_decode_acceptance_rate{label}"]
    assert 0 < drafts <= drafted and 0 < accepted <= drafted
    assert rate == pytest.approx(accepted / drafted)


def test_a_draft_model_gives_the_same_greedy_completions(client, server):
    """The model drafting for itself: the same text as without speculation, and every draft
    accepted (the same model computes the same logits), in the usage and in /metrics. The draft's
    own caches share the KV budget: a draft as large as the model (a quarter more for its caches'
    growth) leaves the engine's pool 4/9 of the blocks it has alone, for the same --kv-cache-mib."""
    with running("--speculative", "draft", "--draft-model", MODEL, "--num-speculative-tokens", "4") as s:
        draft_client = s.client()
        accepted = 0
        for p in PROMPTS:
            kw = dict(max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
            a = complete(client, p, **kw)
            b = complete(draft_client, p, **kw)
            assert a.choices[0].text == b.choices[0].text, p
            d = b.usage.completion_tokens_details
            assert d is not None and d.rejected_prediction_tokens == 0, p
            accepted += d.accepted_prediction_tokens
        assert accepted > 0
        with s.http() as h:
            m = metrics(h)
        assert m['supernode_spec_decode_num_accepted_tokens_total{proposer="draft"}'] == accepted
    with server.http() as h:
        alone = metrics(h)["supernode_kv_blocks_total"]
    assert abs(m["supernode_kv_blocks_total"] - alone * 4 / 9) <= 2, (m["supernode_kv_blocks_total"], alone)


def test_a_server_without_speculation_reports_no_proposer(http):
    assert not any(k.startswith("supernode_spec_decode") for k in metrics(http))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--speculative", "eagle9"], "unknown speculative method `eagle9`"),
        (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
        (["--speculative", "ngram", "--num-speculative-tokens", "99"], "num_speculative_tokens"),
        (["--speculative", "ngram", "--prompt-lookup-min", "4", "--prompt-lookup-max", "2"], "prompt_lookup_min"),
        (["--speculative", "ngram", "--speculative-disable-by-batch-size", "0"], "disable_by_batch_size"),
        (["--speculative", "draft"], "--speculative draft needs --draft-model"),
        (["--draft-model", MODEL], "--draft-model needs --speculative draft"),
    ],
)
@pytest.mark.parametrize("cmd", ["serve", "run"])
def test_bad_flags_are_named(cmd, args, needle):
    extra = ["--port", "0"] if cmd == "serve" else ["--prompt", "hi", "-n", "2"]
    r = subprocess.run(
        [str(BIN), cmd, "--model", MODEL, *extra, *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert "panicked" not in r.stderr
