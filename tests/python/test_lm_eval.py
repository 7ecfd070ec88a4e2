"""lm-eval, unchanged, against the server through its `local-completions` API model: the
tokenizer found on the server (`/tokenizer_info` + `/tokenize`, no Hub download), log-likelihoods
(`echo` + `logprobs` over token-id prompts, several per request) equal to what the `logits` CLI's
logits give, greedy generation with stop sequences, and a whole multiple-choice evaluation
(`simple_evaluate` on a task read from a local file).

lm-eval's dependency tree (datasets, scikit-learn, ...) stays out of the main venv: this file
runs in the second one (requirements-extra.txt); in the main venv it is skipped."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

if os.environ.get("SUPERNODE_EXTRA_VENV"):
    import lm_eval
else:
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval runs in the second venv (scripts/python-tests.sh)")

from conftest import BIN, MODEL  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a large city in Europe"),
    ("One, two, three,", " four"),
    ("def add(a, b):\n    return", " a + b"),
    ("Water boils at 100 degrees", " Celsius at sea level."),
]


@pytest.fixture(scope="module")
def lm(server):
    model = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=MODEL,
        tokenizer_backend="auto",
        batch_size=2,
        max_retries=1,
        max_length=2048,
    )
    # Detected from /tokenizer_info and /tokenize: nothing comes from the Hub.
    assert model.tokenizer_backend == "remote"
    return model


def tokenize(server, text: str) -> list[int]:
    with server.http() as h:
        r = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def cli_logprobs(tokens: list[int], start: int) -> tuple[float, bool]:
    """Σ log p(tokens[i] | tokens[:i]) for i >= start, and whether each was the argmax, from the
    `logits` CLI's logits (log-softmax in float64)."""
    out = subprocess.run(
        [str(BIN), "logits", "-m", MODEL, "-t", "2", "--tokens", ",".join(map(str, tokens))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    logits = json.loads(out.stdout)["logits"]
    total, greedy = 0.0, True
    for i in range(start, len(tokens)):
        row = logits[i - 1]
        m = max(row)
        lse = m + math.log(sum(math.exp(x - m) for x in row))
        total += row[tokens[i]] - lse
        greedy &= max(range(len(row)), key=row.__getitem__) == tokens[i]
    return total, greedy


def test_loglikelihoods_equal_the_logits_cli(server, lm):
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(got) == len(PAIRS)
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got):
        # lm-eval splits context and continuation on the tokens of the whole text.
        whole, head = tokenize(server, ctx + cont), tokenize(server, ctx)
        assert whole[: len(head)] == head
        want, want_greedy = cli_logprobs(whole, len(head))
        assert lp < 0
        assert abs(lp - want) < 1e-3 * max(1.0, abs(want)), (ctx, cont, lp, want)
        assert greedy == want_greedy, (ctx, cont)
    # A likely continuation scores above an unlikely one.
    assert got[0][0] > got[1][0]


def test_rolling_loglikelihood_of_a_text(server, lm):
    # Perplexity tasks: the whole text scored, every token after lm-eval's prefix token (the
    # model's BOS, else its EOS, found through /tokenizer_info and /tokenize). The text is far
    # shorter than max_length: one window.
    text = "The quick brown fox jumps over the lazy dog. " * 3
    [lp] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    prefix = lm.prefix_token_id
    assert isinstance(prefix, int)
    want, _ = cli_logprobs([prefix, *tokenize(server, text)], 1)
    assert abs(lp - want) < 1e-3 * max(1.0, abs(want)), (lp, want)


def test_generate_until_stops_at_the_stop_sequence(server, lm):
    ctx = "List three fruits:\n1."
    [text] = lm.generate_until(
        [Instance("generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 24, "temperature": 0}), 0)],
        disable_tqdm=True,
    )
    assert "\n" not in text and text.strip()
    # The same greedy text as a plain completion with that stop.
    plain = server.client().completions.create(model=MODEL, prompt=ctx, max_tokens=24, temperature=0, stop=["\n"])
    assert text == plain.choices[0].text


def test_a_multiple_choice_evaluation_runs_end_to_end(server, tmp_path, monkeypatch):
    # A task read from a local JSON file (no dataset download): the evaluator asks the server
    # for every choice's log-likelihood and reports accuracy.
    rows = [
        {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
        {"question": "How many legs does a dog have?", "choices": ["four", "two", "nine"], "label": 0},
        {"question": "What is 2 + 2?", "choices": ["five", "four", "ten"], "label": 1},
        {"question": "Which animal says meow?", "choices": ["cow", "dog", "cat"], "label": 2},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.yaml").write_text(
        "task: supernode_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model={MODEL},tokenizer_backend=auto,batch_size=4",
        tasks=["supernode_qa"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    res = results["results"]["supernode_qa"]
    acc = res["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = results["samples"]["supernode_qa"]
    assert len(samples) == len(rows)
    for s in samples:
        # One log-likelihood per choice, each a real score; the prediction is their argmax.
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert len(lls) == 3 and all(x < 0 for x in lls), s["filtered_resps"]
        assert s["acc"] == float(max(range(3), key=lls.__getitem__) == s["target"]), s
