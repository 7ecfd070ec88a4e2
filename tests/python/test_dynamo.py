"""`supernode worker` behind NVIDIA Dynamo's own frontend (`python -m dynamo.frontend`, the
`ai-dynamo` wheel): Dynamo does the HTTP, the chat template, tokenising, detokenising and stop
strings, from the model card the worker registers; supernode computes tokens.

Discovery is Dynamo's file backend in a temporary directory, requests and responses go over
TCP, KV events over ZMQ (no etcd, no NATS). The answers through Dynamo are checked against
`supernode serve`'s own for the same request, which checks the card (tokenizer, template, end
tokens) and the sampling options end to end. Two workers behind the KV-aware router show that
a shared prefix goes to the worker whose cache holds it, from the block events the workers
publish.

Needs the worker built with the `dynamo` feature (scripts/build-dynamo.sh) in
$SUPERNODE_DYNAMO_BIN and Dynamo's frontend in the Python of $SUPERNODE_DYNAMO_PYTHON;
scripts/python-tests.sh sets both when the build is there, and the tests are skipped, with the
reason, when either is missing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import MODEL, wait_for

DYN_BIN = os.environ.get("SUPERNODE_DYNAMO_BIN", "")
DYN_PY = os.environ.get("SUPERNODE_DYNAMO_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not (DYN_BIN and Path(DYN_BIN).is_file() and DYN_PY and Path(DYN_PY).is_file()),
    reason="no Dynamo build: set SUPERNODE_DYNAMO_BIN (scripts/build-dynamo.sh) and SUPERNODE_DYNAMO_PYTHON",
)

GREEDY = {"temperature": 0.0}
# The KV usage the worker publishes (blocks in use over blocks in the pool).
USAGE = "dynamo_component_gpu_cache_usage_percent"


def free_port() -> int:
    """A free port below 32768 (Dynamo reads DYN_SYSTEM_PORT as a 16-bit signed integer)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port between 20000 and 32000")


class Proc:
    """A child process whose output is kept for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"`{' '.join(self.args)}` did not exit within {timeout}s of SIGTERM:\n{self.output()}")


class Host:
    """A network namespace joined to this one by a veth pair: another host, as far as TCP and
    ZMQ can tell. Its address is 10.231.N.2; this side's end is 10.231.N.1, its default route."""

    def __init__(self, n: int):
        self.name = f"snw{os.getpid() % 10000}-{n}"
        self.outer = f"svo{os.getpid() % 10000}-{n}"
        self.addr = f"10.231.{n}.2"
        inner = f"svi{os.getpid() % 10000}-{n}"
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", inner],
            ["ip", "link", "set", inner, "netns", self.name],
            ["ip", "addr", "add", f"10.231.{n}.1/24", "dev", self.outer],
            ["ip", "link", "set", self.outer, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.addr}/24", "dev", inner],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", inner, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", self.name, "ip", "route", "add", "default", "via", f"10.231.{n}.1"],
        ]
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                self.remove()
                raise OSError(f"`{' '.join(step)}` failed: {r.stderr.strip()}")

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)


class Cluster:
    """Dynamo's frontend and `workers` supernode workers sharing one file-discovery directory."""

    def __init__(
        self,
        tmp: Path,
        workers: int,
        router_mode: str = "kv",
        worker_args: tuple[str, ...] = (),
        hosts: list[Host] | None = None,
        etcd: str | None = None,
        roles: list[str] | None = None,
        worker_env: dict[str, str] | None = None,
        role_args: dict[str, tuple[str, ...]] | None = None,
    ):
        self.env = dict(os.environ)
        discovery = {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp / "discovery")}
        if etcd:
            discovery = {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": etcd}
        self.env.update(
            {
                **discovery,
                "DYN_REQUEST_PLANE": "tcp",
                "DYN_EVENT_PLANE": "zmq",
                "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "1",
                "SUPERNODE_CACHE": os.environ.get("SUPERNODE_CACHE", str(Path.home() / ".cache" / "supernode")),
            }
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: list[Proc] = []
        self.system_ports: list[int] = []
        # Each worker's address as the test reaches it: its own network namespace's, or loopback.
        self.addrs: list[str] = []
        for i in range(workers):
            sp = free_port()
            env = dict(self.env, DYN_SYSTEM_PORT=str(sp), **(worker_env or {}))
            role = ["--disaggregation-mode", roles[i], *(role_args or {}).get(roles[i], ())] if roles else []
            self.system_ports.append(sp)
            prefix: list[str] = []
            if hosts:
                prefix = ["ip", "netns", "exec", hosts[i].name]
                self.addrs.append(hosts[i].addr)
            else:
                self.addrs.append("127.0.0.1")
            self.workers.append(
                Proc([*prefix, DYN_BIN, "worker", "--model", MODEL, "--threads", "1", *role, *worker_args], env)
            )
        self.frontend = Proc(
            [DYN_PY, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(self.port),
             "--router-mode", router_mode],
            self.env,
        )
        try:
            wait_for(self._ready, 240, f"{workers} worker(s) registered with Dynamo's frontend", interval=0.5)
        except BaseException:
            print(self.output())
            self.stop()
            raise

    def _ready(self):
        for p in [self.frontend, *self.workers]:
            if p.proc.poll() is not None:
                pytest.fail(f"`{' '.join(p.args)}` exited with {p.proc.returncode}:\n{p.output()}")
        try:
            r = httpx.get(self.url + "/v1/models", timeout=5)
        except httpx.HTTPError as e:
            return False, str(e)
        if r.status_code != 200:
            return False, r.text
        ids = [m["id"] for m in r.json().get("data", [])]
        if MODEL not in ids:
            return False, ids
        # Every worker's endpoint must be up before the first request.
        for addr, sp in zip(self.addrs, self.system_ports):
            try:
                h = httpx.get(f"http://{addr}:{sp}/health", timeout=5)
            except httpx.HTTPError as e:
                return False, str(e)
            if h.status_code != 200:
                return False, h.text
        return True, ids

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def worker_metrics(self, i: int) -> str:
        return httpx.get(f"http://{self.addrs[i]}:{self.system_ports[i]}/metrics", timeout=10).text

    def output(self) -> str:
        parts = [f"--- frontend ---\n{self.frontend.output()}"]
        parts += [f"--- worker {i} ---\n{w.output()}" for i, w in enumerate(self.workers)]
        return "\n".join(parts)

    def stop(self) -> list[int]:
        codes = [w.stop() for w in self.workers]
        self.frontend.stop()
        return codes


def gauge(text: str, name: str, endpoint: str = "generate") -> float | None:
    """The value of sample `name` of the worker's `endpoint` in Dynamo's system metrics, if
    any (samples without an endpoint label count for every endpoint)."""
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m and f'dynamo_endpoint="{endpoint}"' in (m.group(1) or f'dynamo_endpoint="{endpoint}"'):
            return float(m.group(2))
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dynamo"), workers=1)
    yield c
    codes = c.stop()
    assert codes == [0], f"worker exit codes {codes}:\n{c.output()}"


MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primary colours, then count from one to five."},
]


def test_chat_through_dynamo_equals_supernode_serve(cluster, client):
    """Dynamo renders the template and tokenises from the worker's card; the answer and the
    prompt's token count are those of `supernode serve` for the same messages."""
    via = cluster.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, **GREEDY)
    own = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, **GREEDY)
    assert via.choices[0].message.content == own.choices[0].message.content
    assert via.usage.prompt_tokens == own.usage.prompt_tokens
    assert via.usage.completion_tokens == own.usage.completion_tokens
    assert via.choices[0].finish_reason == own.choices[0].finish_reason
    # The probes of deploy/k8s/dynamo: the worker's liveness, the frontend's health.
    assert httpx.get(f"http://{cluster.addrs[0]}:{cluster.system_ports[0]}/live", timeout=5).status_code == 200
    assert httpx.get(cluster.url + "/health", timeout=5).status_code == 200


def test_completion_streams_and_samples_like_supernode_serve(cluster, client):
    """Streamed text, the length finish, and seeded sampling at temperature 0.8 agree."""
    prompt = "The history of the printing press begins"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    pieces = []
    finish = None
    for chunk in cluster.client().completions.create(stream=True, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].text or "")
            finish = chunk.choices[0].finish_reason or finish
    own = client.completions.create(**kw)
    assert "".join(pieces) == own.choices[0].text
    assert finish == "length" == own.choices[0].finish_reason


def test_min_tokens_through_dynamo_equals_supernode_serve(cluster, client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=80, **GREEDY)
    short = client.chat.completions.create(**kw)
    assert short.choices[0].finish_reason == "stop"
    extra = {"min_tokens": short.usage.completion_tokens + 10}
    via = cluster.client().chat.completions.create(extra_body=extra, **kw)
    own = client.chat.completions.create(extra_body=extra, **kw)
    assert via.choices[0].message.content == own.choices[0].message.content
    assert via.usage.completion_tokens == own.usage.completion_tokens >= extra["min_tokens"]


def test_cache_salt_keeps_prefixes_apart(cluster):
    """vLLM's `cache_salt` (Dynamo's `nvext.cache_salt`): the same prompt again reuses its cached
    blocks under the same salt, and none under another."""
    prompt = "A salted prompt: " + " ".join(f"word{i}" for i in range(60))

    def cached(salt: str) -> int:
        r = httpx.post(
            cluster.url + "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "nvext": {"cache_salt": salt}},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    salt = f"tenant-{random.randrange(1 << 30)}"
    assert cached(salt) == 0
    assert cached(salt) >= 48
    assert cached(salt + "-other") == 0


def test_stop_strings_are_dynamos(cluster, client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=60, stop=["five", "5"], **GREEDY)
    via = cluster.client().chat.completions.create(**kw)
    own = client.chat.completions.create(**kw)
    assert via.choices[0].message.content == own.choices[0].message.content
    assert via.choices[0].finish_reason == "stop"


def test_cancelled_stream_frees_the_workers_blocks(cluster):
    """A client that goes away mid-stream cancels the request in the engine: its KV blocks come
    back (the worker's published KV usage returns to 0) and the next request is served."""
    with httpx.Client(timeout=120) as h:
        body = {
            "model": MODEL,
            "prompt": "Write a very long story about a lighthouse keeper.",
            "max_tokens": 3000,
            "stream": True,
            "ignore_eos": True,
        }
        with h.stream("POST", cluster.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            # The line iterator is kept: closing it early would close the connection now.
            lines = r.iter_lines()
            seen = 0
            while seen < 5:
                if next(lines).startswith("data: "):
                    seen += 1
            # While it streams, the worker holds blocks for it.
            wait_for(
                lambda: ((v := gauge(cluster.worker_metrics(0), USAGE) or 0.0) > 0, v),
                20,
                "the worker to publish the KV usage of the running request",
            )
    used = wait_for(
        lambda: (
            (v := gauge(cluster.worker_metrics(0), USAGE)) == 0,
            v,
        ),
        60,
        "the worker's KV blocks to be freed after the client left",
    )
    assert used == 0
    again = cluster.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4, **GREEDY)
    assert again.choices[0].finish_reason == "length"


def test_requests_the_worker_cannot_serve_get_an_error(cluster):
    """A parameter the worker does not support fails the request with its message, and the
    worker keeps serving."""
    with httpx.Client(timeout=120) as h:
        r = h.post(
            cluster.url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "n": 2},
        )
    assert r.status_code == 400, r.text
    assert "`n` and `best_of` above 1 are not supported" in r.json()["message"], r.text
    ok = cluster.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4, **GREEDY)
    assert ok.choices[0].finish_reason == "length"


def test_guided_decoding_through_dynamo_equals_supernode_serve(cluster, client):
    """OpenAI's `response_format` and vLLM's `guided_regex` / `guided_choice`, which Dynamo's
    frontend passes on as guided-decoding options, constrain the worker's output exactly as
    they constrain `supernode serve`'s."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a person as JSON."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        **GREEDY,
    )
    via = cluster.client().chat.completions.create(**kw)
    own = client.chat.completions.create(**kw)
    assert via.choices[0].message.content == own.choices[0].message.content
    person = json.loads(via.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    for extra in ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, {"guided_choice": ["left", "right"]}):
        kw = dict(model=MODEL, prompt="The code is", max_tokens=12, extra_body=extra, **GREEDY)
        via = cluster.client().completions.create(**kw)
        own = client.completions.create(**kw)
        assert via.choices[0].text == own.choices[0].text, extra
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", cluster.client().completions.create(
        model=MODEL, prompt="The code is", max_tokens=12, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}, **GREEDY
    ).choices[0].text)
    # A constraint llguidance cannot enforce (a lookahead) fails that request only.
    with httpx.Client(timeout=120) as h:
        r = h.post(
            cluster.url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "guided_regex": "(?=x)y"},
        )
    assert r.status_code == 400, r.text
    assert "cannot be enforced" in r.json()["message"] and "look-around" in r.json()["message"], r.text


def check_prefix_routing(c: Cluster, system: str, questions: list[str], salt: str | None = None) -> None:
    """One request with the long `system` prompt, then one per question sharing it: every one
    of those goes to the worker that computed the prefix (found by whose request count rose;
    an earlier request may have gone to either), as its published KV events tell the router.
    With `salt`, every request carries it as its `cache_salt`."""
    cl = c.client()
    extra = {"extra_body": {"nvext": {"cache_salt": salt}}} if salt else {}

    def ask(q: str) -> None:
        cl.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=2,
            **GREEDY,
            **extra,
        )

    def served() -> list[float]:
        return [gauge(c.worker_metrics(i), "dynamo_component_requests_total") or 0.0 for i in range(2)]

    before = served()
    ask("Where do I start?")
    first = served()
    holder = 0 if first[0] > before[0] else 1
    assert first[holder] == before[holder] + 1, (before, first)
    # The router learns of the blocks through the published events.
    time.sleep(2)
    for q in questions:
        ask(q)
    after = served()
    assert after[holder] - first[holder] == len(questions), f"requests per worker before {first}, after {after}:\n{c.output()}"
    assert after[1 - holder] == first[1 - holder]


def test_kv_router_sends_a_shared_prefix_to_the_worker_that_holds_it(tmp_path):
    """Two workers behind Dynamo's KV-aware router: after one request with a long prefix, every
    request sharing it goes to the worker whose prefix cache holds it, as the block events
    published by the workers tell the router. The same for salted requests (`cache_salt`), whose
    blocks the workers announce under hashes seeded with the salt, as the router seeds its own."""
    c = Cluster(tmp_path, workers=2)
    try:
        system = (
            "You are the help desk of a shipping company. "
            + " ".join(f"Rule {i}: answer questions about parcel class {i} and cite tariff {i * 7 % 31}." for i in range(14))
        )
        check_prefix_routing(c, system, [f"Question {k}: how much does class {k} cost?" for k in range(20)])
        salted = system.replace("shipping company", "freight company")
        check_prefix_routing(
            c, salted, [f"Query {k}: where does class {k} go?" for k in range(20)], salt=f"tenant-{random.randrange(1 << 30)}"
        )
    finally:
        codes = c.stop()
    assert codes == [0, 0], f"worker exit codes {codes}:\n{c.output()}"


def test_workers_on_other_hosts(tmp_path, client):
    """Two workers, each in its own network namespace (its own address, reached over a veth
    pair), behind the frontend here: requests, responses and KV events cross the links, the
    answers equal `supernode serve`'s, and a shared prefix still goes to the worker that holds
    it."""
    hosts: list[Host] = []
    try:
        for n in (1, 2):
            hosts.append(Host(n))
    except OSError as e:
        for h in hosts:
            h.remove()
        pytest.skip(f"no network namespaces here: {e}")
    try:
        c = Cluster(tmp_path, workers=2, hosts=hosts)
        try:
            cl = c.client()
            via = cl.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, **GREEDY)
            own = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, **GREEDY)
            assert via.choices[0].message.content == own.choices[0].message.content
            system = "You answer for a library. " + " ".join(
                f"Shelf {i} holds books on subject {i * 3 % 17} and is open on day {i % 7}." for i in range(16)
            )

            check_prefix_routing(c, system, [f"Is shelf {k} open today?" for k in range(4)])
        finally:
            codes = c.stop()
        assert codes == [0, 0], f"worker exit codes {codes}:\n{c.output()}"
    finally:
        for h in hosts:
            h.remove()


def test_etcd_discovery_and_deregistration_on_sigterm(tmp_path, client):
    """The discovery backend of the Kubernetes manifests (deploy/k8s/dynamo): etcd. The worker
    registers there, serves, and on SIGTERM leaves: the frontend stops listing the model, and
    the worker exits 0."""
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        pytest.skip("no etcd binary (Debian's etcd-server)")
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    etcd = Proc(
        [etcd_bin, "--data-dir", str(tmp_path / "etcd"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer_port}"],
        dict(os.environ),
    )
    try:
        def healthy():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200, None
            except httpx.HTTPError as e:  # not listening yet
                return False, str(e)

        wait_for(healthy, 30, "etcd to start")
        c = Cluster(tmp_path, workers=1, etcd=url)
        try:
            kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, **GREEDY)
            via = c.client().chat.completions.create(**kw)
            own = client.chat.completions.create(**kw)
            assert via.choices[0].message.content == own.choices[0].message.content
            assert c.workers[0].stop() == 0, c.output()

            def gone():
                ids = [m["id"] for m in httpx.get(c.url + "/v1/models", timeout=5).json().get("data", [])]
                return MODEL not in ids, ids

            # Within the 30 s of the etcd lease: the worker removed its registration itself.
            wait_for(gone, 10, "the frontend to drop the stopped worker's model")
        finally:
            c.stop()
    finally:
        etcd.stop()


NIXL_LIB = os.environ.get("SUPERNODE_NIXL_LIB", "")


def nixl_env(tcp: bool = True) -> dict[str, str]:
    """What a prefill or decode worker needs to load NIXL (scripts/python-tests.sh installs the
    wheel); with `tcp`, UCX held to TCP so that the transfers cross the hosts' links (else UCX
    picks, shared memory on one host)."""
    if not (NIXL_LIB and Path(NIXL_LIB, "libnixl_capi.so").is_file()):
        pytest.skip("no NIXL: set SUPERNODE_NIXL_LIB to the nixl-cu12 wheel's .nixl_cu12.mesonpy.libs")
    env = {"LD_LIBRARY_PATH": NIXL_LIB, "NIXL_PLUGIN_DIR": str(Path(NIXL_LIB, "plugins"))}
    if tcp:
        env["UCX_TLS"] = "tcp"
    return env


def counter(text: str, name: str) -> float:
    """The value of the worker's own (unlabelled, or the only matching) sample `name`."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the worker's metrics:\n{text[-2000:]}")


def transfer_counters(c: Cluster, i: int) -> dict[str, float]:
    m = c.worker_metrics(i)
    names = [
        "supernode_prompt_tokens_computed_total",
        "supernode_prefix_cache_hit_tokens_total",
        "supernode_kv_exported_blocks_total",
        "supernode_kv_imported_blocks_total",
        "supernode_kv_leases",
    ]
    out = {n: counter(m, n) for n in names}
    for outcome in ("pulled", "fallback"):
        out[outcome] = counter(m, f'supernode_kv_transfer_requests_total{{outcome="{outcome}"}}')
    out["in_use"] = gauge(m, USAGE) or 0.0
    return out


@pytest.fixture
def two_hosts():
    """Hosts 10.231.1.2 and 10.231.2.2, which reach each other through this namespace (IPv4
    forwarding on for the test)."""
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    hosts: list[Host] = []
    try:
        for n in (1, 2):
            hosts.append(Host(n))
        old = fwd.read_text().strip()
        fwd.write_text("1")
    except OSError as e:
        for h in hosts:
            h.remove()
        pytest.skip(f"no network namespaces here: {e}")
    try:
        yield hosts
    finally:
        fwd.write_text(old)
        for h in hosts:
            h.remove()


def cut(a: Host, b: Host, on: bool) -> None:
    """Drops (or restores) every packet between hosts `a` and `b`, in both directions, by
    blackhole routes in their namespaces; the frontend here still reaches both."""
    for h, other in ((a, b), (b, a)):
        op = "add" if on else "del"
        subprocess.run(
            ["ip", "netns", "exec", h.name, "ip", "route", op, "blackhole", f"{other.addr}/32"],
            check=True, capture_output=True,
        )


PD_QUESTIONS = [
    f"Question {k}: " + " ".join(["please explain"] * (k % 5 * 7)) + f" what {k} plus {k * 3} is."
    for k in range(16)
]


def test_prefill_and_decode_workers_on_two_hosts(two_hosts, client, tmp_path):
    """A prefill worker on one host and a decode worker on another behind Dynamo's frontend:
    16 concurrent requests get exactly the greedy tokens of `supernode serve` (one engine that
    computes everything; batch invariance makes the two equal), and the decode worker computed
    only the tail of each prompt (what does not fill a block, at least the last token): the rest
    arrived as blocks pulled through NIXL over TCP. Then the link between the two hosts is cut:
    the requests still get the same answers, computed on the decode worker, and once the link
    is back every pinned or reserved block is released on both workers."""
    env = nixl_env()
    hosts = two_hosts
    c = Cluster(
        tmp_path, workers=2, hosts=hosts, roles=["prefill", "decode"],
        role_args={"decode": ("--kv-transfer-timeout-ms", "3000"), "prefill": ("--kv-hold-ms", "30000")},
        worker_env=env,
    )
    try:
        def ask(cl: OpenAI, q: str):
            return cl.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=12, **GREEDY
            )

        from concurrent.futures import ThreadPoolExecutor

        want = {q: ask(client, q).choices[0].message.content for q in PD_QUESTIONS}
        before = transfer_counters(c, 1)
        cl = c.client()
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda q: ask(cl, q), PD_QUESTIONS))
        for q, r in zip(PD_QUESTIONS, got):
            assert r.choices[0].message.content == want[q], (q, c.output())
        after = transfer_counters(c, 1)
        # Each prompt's full blocks (all but its last token) were pulled or already cached here.
        tails = sum(r.usage.prompt_tokens - (r.usage.prompt_tokens - 1) // 16 * 16 for r in got)
        assert after["supernode_prompt_tokens_computed_total"] - before["supernode_prompt_tokens_computed_total"] == tails, (before, after)
        assert after["pulled"] - before["pulled"] == 16 and after["fallback"] == before["fallback"], (before, after)
        assert after["supernode_kv_imported_blocks_total"] > before["supernode_kv_imported_blocks_total"]
        prefill = transfer_counters(c, 0)
        assert prefill["supernode_kv_exported_blocks_total"] >= after["supernode_kv_imported_blocks_total"]

        # The link between the hosts goes down: new prompts cannot be pulled, and are computed
        # on the decode worker instead, with the same answers.
        cut(hosts[0], hosts[1], True)
        fresh = [q.replace("Question", "Query") for q in PD_QUESTIONS[:4]]
        want_cut = {q: ask(client, q).choices[0].message.content for q in fresh}
        try:
            mid = transfer_counters(c, 1)
            with ThreadPoolExecutor(4) as pool:
                got_cut = list(pool.map(lambda q: ask(cl, q), fresh))
            for q, r in zip(fresh, got_cut):
                assert r.choices[0].message.content == want_cut[q], (q, c.output())
            end = transfer_counters(c, 1)
            assert end["fallback"] - mid["fallback"] == 4, (mid, end, c.output())
            # Every prompt token was computed here or found in this worker's own cache (the
            # chat template's first block): nothing was imported.
            delta = {k: end[k] - mid[k] for k in end}
            assert delta["supernode_kv_imported_blocks_total"] == 0, delta
            assert delta["supernode_prompt_tokens_computed_total"] + delta["supernode_prefix_cache_hit_tokens_total"] == sum(
                r.usage.prompt_tokens for r in got_cut
            ), delta
        finally:
            cut(hosts[0], hosts[1], False)

        # Nothing leaks: transfers stuck in the cut end, pins are released, no block stays in use.
        def drained():
            now = [transfer_counters(c, i) for i in (0, 1)]
            return all(x["supernode_kv_leases"] == 0 and x["in_use"] == 0 for x in now), now

        wait_for(drained, 60, "every lease and block to be released on both workers")
        # And transfers work again.
        r = ask(cl, PD_QUESTIONS[3] + " Again.")
        assert r.choices[0].message.content == ask(client, PD_QUESTIONS[3] + " Again.").choices[0].message.content
    finally:
        codes = c.stop()
    assert codes == [0, 0], f"worker exit codes {codes}:\n{c.output()}"


def test_a_decode_worker_killed_mid_stream(client, tmp_path):
    """One prefill and two decode workers on one host (UCX's choice of transport): a decode
    worker killed while it streams gives the client an error, not a hang; the next request is
    served by the other decode worker, with `supernode serve`'s answer; nothing stays pinned on
    the prefill worker."""
    c = Cluster(tmp_path, workers=3, roles=["prefill", "decode", "decode"], worker_env=nixl_env(tcp=False))
    killed = None
    try:
        cl = c.client()

        def served() -> list[float]:
            return [gauge(c.worker_metrics(i), "dynamo_component_requests_total") or 0.0 for i in (1, 2)]

        before = served()
        stream = cl.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1500, stream=True,
            extra_body={"min_tokens": 1500}, **GREEDY,
        )
        it = iter(stream)
        for _ in range(3):
            next(it)
        now = served()
        busy = [i for i in (0, 1) if now[i] > before[i]]
        assert len(busy) == 1, (before, now)
        killed = 1 + busy[0]
        c.workers[killed].proc.kill()
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            for _ in it:
                pass
        assert time.monotonic() - t0 < 60, "the stream hung after its worker died"
        print("the client saw:", repr(err.value))
        want = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **GREEDY)
        got = cl.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **GREEDY)
        assert got.choices[0].message.content == want.choices[0].message.content

        def released():
            p = transfer_counters(c, 0)
            return p["supernode_kv_leases"] == 0 and p["in_use"] == 0, p

        wait_for(released, 60, "the prefill worker to release every pin")
    finally:
        codes = c.stop()
    assert killed is not None
    assert [code for i, code in enumerate(codes) if i != killed] == [0, 0], f"worker exit codes {codes}:\n{c.output()}"


def test_prefill_and_decode_workers_refuse_what_they_cannot_run(tmp_path):
    """A prefill or decode worker without NIXL's library, or without a prefix cache (through
    which prompts are handed over), exits 1 with one line saying what to do; so does a worker
    given the other role's option."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "NIXL_PLUGIN_DIR")}
    env.update({"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp_path / "discovery")})
    cases = [
        (["--disaggregation-mode", "decode"], env, "libnixl_capi.so cannot be loaded"),
        (["--disaggregation-mode", "prefill", "--no-prefix-caching"], env, "has no prefix cache"),
        # Each role's own options are refused elsewhere, not ignored.
        (["--kv-hold-ms", "5000"], env, "--kv-hold-ms is for prefill workers"),
        (["--disaggregation-mode", "prefill", "--kv-transfer-timeout-ms", "5"], env, "--kv-transfer-timeout-ms is for decode"),
    ]
    for args, e, needle in cases:
        r = subprocess.run(
            [DYN_BIN, "worker", "--model", MODEL, "--threads", "1", *args],
            env=e, capture_output=True, text=True, timeout=120,
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], (args, r.returncode, r.stderr[-2000:])
