"""Replicas behind a router: vLLM's metric names on /metrics, and SMG (SGLang's Rust gateway,
`smg launch`) with the cache_aware policy in front of two `supernode serve` replicas, routed
with no configuration on supernode's side.

The metric tests parse /metrics with prometheus_client's own parser, so an exposition a
Prometheus scraper would refuse fails here. The SMG tests are skipped, with the reason, only
where the `smg` wheel cannot be imported or its command cannot be found.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, Server, stop_cleanly, wait_for

GREEDY = {"temperature": 0.0}

# vLLM's families (as prometheus_client names them: a counter without its `_total`) and types.
VLLM_FAMILIES = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def scrape(url: str) -> dict:
    """/metrics parsed: family name -> family. Fails on text the Prometheus parser refuses."""
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The one sample named `sample` (e.g. `vllm:prompt_tokens_total`) whose labels include
    `labels`; 0 for a labelled counter that has not been touched yet."""
    family = sample
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            family = sample[: -len(suffix)]
    found = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{sample}{labels} is ambiguous: {found}"
    return found[0] if found else 0.0


def shared_prefix(nonce: str, rules: int = 11) -> str:
    """A system prompt of about 300 tokens of smollm2's tokenizer (27 tokens a rule)."""
    colours = ["red", "green", "blue", "amber", "violet"]
    body = " ".join(
        f"Rule {i}: answer questions on topic {i} politely, cite section {i * 7 % 31}, "
        f"and never mention the colour {colours[i % 5]}."
        for i in range(rules)
    )
    return f"Session {nonce}. You are the assistant of the Grand Archive. {body}"


def messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def stream_text(client: OpenAI, msgs: list[dict], max_tokens: int) -> str:
    out = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=max_tokens, stream=True, **GREEDY
    ):
        for c in chunk.choices:
            out.append(c.delta.content or "")
    return "".join(out)


# --- vLLM's metric names -----------------------------------------------------------------


def test_vllm_metric_names_types_and_labels(server):
    fams = scrape(server.url)
    for name, kind in VLLM_FAMILIES.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, f"{name} is a {fams[name].type}, not a {kind}"
        for s in fams[name].samples:
            assert s.labels.get("model_name") == MODEL, f"{s.name} labels {s.labels}"
            assert s.labels.get("engine") == "0", f"{s.name} labels {s.labels}"
    info = fams["vllm:cache_config_info"].samples
    assert len(info) == 1 and info[0].value == 1.0, info
    assert info[0].labels["block_size"] == "16"
    assert int(info[0].labels["num_gpu_blocks"]) == value(fams, "supernode_kv_blocks_total") > 0
    assert info[0].labels["enable_prefix_caching"] == "True"
    # vLLM's bucket bounds, which dashboards' `le` thresholds are written against.
    bounds = [s.labels["le"] for s in fams["vllm:inter_token_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert bounds[:3] == ["0.01", "0.025", "0.05"] and bounds[-1] == "+Inf", bounds


def test_vllm_metrics_follow_requests(server, client):
    """Token counters, histogram counts and the prefix-cache counters move by exactly what two
    requests with a shared 300-token prefix did."""
    system = shared_prefix(uuid.uuid4().hex)
    before = scrape(server.url)
    usages, reasons = [], []
    for q in ("What does rule 3 say?", "What does rule 5 say?"):
        r = client.chat.completions.create(model=MODEL, messages=messages(system, q), max_tokens=4, **GREEDY)
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
    after = scrape(server.url)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert usages[0].prompt_tokens >= 250, usages[0]
    assert cached >= 200, usages[1]
    assert delta("vllm:prompt_tokens_total") == prompt
    assert delta("vllm:generation_tokens_total") == completion
    assert delta("vllm:prefix_cache_queries_total") == prompt
    assert delta("vllm:prefix_cache_hits_total") == cached
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == completion - 2
    assert delta("vllm:time_per_output_token_seconds_count") == completion - 2
    for reason in ("stop", "length"):
        assert delta("vllm:request_success_total", finished_reason=reason) == reasons.count(reason), reasons
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    # The same figures as supernode's own names.
    assert delta("supernode_prefix_cache_hit_tokens_total") == cached
    assert delta("supernode_prompt_tokens_total") == prompt


# --- SMG in front of two replicas --------------------------------------------------------


def smg_command() -> list[str]:
    """How to run SMG from the test venv, or a skip saying why it cannot be run."""
    if importlib.util.find_spec("smg") is None:
        pytest.skip("the smg wheel is not installed (pip install smg==1.13.0)")
    exe = Path(sys.executable).with_name("smg")
    found = str(exe) if exe.exists() else shutil.which("smg")
    if found is None:
        pytest.skip("the smg wheel is installed but its `smg` command is not on PATH")
    return [found]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """`smg launch` with the cache_aware policy over the replicas' URLs; its log goes to a file
    that failure messages quote."""

    def __init__(self, tmp: Path, urls: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "smg.log"
        cmd = smg_command() + [
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
            "--policy",
            "cache_aware",
            "--log-level",
            "warn",
            # Nothing is in flight when the tests stop it: no need to wait for the default 180s.
            "--shutdown-grace-period-secs",
            "1",
            "--worker-urls",
            *urls,
        ]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def workers(self):
        try:
            w = httpx.get(self.url + "/workers", timeout=5).json()
        except (httpx.HTTPError, ValueError) as e:
            return False, repr(e)
        if self.proc.poll() is not None:
            pytest.fail(f"smg exited with {self.proc.returncode}:\n{self.logs()}")
        healthy = [x["url"] for x in w.get("workers", []) if x.get("is_healthy")]
        return len(healthy) == 2, w

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two replicas (each may be killed by a test) and SMG in front of them."""
    smg_command()
    servers = [Server(), Server()]
    gateway = None
    try:
        gateway = Gateway(tmp_path_factory.mktemp("smg"), [s.url for s in servers])
        wait_for(gateway.workers, 60, "SMG to register both replicas as healthy")
        yield gateway, servers
    finally:
        if gateway is not None:
            gateway.stop()
        for s in servers:
            if not getattr(s, "killed", False):
                if s.proc.poll() is not None:
                    pytest.fail(f"a replica died during the tests (exit code {s.proc.returncode}):\n{s.stderr()}")
                stop_cleanly(s)


def gateway_client(gateway: Gateway) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_smg_models_and_health(replicas):
    gateway, _ = replicas
    assert [m.id for m in gateway_client(gateway).models.list().data] == [MODEL]
    assert httpx.get(gateway.url + "/health", timeout=10).status_code == 200


def test_smg_answers_as_a_replica(replicas):
    """Greedy chat and streaming through SMG give a replica's own answer."""
    gateway, servers = replicas
    msgs = [{"role": "user", "content": "Name three colours of the rainbow."}]
    direct = servers[0].client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, **GREEDY)
    routed = gateway_client(gateway).chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, **GREEDY)
    assert routed.choices[0].message.content == direct.choices[0].message.content
    assert routed.usage.completion_tokens == direct.usage.completion_tokens
    assert stream_text(gateway_client(gateway), msgs, 16) == direct.choices[0].message.content


def test_smg_keeps_a_shared_prefix_on_one_replica(replicas):
    """Ten requests sharing a 300-token prefix all land on one replica: its prefix-cache hits
    grow by the nine repeats, the other replica is not even queried."""
    gateway, servers = replicas
    system = shared_prefix(uuid.uuid4().hex)
    before = [scrape(s.url) for s in servers]
    client = gateway_client(gateway)
    cached = []
    for i in range(10):
        r = client.chat.completions.create(
            model=MODEL, messages=messages(system, f"Question {i}: what does rule {i} say?"), max_tokens=1, **GREEDY
        )
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    after = [scrape(s.url) for s in servers]
    hits = [value(a, "vllm:prefix_cache_hits_total") - value(b, "vllm:prefix_cache_hits_total") for a, b in zip(after, before)]
    queries = [
        value(a, "vllm:prefix_cache_queries_total") - value(b, "vllm:prefix_cache_queries_total")
        for a, b in zip(after, before)
    ]
    home = max(range(2), key=lambda i: hits[i])
    assert cached[0] == 0 and all(c >= 200 for c in cached[1:]), cached
    assert hits[home] == sum(cached), (hits, cached)
    assert queries[1 - home] == 0, f"the other replica was queried too: hits {hits}, queries {queries}"
    PREFIX_HOME.update(replica=home, system=system)


# Which replica holds the shared prefix, for the failover test that follows.
PREFIX_HOME: dict = {}


def test_smg_fails_over_when_a_replica_is_killed(replicas):
    """The replica that SMG sends the shared prefix to is killed; the next request with that
    prefix succeeds on the other one."""
    gateway, servers = replicas
    if not PREFIX_HOME:
        pytest.skip("needs the replica that the shared-prefix test found (run the module whole)")
    victim = PREFIX_HOME["replica"]
    msgs = messages(PREFIX_HOME["system"], "Which rule mentions violet?")
    expected = servers[1 - victim].client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, **GREEDY)
    servers[victim].killed = True
    servers[victim].kill()
    survivor = servers[1 - victim]
    before = scrape(survivor.url)
    t0 = time.monotonic()
    r = gateway_client(gateway).chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, **GREEDY)
    took = time.monotonic() - t0
    assert r.choices[0].message.content == expected.choices[0].message.content
    served = value(scrape(survivor.url), "vllm:e2e_request_latency_seconds_count") - value(
        before, "vllm:e2e_request_latency_seconds_count"
    )
    assert served == 1, f"the survivor served {served} requests; smg log:\n{gateway.logs()}"
    assert took < 30, f"failover took {took:.1f}s"
