#!/usr/bin/env python3
"""Soak and fault benchmark for `supernode serve` (or any OpenAI-compatible server at --url).

Runs a fixed number of client threads for --minutes against one server, loopback only, with a
seeded mix of traffic:

  - chat and text completions, streaming and not, sampled and greedy;
  - `n` > 1, stop strings (checked: the answer must not contain them), a shared system prompt
    (prefix-cache hits), long prompts of a few thousand tokens (kept within the context);
  - clients that go away: after a few SSE events, before any response byte, during a
    non-streaming request, and halfway through sending a body;
  - bad requests sent on purpose: invalid JSON, a body that is not an object, wrong types,
    out-of-range values, unknown model, oversize `max_tokens`, a prompt longer than the
    context, an oversize body, unknown routes, wrong methods, and the parameters the server
    does not implement (`tools`: a 400 is the intended answer, a 200 is counted apart as
    "accepted unsupported", not as an error), a JSON schema that cannot be enforced and a
    `logit_bias` id outside the vocabulary.

Each client thread draws its requests from its own RNG seeded from --seed, so a run sends the
same sequence per thread (timings, and so the interleaving, still vary). Every request is
bounded: `max_tokens` is always set (except on purpose in the bad ones that
must be refused before generating), and each request has a deadline (--request-timeout).
--max-requests bounds the total count.

Every --interval seconds it prints one line for the requests that finished in that window:
count, requests/s, outcomes, latency p50/p95/p99 (whole request, successful generations) and
time to first token (streams), output tokens/s, the server's RSS (/proc/PID/status; the server
it started, or --pid), and the server's KV blocks in use / prefix-cache blocks and running /
waiting requests from /metrics.

At the end it stops sending, waits for the requests in flight, waits for the server to go idle,
reads /metrics, prints a summary, writes --json-out, stops the server it started (SIGTERM; it
must exit 0), and exits non-zero with one line saying why if the verdict fails:

  - RSS: flat within --rss-tolerance percent (default 5), judged on the highest VmRSS of any
    later window against the first window after warm-up in which the KV pool is fully
    resident. The KV cache is allocated zeroed and its pages become resident when a block is
    first used; with prefix caching, freed registered blocks are kept and new requests take
    never-used blocks first, so the resident KV pool grows until every block has been used
    once (up to --kv-cache-mib). That is not a leak, so the baseline waits for it: the first
    window whose upper bound of blocks ever used (the high-water of blocks in use +
    prefix-cache blocks, sampled every couple of seconds) reaches supernode_kv_blocks_total.
    Give the server a KV budget the traffic fills (e.g. --server-args "--kv-cache-mib 256").
    Where the pool never fills, it judges the growth from the first window after warm-up to
    the last net of the KV cache's pages instead: the cache is a run of adjacent anonymous
    read-write mappings about its size (its per-layer buffers are allocated together at
    start-up), whose resident size /proc/PID/smaps gives; the cache's size is
    supernode_kv_blocks_total x 16 tokens x the bytes per token the started server logs (or
    --kv-bytes-per-token with --url). Where no such run shows, it subtracts the upper bound of
    the KV blocks first used. Both the raw and the net figure are reported, with the
    anonymous / file-backed split; --rss-judge raw judges the plain VmRSS growth there.
  - p95 latency stability: the median of the windows' p95 in the last third of the windows
    after warm-up over that in the first third (or --p95-windows windows on each side), at
    most --p95-tolerance (default 1.5x); skipped when a side has under --p95-min-requests
    requests. Long-prompt requests are left out of these figures (they are a small, random
    share of each window and dominate its tail). Their prefill chunks still delay the other
    requests of their steps, so latency is bimodal: a request that shares steps with a long
    prompt's prefill waits for it. Where that share is near 5%, the p95 of a pooled third
    jumps between the two modes with a few requests either way (a 1-hour run on one thread
    gave 7.4 s against 17.1 s with equal p50s and equal counts of stalled windows), so the
    default judges the median window instead, which moves when latency does; --p95-judge
    pooled judges the pooled p95. The pooled p50, p95 and p99 of both thirds are reported.
  - unexpected errors: 0. Unexpected is anything but a 200 that validates, an intended 4xx on
    a bad request, or a disconnect we made: 5xx, 503 (queue full), 4xx on a valid request,
    connection errors, timeouts, malformed answers, stream error events.
  - at the end: no request running or waiting and 0 KV blocks in use. `supernode_kv_blocks_in_use`
    counts blocks referenced by a request; blocks kept only by the prefix cache are free
    (evictable) and show in `supernode_prefix_cache_blocks` instead, so the target is exactly 0.
  - the server's own `supernode_requests_total{outcome="error"}` did not grow.
  - the server it started did not die, and exited 0 on SIGTERM.

Usage:

    python3 tools/soak.py --bin target/release/supernode --model smollm2-135m \\
        --minutes 60 --concurrency 4 --json-out soak.json
    python3 tools/soak.py --url http://127.0.0.1:8080 --pid $(pgrep -n supernode) --minutes 10

Standard library only.
"""

import argparse
import http.client
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

BLOCK_SIZE = 16  # tokens per KV block in supernode's pool

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river mountain ocean forest garden kitchen window letter music picture market "
    "island bridge village harbour engine signal circuit network planet garden lantern "
    "quietly slowly bright ancient careful golden silver narrow distant gentle sudden hollow "
    "walks carries builds remembers finds opens follows watches writes answers gathers "
    "and the of to in for with on at by from about under over after before"
).split()

QUESTIONS = [
    "Write one sentence about {a} and {b}.",
    "What is a {a}? Answer briefly.",
    "Give three words that describe a {a}.",
    "Tell a very short story about a {a} near a {b}.",
    "Explain in one line why a {a} needs a {b}.",
    "List two facts about the {a}.",
    "Describe the {a} in the {b}.",
    "Say hello to the {a}.",
]

STOP_SETS = [["."], ["\n"], [" the", "."], [","], ["!", "?", "."], [" and"], ["\n\n", "e"]]


def percentile(xs, q):
    """Linear-interpolated percentile of xs (0 <= q <= 100); None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def read_status(pid):
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...); {} if gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except (OSError, ValueError):
        return {}
    return out


def kv_region(pid, kv_bytes):
    """(Size, Rss) in kB of the runs of adjacent anonymous read-write mappings at least
    kv_bytes long: where the KV cache lives. Its layers are allocated together at start-up,
    each far above the allocator's mmap threshold, so they sit next to each other; the kernel
    merges such neighbours into one mapping only when their flags agree, so neighbours are
    joined here. None if /proc/PID/smaps has no such run."""
    runs = []  # [end address, Size kB, Rss kB] of each run of adjacent anonymous rw mappings
    cur = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if head and re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    if len(head) == 5 and head[1].startswith("rw"):
                        if runs and runs[-1][0] == lo and cur is not None:
                            runs[-1][0] = hi
                        else:
                            runs.append([hi, 0, 0])
                        cur = runs[-1]
                    else:
                        cur = None
                elif cur is not None and head and head[0] in ("Size:", "Rss:"):
                    cur[1 if head[0] == "Size:" else 2] += int(head[1])
    except (OSError, ValueError, IndexError):
        return None
    big = [r for r in runs if r[1] * 1024 >= kv_bytes]
    if not big:
        return None
    return sum(r[1] for r in big), sum(r[2] for r in big)


def read_status_kb(pid, field):
    return read_status(pid).get(field)


def parse_metrics(text):
    """Prometheus text -> {name or name{labels}: float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            key, val = line.rsplit(" ", 1)
            out[key.strip()] = float(val)
        except ValueError:
            continue
    return out


class Target:
    def __init__(self, host, port, api_key=None):
        self.host = host
        self.port = port
        self.api_key = api_key
        self.model = None
        self.ctx = None

    def headers(self, json_body=True):
        h = {}
        if json_body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = "Bearer " + self.api_key
        return h

    def get(self, path, timeout=10.0):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=self.headers(False))
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def metrics(self):
        try:
            st, body = self.get("/metrics", timeout=5.0)
            if st != 200:
                return None
            return parse_metrics(body.decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException):
            return None


class Exchange:
    """What came back for one HTTP request."""

    __slots__ = ("status", "body", "events", "done", "ttft", "error", "disconnected", "t_total")

    def __init__(self):
        self.status = None
        self.body = b""
        self.events = []  # (seconds since start, data bytes) of each SSE data line
        self.done = False  # saw data: [DONE]
        self.ttft = None
        self.error = None  # "timeout" or "conn:<Exception>"
        self.disconnected = False
        self.t_total = None


def _abort(sock):
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def exchange(t, method, path, body, deadline, stream=False, stop_after=None, headers=None):
    """One request on a fresh connection. stop_after: close the socket after that many SSE
    events (0: right after sending the request, before reading anything)."""
    t0 = time.monotonic()
    ex = Exchange()
    conn = http.client.HTTPConnection(t.host, t.port, timeout=max(0.05, deadline - t0))
    sock = None
    try:
        hdrs = t.headers(body is not None) if headers is None else headers
        conn.request(method, path, body=body, headers=hdrs)
        sock = conn.sock
        if stop_after == 0:
            ex.disconnected = True
            _abort(sock)
            return ex
        resp = conn.getresponse()
        ex.status = resp.status
        if resp.status != 200 or not stream:
            chunks = []
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("request deadline")
                sock.settimeout(remaining)
                c = resp.read(65536)
                if not c:
                    break
                chunks.append(c)
            ex.body = b"".join(chunks)
            return ex
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("request deadline")
            sock.settimeout(remaining)
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                ex.done = True
                break
            ex.events.append((time.monotonic() - t0, data))
            if stop_after is not None and len(ex.events) >= stop_after:
                ex.disconnected = True
                _abort(sock)
                return ex
        return ex
    except (socket.timeout, TimeoutError):
        ex.error = "timeout"
        return ex
    except (OSError, http.client.HTTPException) as e:
        ex.error = "conn:" + type(e).__name__
        return ex
    finally:
        ex.t_total = time.monotonic() - t0
        conn.close()


def truncated_body(t, deadline, rng):
    """Announce a body, send part of it, and hang up."""
    t0 = time.monotonic()
    ex = Exchange()
    try:
        s = socket.create_connection((t.host, t.port), timeout=max(0.05, deadline - t0))
        body = json.dumps({"model": t.model, "messages": [{"role": "user", "content": "hi"}]})
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 500}\r\n\r\n"
        )
        s.sendall(head.encode() + body[: rng.randint(0, len(body))].encode())
        time.sleep(rng.uniform(0.0, 0.2))
        _abort(s)
        ex.disconnected = True
    except (OSError, socket.timeout) as e:
        ex.error = "conn:" + type(e).__name__
    ex.t_total = time.monotonic() - t0
    return ex


class Record:
    """One finished request, as the windows and the summary count it."""

    __slots__ = ("kind", "sub", "t_end", "latency", "ttft", "outcome", "key", "tokens",
                 "prompt_tokens", "cached_tokens")

    def __init__(self, kind, sub, t_end, latency, ttft, outcome, key, tokens=0,
                 prompt_tokens=None, cached_tokens=None):
        self.kind = kind
        self.sub = sub
        self.t_end = t_end
        self.latency = latency
        self.ttft = ttft
        # ok | intended (4xx we asked for) | disconnected (we hung up) |
        # accepted_unsupported (200 to a parameter the server should refuse) | unexpected
        self.outcome = outcome
        self.key = key
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens


def error_key(ex):
    if ex.error:
        return ex.error
    kind, code = "-", "-"
    try:
        e = json.loads(ex.body)["error"]
        kind = e.get("type") or "-"
        code = e.get("code") or "-"
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return f"HTTP {ex.status} {kind}/{code}"


class Traffic:
    """Builds one worker's requests from its seeded RNG and judges the answers."""

    def __init__(self, t, args, rng, system_prompt, long_words):
        self.t = t
        self.a = args
        self.rng = rng
        self.system_prompt = system_prompt
        self.long_words = long_words

    # -- helpers --------------------------------------------------------------------------
    def words(self, n):
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def question(self):
        q = self.rng.choice(QUESTIONS)
        return q.format(a=self.rng.choice(WORDS), b=self.rng.choice(WORDS))

    def sampling(self, body):
        r = self.rng.random()
        if r < 0.3:
            body["temperature"] = 0
        elif r < 0.8:
            body["temperature"] = self.rng.choice([0.5, 0.8, 1.0])
            body["top_p"] = self.rng.choice([0.9, 0.95, 1.0])
            body["seed"] = self.rng.randrange(1 << 31)
        else:
            body["temperature"] = 1.0
        return body

    def max_tokens(self):
        return self.rng.randint(4, self.a.max_tokens)

    def chat_body(self, stream, content=None, system=None):
        msgs = []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": content or self.question()})
        body = {"model": self.t.model, "messages": msgs, "max_tokens": self.max_tokens()}
        if stream:
            body["stream"] = True
            if self.rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return self.sampling(body)

    def completion_body(self, stream, prompt=None):
        body = {"model": self.t.model, "prompt": prompt or ("Once upon a time, " + self.words(12)),
                "max_tokens": self.max_tokens()}
        if stream:
            body["stream"] = True
            if self.rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return self.sampling(body)

    # -- one request ----------------------------------------------------------------------
    def next(self):
        kinds = self.a.mix_kinds
        kind = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        return getattr(self, "do_" + kind)()

    def gen(self, kind, sub, path, body, stream, n=1, stop=None):
        deadline = time.monotonic() + self.a.request_timeout
        ex = exchange(self.t, "POST", path, json.dumps(body).encode(), deadline, stream=stream)
        return self.judge_gen(kind, sub, path, ex, stream, n, body.get("max_tokens"), stop)

    def judge_gen(self, kind, sub, path, ex, stream, n, max_tokens, stop):
        end = time.monotonic()
        if ex.error or ex.status != 200:
            return Record(kind, sub, end, ex.t_total, None, "unexpected", error_key(ex))
        chat = path.endswith("chat/completions")
        texts = [""] * n
        finish = [None] * n
        usage = None
        ttft = None
        try:
            if stream:
                if not ex.done:
                    return Record(kind, sub, end, ex.t_total, None, "unexpected",
                                  "bad_response:stream_without_[DONE]")
                for at, data in ex.events:
                    v = json.loads(data)
                    if "error" in v:
                        e = v["error"] or {}
                        return Record(kind, sub, end, ex.t_total, None, "unexpected",
                                      f"stream_error {e.get('type')}/{e.get('code')}")
                    if v.get("usage"):
                        usage = v["usage"]
                    for c in v.get("choices") or []:
                        i = c["index"]
                        piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        if piece:
                            texts[i] += piece
                        if c.get("finish_reason"):
                            finish[i] = c["finish_reason"]
                        if ttft is None and (piece or c.get("finish_reason")):
                            ttft = at
            else:
                v = json.loads(ex.body)
                usage = v.get("usage")
                choices = v["choices"]
                if len(choices) != n:
                    return Record(kind, sub, end, ex.t_total, None, "unexpected",
                                  f"bad_response:{len(choices)}_choices_for_n={n}")
                for c in choices:
                    i = c["index"]
                    texts[i] = c["message"]["content"] if chat else c["text"]
                    finish[i] = c.get("finish_reason")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return Record(kind, sub, end, ex.t_total, None, "unexpected",
                          f"bad_response:malformed({type(e).__name__})")
        if any(f not in ("stop", "length") for f in finish):
            return Record(kind, sub, end, ex.t_total, ttft, "unexpected",
                          f"bad_response:finish_reason={sorted(set(map(str, finish)))}")
        if any(not isinstance(x, str) for x in texts):
            return Record(kind, sub, end, ex.t_total, ttft, "unexpected", "bad_response:text")
        if stop and any(s in x for s in stop for x in texts):
            return Record(kind, sub, end, ex.t_total, ttft, "unexpected",
                          "bad_response:stop_string_in_output")
        tokens, ptoks, cached = 0, None, None
        if usage:
            tokens = usage.get("completion_tokens") or 0
            ptoks = usage.get("prompt_tokens")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if max_tokens and tokens > max_tokens * n:
                return Record(kind, sub, end, ex.t_total, ttft, "unexpected",
                              "bad_response:more_tokens_than_max_tokens")
        else:
            # Streams without include_usage: count content chunks as an estimate.
            tokens = sum(1 for _ in ex.events)
        return Record(kind, sub, end, ex.t_total, ttft, "ok", "ok", tokens, ptoks, cached)

    # -- the mix ---------------------------------------------------------------------------
    def do_chat(self):
        return self.gen("chat", "", "/v1/chat/completions", self.chat_body(False), False)

    def do_chat_stream(self):
        return self.gen("chat_stream", "", "/v1/chat/completions", self.chat_body(True), True)

    def do_completion(self):
        return self.gen("completion", "", "/v1/completions", self.completion_body(False), False)

    def do_completion_stream(self):
        return self.gen("completion_stream", "", "/v1/completions", self.completion_body(True),
                        True)

    def do_n_many(self):
        n = self.rng.randint(2, 4)
        stream = self.rng.random() < 0.5
        if self.rng.random() < 0.5:
            path, body = "/v1/chat/completions", self.chat_body(stream)
        else:
            path, body = "/v1/completions", self.completion_body(stream)
        body["n"] = n
        return self.gen("n_many", f"n={n}", path, body, stream, n=n)

    def do_stop(self):
        stop = self.rng.choice(STOP_SETS)
        stream = self.rng.random() < 0.5
        if self.rng.random() < 0.5:
            path, body = "/v1/chat/completions", self.chat_body(stream)
        else:
            path, body = "/v1/completions", self.completion_body(stream)
        body["stop"] = stop[0] if len(stop) == 1 and self.rng.random() < 0.5 else stop
        body["max_tokens"] = max(body["max_tokens"], 16)
        return self.gen("stop", "", path, body, stream, stop=stop)

    def do_shared_prefix(self):
        stream = self.rng.random() < 0.5
        body = self.chat_body(stream, system=self.system_prompt)
        return self.gen("shared_prefix", "", "/v1/chat/completions", body, stream)

    def do_long_prompt(self):
        text = self.words(self.long_words)
        mt = self.rng.randint(4, 16)
        if self.rng.random() < 0.5:
            body = self.completion_body(True, prompt=text + "\n\nIn short,")
            path = "/v1/completions"
        else:
            body = self.chat_body(True, content="Summarise this text in one line:\n" + text)
            path = "/v1/chat/completions"
        body["max_tokens"] = mt
        body["stream_options"] = {"include_usage": True}
        return self.gen("long_prompt", "", path, body, True)

    def do_disconnect(self):
        deadline = time.monotonic() + self.a.request_timeout
        r = self.rng.random()
        chat = self.rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if r < 0.15:
            # Hang up halfway through sending a body.
            ex = truncated_body(self.t, deadline, self.rng)
            sub = "truncated_body"
            stream = False
        elif r < 0.3:
            # A non-streaming request given up on after a moment (a client timeout).
            body = self.chat_body(False) if chat else self.completion_body(False)
            body["max_tokens"] = self.rng.randint(32, 128)
            give_up = time.monotonic() + self.rng.uniform(0.05, 0.5)
            ex = exchange(self.t, "POST", path, json.dumps(body).encode(), min(give_up, deadline))
            if ex.error == "timeout":
                ex.error, ex.disconnected = None, True
            sub = "nonstream_give_up"
            stream = False
        else:
            body = self.chat_body(True) if chat else self.completion_body(True)
            body["max_tokens"] = self.rng.randint(32, 128)
            k = 0 if r < 0.4 else self.rng.randint(1, 5)
            ex = exchange(self.t, "POST", path, json.dumps(body).encode(), deadline, stream=True,
                          stop_after=k)
            sub = f"after_{k}_events"
            stream = True
        if ex.disconnected:
            return Record("disconnect", sub, time.monotonic(), ex.t_total, None, "disconnected",
                          "disconnected")
        # The answer ended before we hung up (a short generation): judge it as a normal one.
        rec = self.judge_gen("disconnect", sub, path, ex, stream, 1, None, None)
        return rec

    # -- bad requests ----------------------------------------------------------------------
    def bad_cases(self):
        """name -> (method, path, body bytes, statuses intended, whether it is a parameter the
        server may not implement yet: a 200 then counts as accepted_unsupported). Bodies are
        built on demand (some are large)."""
        m = self.t.model
        user = [{"role": "user", "content": "hi"}]
        chat, comp = "/v1/chat/completions", "/v1/completions"
        ctx = self.t.ctx or 8192
        rng = self.rng

        def j(o):
            return lambda: json.dumps(o).encode()

        def raw(b):
            return lambda: b

        return {
            "invalid_json": ("POST", chat, raw(b'{"model": "' + m.encode() + b'", "messages": ['),
                             {400}, False),
            "empty_body": ("POST", chat, raw(b""), {400}, False),
            "body_not_object": ("POST", comp, raw(b"[1, 2, 3]"), {400}, False),
            "missing_model": ("POST", chat, j({"messages": user, "max_tokens": 4}), {400}, False),
            "unknown_model": ("POST", chat, j({"model": "no-such-model", "messages": user,
                                               "max_tokens": 4}), {404}, False),
            "temperature_string": ("POST", chat, j({"model": m, "messages": user,
                                                    "temperature": "hot"}), {400}, False),
            "temperature_range": ("POST", comp, j({"model": m, "prompt": "a",
                                                   "temperature": 9}), {400}, False),
            "messages_string": ("POST", chat, j({"model": m, "messages": "hi"}), {400}, False),
            "messages_empty": ("POST", chat, j({"model": m, "messages": []}), {400}, False),
            "bad_role": ("POST", chat, j({"model": m, "messages": [{"role": "king",
                                                                    "content": "x"}]}),
                         {400}, False),
            "stop_ints": ("POST", comp, j({"model": m, "prompt": "a", "stop": [1, 2]}),
                          {400}, False),
            "max_tokens_oversize": ("POST", chat, j({"model": m, "messages": user,
                                                     "max_tokens": 1 << 40}), {400}, False),
            "max_tokens_zero": ("POST", comp, j({"model": m, "prompt": "a", "max_tokens": 0}),
                                {400}, False),
            "max_tokens_float": ("POST", chat, j({"model": m, "messages": user,
                                                  "max_tokens": 2.5}), {400}, False),
            "n_too_big": ("POST", chat, j({"model": m, "messages": user, "n": 1000,
                                           "max_tokens": 4}), {400}, False),
            "prompt_over_context": ("POST", comp, lambda: json.dumps({
                "model": m, "max_tokens": 4,
                "prompt": [rng.randrange(100, 5000) for _ in range(ctx + 16)]}).encode(),
                {400}, False),
            "prompt_negative_ids": ("POST", comp, j({"model": m, "prompt": [1, -3],
                                                     "max_tokens": 4}), {400}, False),
            # 3 MB: over axum's default body limit (413); a server taking it must refuse the
            # prompt as longer than the context (400).
            "oversize_body": ("POST", comp, lambda: json.dumps({
                "model": m, "max_tokens": 4, "prompt": "x " * 1_500_000}).encode(),
                {400, 413}, False),
            "unknown_route": ("GET", "/v1/no-such-route", None, {404}, False),
            "unknown_route_post": ("POST", "/v1/engines/x/completions", j({}), {404}, False),
            "wrong_method_get_chat": ("GET", chat, None, {405}, False),
            "wrong_method_delete": ("DELETE", comp, None, {405}, False),
            "wrong_method_post_models": ("POST", "/v1/models", j({}), {405}, False),
            "unsupported_tools": ("POST", chat, j({
                "model": m, "messages": user, "max_tokens": 4,
                "tools": [{"type": "function",
                           "function": {"name": "f", "parameters": {"type": "object"}}}]}),
                {400}, True),
            "bad_json_schema": ("POST", chat, j({
                "model": m, "messages": user, "max_tokens": 4,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "strict": True,
                                                    "schema": {"type": "wibble"}}}}),
                {400}, False),
            "logit_bias_outside_vocabulary": ("POST", comp, j({
                "model": m, "prompt": "a", "max_tokens": 4, "logit_bias": {"99999999": -100}}),
                {400}, False),
        }

    def do_bad(self):
        cases = self.bad_cases()
        sub = self.rng.choice(sorted(cases))
        method, path, make_body, intended, unsupported = cases[sub]
        body = make_body() if make_body else None
        deadline = time.monotonic() + self.a.request_timeout
        ex = exchange(self.t, method, path, body, deadline)
        end = time.monotonic()
        if ex.error is None and ex.status in intended:
            return Record("bad", sub, end, ex.t_total, None, "intended", error_key(ex))
        if ex.error is None and ex.status == 200 and unsupported:
            return Record("bad", sub, end, ex.t_total, None, "accepted_unsupported",
                          "HTTP 200 (not refused)")
        return Record("bad", sub, end, ex.t_total, None, "unexpected",
                      f"{error_key(ex)} for bad request {sub}")


DEFAULT_MIX = ("chat=18,chat_stream=14,completion=9,completion_stream=9,n_many=6,stop=7,"
               "shared_prefix=6,long_prompt=4,disconnect=9,bad=18")


class Server:
    """A `supernode serve` this script started."""

    def __init__(self, args):
        self.args = args
        self.proc = None
        self.port = None
        self.log_path = args.server_log or tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1]
        self.exit_code = None
        self.kv_bytes_per_token = None

    def start(self):
        a = self.args
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [a.bin, "serve", "--model", a.model, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += a.server_args.split()
        print(f"starting: {' '.join(cmd)}  (log: {self.log_path})", flush=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     # Its own session: a Ctrl-C meant for this script must
                                     # not reach the server; the script stops it at the end.
                                     start_new_session=True)
        t = Target("127.0.0.1", self.port, a.api_key)
        deadline = time.monotonic() + a.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: the server exited with {self.proc.returncode} before "
                                 f"listening; its log:\n{self.log_text()[-4000:]}")
            try:
                st, _ = t.get("/health", timeout=2.0)
                if st == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.25)
        else:
            self.stop()
            raise SystemExit(f"soak: the server did not answer /health within "
                             f"{a.startup_timeout}s; its log:\n{self.log_text()[-4000:]}")
        m = re.search(r"\((\d+) tokens, (\d+) bytes/token\)", self.log_text())
        if m:
            self.kv_bytes_per_token = int(m.group(2))
        return t

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60.0):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = "killed after SIGTERM timeout"
                return self.exit_code
        self.exit_code = self.proc.returncode
        self.log.close()
        return self.exit_code


def fmt(x, spec="{:.3f}", none="-"):
    return none if x is None else spec.format(x)


GEN_KINDS = ("chat", "chat_stream", "completion", "completion_stream", "n_many", "stop",
             "shared_prefix", "long_prompt")


def window_stats(index, t_start, t_end, recs, mem, met, label=None):
    gen_ok = [r for r in recs if r.outcome == "ok"]
    lat = [r.latency for r in gen_ok]
    lat_short = [r.latency for r in gen_ok if r.kind != "long_prompt"]
    ttft = [r.ttft for r in gen_ok if r.ttft is not None]
    dur = max(t_end - t_start, 1e-9)
    outcomes = {}
    for r in recs:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    unexpected = {}
    intended = {}
    for r in recs:
        if r.outcome == "unexpected":
            unexpected[r.key] = unexpected.get(r.key, 0) + 1
        elif r.outcome == "intended":
            intended[r.key] = intended.get(r.key, 0) + 1
    met = met or {}
    return {
        "window": label or index,
        "t_start_s": round(t_start, 3),
        "t_end_s": round(t_end, 3),
        "requests": len(recs),
        "requests_per_s": len(recs) / dur,
        "ok": outcomes.get("ok", 0),
        "intended_4xx": outcomes.get("intended", 0),
        "accepted_unsupported": outcomes.get("accepted_unsupported", 0),
        "disconnected": outcomes.get("disconnected", 0),
        "unexpected": outcomes.get("unexpected", 0),
        "unexpected_by_kind": unexpected,
        "intended_by_kind": intended,
        "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)},
        "latency_short_s": {f"p{q}": percentile(lat_short, q) for q in (50, 95, 99)},
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)},
        "output_tokens_per_s": sum(r.tokens for r in gen_ok) / dur,
        "rss_kb": mem.get("VmRSS"),
        "rss_anon_kb": mem.get("RssAnon"),
        "rss_file_kb": mem.get("RssFile"),
        "_short_lat": lat_short,
        "kv_blocks_in_use": met.get("supernode_kv_blocks_in_use"),
        "prefix_cache_blocks": met.get("supernode_prefix_cache_blocks"),
        "requests_running": met.get("supernode_num_requests_running"),
        "requests_waiting": met.get("supernode_num_requests_waiting"),
    }


HEADER = (f"{'win':>5} {'end_s':>7} {'reqs':>5} {'rps':>6} {'ok':>5} {'4xx':>4} {'disc':>4} "
          f"{'unexp':>5} | {'lat p50':>7} {'p95':>6} {'p99':>6} | {'ttft p50':>8} {'p95':>6} "
          f"{'p99':>6} | {'tok/s':>6} {'RSS MiB':>8} {'KV res':>7} {'kv use/pfx':>10} {'run/wait':>8}")


def window_line(w):
    def i(x):
        return "-" if x is None else str(int(x))
    kv = f"{i(w['kv_blocks_in_use'])}/{i(w['prefix_cache_blocks'])}"
    rw = f"{i(w['requests_running'])}/{i(w['requests_waiting'])}"
    rss = fmt(w["rss_kb"] / 1024 if w["rss_kb"] else None, "{:.1f}")
    kvr = w.get("kv_region_rss_kb")
    kvr = fmt(kvr / 1024 if kvr is not None else None, "{:.1f}")
    return (f"{str(w['window']):>5} {w['t_end_s']:>7.1f} {w['requests']:>5} "
            f"{w['requests_per_s']:>6.2f} {w['ok']:>5} {w['intended_4xx']:>4} "
            f"{w['disconnected']:>4} {w['unexpected']:>5} | "
            f"{fmt(w['latency_s']['p50']):>7} {fmt(w['latency_s']['p95']):>6} "
            f"{fmt(w['latency_s']['p99']):>6} | {fmt(w['ttft_s']['p50']):>8} "
            f"{fmt(w['ttft_s']['p95']):>6} {fmt(w['ttft_s']['p99']):>6} | "
            f"{w['output_tokens_per_s']:>6.1f} {rss:>8} {kvr:>7} {kv:>10} {rw:>8}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("server (start one, or target one)")
    g.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080 (loopback only)")
    g.add_argument("--pid", type=int, help="with --url: the server's PID, for its RSS")
    g.add_argument("--bin", default="target/release/supernode", help="the supernode binary")
    g.add_argument("--model", help="model for `supernode serve --model` (with --url: the model "
                   "id to request; default: the first of /v1/models)")
    g.add_argument("--server-args", default="", help='extra `serve` arguments, e.g. '
                   '"--precision quantized --kv-cache-mib 256"')
    g.add_argument("--server-log", help="where the started server's output goes (default: a "
                   "temporary file)")
    g.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    g.add_argument("--startup-timeout", type=float, default=300.0)
    g.add_argument("--kv-bytes-per-token", type=int,
                   help="KV bytes per token, when not read from the started server's log")
    r = ap.add_argument_group("traffic")
    r.add_argument("--minutes", type=float, default=10.0)
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-requests", type=int, default=0, help="stop after this many (0: no cap)")
    r.add_argument("--request-timeout", type=float, default=120.0,
                   help="deadline of each request, seconds")
    r.add_argument("--max-tokens", type=int, default=48, help="upper bound of max_tokens drawn "
                   "for ordinary requests (disconnecting clients ask for 32-128)")
    r.add_argument("--long-prompt-words", type=int, default=1500,
                   help="words in a long prompt (about 1.3 tokens each; capped to fit the context)")
    r.add_argument("--mix", default=DEFAULT_MIX, help=f"kind=weight,... (default: {DEFAULT_MIX})")
    v = ap.add_argument_group("sampling and verdict")
    v.add_argument("--interval", type=float, default=30.0, help="seconds per window")
    v.add_argument("--warmup-windows", type=int, default=1,
                   help="windows left out of the RSS and p95 baselines")
    v.add_argument("--rss-tolerance", type=float, default=5.0, help="percent")
    v.add_argument("--rss-judge", choices=("net", "raw"), default="net",
                   help="judge RSS growth net of KV pages first touched (default, when the KV "
                        "bytes per token are known) or the raw VmRSS growth")
    v.add_argument("--p95-tolerance", type=float, default=1.5, help="ratio last/first")
    v.add_argument("--p95-judge", choices=("windows", "pooled"), default="windows",
                   help="compare the median of the windows' p95 (default) or the p95 of the "
                        "requests pooled, first third against last")
    v.add_argument("--p95-windows", type=int, default=0,
                   help="windows pooled on each side of the p95 comparison (default 0: a third "
                        "of those after warm-up; at most a third)")
    v.add_argument("--p95-min-requests", type=int, default=20,
                   help="fewer finished requests on a side skips the p95 check")
    v.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for the server to go idle at the end")
    v.add_argument("--unreachable-timeout", type=float, default=20.0,
                   help="end the run when /metrics has not answered for this many seconds")
    v.add_argument("--json-out", help="write every window and the verdict here")
    a = ap.parse_args()

    a.mix_kinds = []
    for part in a.mix.split(","):
        k, _, w = part.partition("=")
        k = k.strip()
        if not hasattr(Traffic, "do_" + k):
            ap.error(f"--mix: unknown kind {k!r}")
        if float(w) > 0:
            a.mix_kinds.append((k, float(w)))
    if not a.mix_kinds:
        ap.error("--mix: no kind with a positive weight")

    server = None
    if a.url:
        u = urllib.parse.urlparse(a.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address")
        t = Target(u.hostname, u.port or 80, a.api_key)
        pid = a.pid
    else:
        if not a.model:
            ap.error("give --model (to start a server) or --url")
        if not os.path.exists(a.bin):
            ap.error(f"no binary at {a.bin} (cargo build --release --bin supernode)")
        server = Server(a)
        t = server.start()
        pid = server.proc.pid
    kv_bpt = a.kv_bytes_per_token or (server.kv_bytes_per_token if server else None)

    def shutdown_server():
        if server is not None and server.exit_code is None:
            print("stopping the server (SIGTERM) ...", flush=True)
            code = server.stop()
            print(f"server exit status: {code}", flush=True)

    try:
        st, body = t.get("/v1/models")
        card = json.loads(body)["data"][0]
        t.model = a.model if (a.url and a.model) else card["id"]
        if server is not None:
            t.model = card["id"]
        t.ctx = card.get("max_model_len")
    except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as e:
        shutdown_server()
        raise SystemExit(f"soak: cannot read /v1/models: {e}")

    long_words = a.long_prompt_words
    if t.ctx:
        long_words = max(16, min(long_words, int((t.ctx - 200) / 2)))
    sys_rng = random.Random(f"soak-system-{a.seed}")
    system_prompt = ("You are a helpful assistant. Context: "
                     + " ".join(sys_rng.choice(WORDS) for _ in range(300)))

    m0 = t.metrics() or {}
    print(f"soak: model {t.model} (context {t.ctx}) at http://{t.host}:{t.port}, "
          f"{a.minutes} min, concurrency {a.concurrency}, seed {a.seed}, window {a.interval}s, "
          f"server pid {pid or '-'}", flush=True)

    records = []
    lock = threading.Lock()
    stop = threading.Event()
    issued = [0]
    t_origin = time.monotonic()
    t_end_run = t_origin + a.minutes * 60.0

    def worker(wid):
        rng = random.Random(f"soak-{a.seed}-{wid}")
        tr = Traffic(t, a, rng, system_prompt, long_words)
        while not stop.is_set() and time.monotonic() < t_end_run:
            with lock:
                if a.max_requests and issued[0] >= a.max_requests:
                    return
                issued[0] += 1
            try:
                rec = tr.next()
            except Exception as e:  # a bug in this script, or something unforeseen
                rec = Record("internal", "", time.monotonic(), 0.0, None, "unexpected",
                             f"client_exception:{type(e).__name__}:{e}")
            rec.t_end -= t_origin
            with lock:
                records.append(rec)
            if rec.outcome == "unexpected" and rec.key.startswith("conn:ConnectionRefused"):
                time.sleep(0.5)  # the server is not listening: do not spin

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(a.concurrency)]
    for th in threads:
        th.start()

    windows = []
    consumed = 0
    hw = {"kv_in_use": 0.0, "touched_bound": 0.0}
    total_blocks = m0.get("supernode_kv_blocks_total")
    rss_peak = 0
    server_died = None
    interrupted = False
    last_met = None

    kv_bytes = (int(total_blocks) * BLOCK_SIZE * kv_bpt) if (total_blocks and kv_bpt) else None

    def measure_kv(w):
        """The resident KV pages, measured from /proc/PID/smaps, into window w."""
        reg = kv_region(pid, kv_bytes) if (pid and kv_bytes) else None
        w["kv_region_size_kb"] = reg[0] if reg else None
        w["kv_region_rss_kb"] = reg[1] if reg else None

    def sample():
        nonlocal rss_peak, last_met
        met = t.metrics()
        if met:
            last_met = met
            use = met.get("supernode_kv_blocks_in_use", 0.0)
            pfx = met.get("supernode_prefix_cache_blocks", 0.0)
            hw["kv_in_use"] = max(hw["kv_in_use"], use)
            bound = use + pfx
            if total_blocks:
                bound = min(bound, total_blocks)
            hw["touched_bound"] = max(hw["touched_bound"], bound)
        mem = read_status(pid) if pid else {}
        if mem.get("VmRSS"):
            rss_peak = max(rss_peak, mem["VmRSS"])
        return met, mem

    print(HEADER, flush=True)
    n_windows = max(1, math.ceil(a.minutes * 60.0 / a.interval - 1e-9))
    unreachable = 0
    try:
        for wi in range(1, n_windows + 1):
            w_start = (wi - 1) * a.interval
            w_end = min(wi * a.interval, a.minutes * 60.0)
            while True:
                now = time.monotonic() - t_origin
                if now >= w_end:
                    break
                time.sleep(min(2.0, w_end - now))
                met_now, _ = sample()
                if server is not None and not server.alive():
                    server_died = server.proc.returncode
                    break
                unreachable = 0 if met_now else unreachable + 1
                if unreachable * 2.0 >= a.unreachable_timeout:
                    server_died = f"unreachable: no /metrics answer for {a.unreachable_timeout:.0f}s"
                    break
                if a.max_requests and not any(th.is_alive() for th in threads):
                    break
            met, mem = sample()
            w_end_actual = time.monotonic() - t_origin
            with lock:
                recs = records[consumed:]
                consumed = len(records)
            w = window_stats(wi, w_start, w_end_actual, recs, mem, met)
            w["kv_touched_bound_blocks"] = hw["touched_bound"]
            measure_kv(w)
            windows.append(w)
            print(window_line(w), flush=True)
            if server_died is not None or (a.max_requests and
                                           not any(th.is_alive() for th in threads)):
                break
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: finishing the requests in flight ...", flush=True)

    # Wind down: no new requests, wait for those in flight (each is bounded by its deadline).
    stop.set()
    t_stop = time.monotonic() - t_origin
    for th in threads:
        th.join(a.request_timeout + 10.0)
    met, mem = sample()
    with lock:
        recs = records[consumed:]
        consumed = len(records)
    drain = window_stats(0, t_stop, time.monotonic() - t_origin, recs, mem, met, label="drain")
    drain["kv_touched_bound_blocks"] = hw["touched_bound"]
    measure_kv(drain)
    print(window_line(drain), flush=True)

    # Let the server notice the last disconnects and go idle, then read its figures.
    idle = False
    t_idle0 = time.monotonic()
    end_met = None
    while time.monotonic() - t_idle0 < a.drain_timeout:
        if server is not None and not server.alive():
            server_died = server.proc.returncode
            break
        end_met = t.metrics()
        if end_met and end_met.get("supernode_num_requests_running", 0) == 0 \
                and end_met.get("supernode_num_requests_waiting", 0) == 0:
            idle = True
            break
        time.sleep(0.5)
    idle_after = time.monotonic() - t_idle0
    rss_end = read_status_kb(pid, "VmRSS") if pid else None
    hwm = read_status_kb(pid, "VmHWM") if pid else None
    end_met = end_met or {}

    # -- summary --------------------------------------------------------------------------
    allrecs = records
    by_kind = {}
    for r in allrecs:
        d = by_kind.setdefault(r.kind, {"requests": 0, "ok": 0, "intended_4xx": 0,
                                        "accepted_unsupported": 0, "disconnected": 0,
                                        "unexpected": 0})
        d["requests"] += 1
        d[{"intended": "intended_4xx"}.get(r.outcome, r.outcome)] += 1
    for k, d in by_kind.items():
        lat = [r.latency for r in allrecs if r.kind == k and r.outcome == "ok"]
        ttft = [r.ttft for r in allrecs if r.kind == k and r.outcome == "ok" and r.ttft is not None]
        d["latency_s"] = {f"p{q}": percentile(lat, q) for q in (50, 95, 99)}
        d["ttft_s"] = {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)}
    intended = {}
    unexpected = {}
    unsupported = {}
    disconnects = {}
    for r in allrecs:
        if r.outcome == "intended":
            intended.setdefault(r.sub, {}).setdefault(r.key, 0)
            intended[r.sub][r.key] += 1
        elif r.outcome == "unexpected":
            key = f"{r.kind}{'/' + r.sub if r.sub else ''}: {r.key}"
            unexpected[key] = unexpected.get(key, 0) + 1
        elif r.outcome == "accepted_unsupported":
            unsupported[r.sub] = unsupported.get(r.sub, 0) + 1
        elif r.outcome == "disconnected":
            disconnects[r.sub] = disconnects.get(r.sub, 0) + 1
    long_ptoks = [r.prompt_tokens for r in allrecs if r.kind == "long_prompt" and r.prompt_tokens]
    cached = [r.cached_tokens for r in allrecs if r.kind == "shared_prefix" and r.cached_tokens]
    n_unexpected = sum(unexpected.values())

    def delta(name):
        if name not in end_met and name not in m0:
            return None
        return end_met.get(name, 0.0) - m0.get(name, 0.0)

    server_outcomes = {}
    for key in set(end_met) | set(m0):
        mm = re.match(r'supernode_requests_total\{outcome="(\w+)"\}', key)
        if mm:
            server_outcomes[mm.group(1)] = delta(key)

    kv = {
        "kv_blocks_in_use": end_met.get("supernode_kv_blocks_in_use"),
        "kv_blocks_total": end_met.get("supernode_kv_blocks_total"),
        "prefix_cache_blocks": end_met.get("supernode_prefix_cache_blocks"),
        "requests_running": end_met.get("supernode_num_requests_running"),
        "requests_waiting": end_met.get("supernode_num_requests_waiting"),
        "preemptions": delta("supernode_preemptions_total"),
        "prefix_cache_hit_tokens": delta("supernode_prefix_cache_hit_tokens_total"),
        "kv_blocks_in_use_high_water": hw["kv_in_use"],
        "kv_touched_bound_blocks": hw["touched_bound"],
        "idle_after_s": round(idle_after, 2),
        "idle": idle,
    }

    # -- verdict --------------------------------------------------------------------------
    checks = []
    fails = []
    post = windows[a.warmup_windows:]
    rss_info = {}
    if server_died is not None:
        if isinstance(server_died, str):
            fails.append(f"the server became {server_died}")
        else:
            fails.append(f"the server died during the run (exit status {server_died}"
                         + (", a clean shutdown: something signalled it" if server_died == 0
                            else "") + ")")
        if server is not None:
            tail = server.log_text().strip().splitlines()[-8:]
            print("the server's last log lines:\n  " + "\n  ".join(tail), flush=True)
    if interrupted:
        fails.append("interrupted")
    # The first window after warm-up whose KV pool is fully resident (every block used once).
    warm = next((i for i, w in enumerate(post)
                 if total_blocks and (w.get("kv_touched_bound_blocks") or 0) >= total_blocks),
                None)
    if warm is not None and len(post) - warm >= 2 and all(w["rss_kb"] for w in post[warm:]):
        flat = post[warm:]
        base, last = flat[0]["rss_kb"], flat[-1]["rss_kb"]
        top = max(flat, key=lambda w: w["rss_kb"])
        raw = 100.0 * (last - base) / base
        peak = 100.0 * (top["rss_kb"] - base) / base
        rss_info = {"baseline_window": flat[0]["window"], "last_window": flat[-1]["window"],
                    "baseline": "the first window after warm-up with every KV block used once",
                    "rss_baseline_kb": base, "rss_last_kb": last, "growth_pct": raw,
                    "rss_peak_kb": top["rss_kb"], "peak_window": top["window"],
                    "peak_growth_pct": peak,
                    "rss_min_kb": min(w["rss_kb"] for w in flat)}
        for part in ("anon", "file"):
            b, l_ = flat[0].get(f"rss_{part}_kb"), flat[-1].get(f"rss_{part}_kb")
            if b is not None and l_ is not None:
                rss_info[f"rss_{part}_growth_kb"] = l_ - b
        ok = peak <= a.rss_tolerance
        checks.append({"check": "rss_growth", "ok": ok,
                       "judged": "highest VmRSS over the KV-resident baseline", **rss_info})
        if not ok:
            fails.append(f"RSS rose {peak:.1f}% from window {flat[0]['window']} (KV pool "
                         f"resident) to window {top['window']}, over {a.rss_tolerance}%")
    elif len(post) >= 2 and post[0]["rss_kb"] and post[-1]["rss_kb"]:
        base, last = post[0]["rss_kb"], post[-1]["rss_kb"]
        raw = 100.0 * (last - base) / base
        rss_info = {"baseline_window": post[0]["window"], "last_window": post[-1]["window"],
                    "rss_baseline_kb": base, "rss_last_kb": last, "growth_pct": raw}
        for part in ("anon", "file"):
            b, l_ = post[0].get(f"rss_{part}_kb"), post[-1].get(f"rss_{part}_kb")
            if b is not None and l_ is not None:
                rss_info[f"rss_{part}_growth_kb"] = l_ - b
        judged = raw
        how = "raw VmRSS"
        b0, b1 = post[0].get("kv_region_rss_kb"), post[-1].get("kv_region_rss_kb")
        if b0 is not None and b1 is not None:
            # Measured: VmRSS less the resident pages of the KV region, before and after.
            nb, nl = base - b0, last - b1
            net = 100.0 * (nl - nb) / nb
            rss_info.update({"kv_capacity_kb": kv_bytes // 1024,
                             "kv_region_size_kb": [post[0]["kv_region_size_kb"],
                                                   post[-1]["kv_region_size_kb"]],
                             "kv_resident_kb": [b0, b1],
                             "rss_without_kv_kb": [nb, nl], "growth_net_of_kv_pct": net,
                             "net_method": "smaps: VmRSS less the KV region's Rss"})
            if post[0]["kv_region_size_kb"] != post[-1]["kv_region_size_kb"]:
                rss_info["note"] = ("the KV region's size changed: other allocations merged "
                                    "into it, so part of their growth counts as KV")
            if a.rss_judge == "net":
                judged, how = net, "VmRSS less resident KV pages"
        elif kv_bpt:
            # Estimated: an upper bound of the blocks first used between the two windows.
            touched = (post[-1]["kv_touched_bound_blocks"] - post[0]["kv_touched_bound_blocks"])
            kv_kb = touched * BLOCK_SIZE * kv_bpt / 1024.0
            net = 100.0 * (last - base - kv_kb) / base
            rss_info.update({"kv_first_touch_bound_kb": kv_kb, "growth_net_of_kv_pct": net,
                             "net_method": "estimate: VmRSS less an upper bound of the KV "
                                           "blocks first used (in use + prefix-cache blocks)"})
            if a.rss_judge == "net":
                judged, how = net, "VmRSS less KV pages first touched (estimate)"
        if kv_bpt:
            rss_info["kv_bytes_per_token"] = kv_bpt
        ok = judged <= a.rss_tolerance
        checks.append({"check": "rss_growth", "ok": ok, "judged": how, **rss_info})
        if not ok:
            fails.append(f"RSS grew {raw:.1f}% from window {post[0]['window']} to "
                         f"{post[-1]['window']}"
                         + (f" ({rss_info['growth_net_of_kv_pct']:.1f}% without the KV cache's "
                            f"pages)" if "growth_net_of_kv_pct" in rss_info else "")
                         + f", over {a.rss_tolerance}%")
    else:
        checks.append({"check": "rss_growth", "ok": None,
                       "note": "skipped: needs the server's PID and 2 windows after warm-up"})
    # p95 stability: the requests of the first k windows after warm-up pooled, against those
    # of the last k (k: a third of them, or --p95-windows).
    k = max(1, len(post) // 3 if a.p95_windows <= 0 else min(a.p95_windows, len(post) // 3))
    first_lat = [r for w in post[:k] for r in w.pop("_short_lat")] if len(post) >= 2 else []
    last_lat = [r for w in post[-k:] for r in w.pop("_short_lat", [])] if len(post) >= 2 else []
    for w in windows + [drain]:
        w.pop("_short_lat", None)
    if len(post) >= 2 and min(len(first_lat), len(last_lat)) >= a.p95_min_requests:
        pooled = (percentile(first_lat, 95), percentile(last_lat, 95))

        def window_median(ws):
            xs = [w["latency_short_s"]["p95"] for w in ws if w["latency_short_s"]["p95"]]
            return statistics.median(xs) if xs else None

        by_windows = (window_median(post[:k]), window_median(post[-k:]))
        first, last = by_windows if a.p95_judge == "windows" else pooled
        ratio = last / first if first and last is not None else None
        ok = ratio is not None and ratio <= a.p95_tolerance
        checks.append({"check": "p95_stability", "ok": ok, "judged": a.p95_judge,
                       "windows_each_side": k,
                       "requests_first": len(first_lat), "requests_last": len(last_lat),
                       "window_median_p95_s": list(by_windows), "pooled_p95_s": list(pooled),
                       "pooled_p99_s": [percentile(first_lat, 99), percentile(last_lat, 99)],
                       "pooled_p50_s": [percentile(first_lat, 50), percentile(last_lat, 50)],
                       "ratio": ratio})
        if not ok:
            what = "the median window p95" if a.p95_judge == "windows" else "p95 latency"
            fails.append(f"{what} went from {first:.3f}s (windows "
                         f"{post[0]['window']}-{post[k - 1]['window']}) to {last:.3f}s (windows "
                         f"{post[-k]['window']}-{post[-1]['window']}): {fmt(ratio, '{:.2f}')}x, "
                         f"over {a.p95_tolerance}x")
    else:
        checks.append({"check": "p95_stability", "ok": None, "windows_each_side": k,
                       "requests_first": len(first_lat), "requests_last": len(last_lat),
                       "note": f"skipped: needs 2 windows after warm-up and "
                               f"{a.p95_min_requests} finished requests on each side"})
    checks.append({"check": "unexpected_errors", "ok": n_unexpected == 0, "count": n_unexpected})
    if n_unexpected:
        top = sorted(unexpected.items(), key=lambda kv_: -kv_[1])[0]
        fails.append(f"{n_unexpected} unexpected errors (most: {top[1]}x {top[0]})")
    kv_ok = (idle and end_met.get("supernode_kv_blocks_in_use") == 0)
    checks.append({"check": "kv_blocks_released", "ok": kv_ok if end_met else None,
                   "kv_blocks_in_use": kv["kv_blocks_in_use"], "idle": idle})
    if end_met and not kv_ok:
        fails.append(f"at the end: {fmt(kv['kv_blocks_in_use'], '{:.0f}')} KV blocks in use, "
                     f"{fmt(kv['requests_running'], '{:.0f}')} running, "
                     f"{fmt(kv['requests_waiting'], '{:.0f}')} waiting after {idle_after:.0f}s")
    eng_err = server_outcomes.get("error")
    checks.append({"check": "server_error_outcomes", "ok": not eng_err, "count": eng_err})
    if eng_err:
        fails.append(f"the server counted {eng_err:.0f} requests with outcome=error")

    shutdown_server()
    if server is not None:
        ok = server.exit_code == 0
        checks.append({"check": "server_exit_on_sigterm", "ok": ok, "exit": server.exit_code})
        if not ok and server_died is None:
            fails.append(f"the server exited with {server.exit_code} on SIGTERM")

    # -- report ---------------------------------------------------------------------------
    total = len(allrecs)
    dur = (windows[-1]["t_end_s"] if windows else 0) or 1e-9
    print()
    print(f"summary: {total} requests in {t_stop:.0f}s "
          f"({sum(w['requests'] for w in windows) / dur:.2f}/s), "
          f"{sum(d['ok'] for d in by_kind.values())} ok, "
          f"{sum(d['intended_4xx'] for d in by_kind.values())} intended 4xx, "
          f"{sum(d['disconnected'] for d in by_kind.values())} disconnects, "
          f"{sum(d['accepted_unsupported'] for d in by_kind.values())} accepted unsupported, "
          f"{n_unexpected} unexpected")
    print(f"{'kind':<18} {'reqs':>5} {'ok':>5} {'4xx':>5} {'disc':>5} {'unexp':>5} "
          f"{'lat p50':>8} {'p95':>7} {'ttft p50':>8} {'p95':>7}")
    for k in sorted(by_kind):
        d = by_kind[k]
        print(f"{k:<18} {d['requests']:>5} {d['ok']:>5} {d['intended_4xx']:>5} "
              f"{d['disconnected']:>5} {d['unexpected']:>5} {fmt(d['latency_s']['p50']):>8} "
              f"{fmt(d['latency_s']['p95']):>7} {fmt(d['ttft_s']['p50']):>8} "
              f"{fmt(d['ttft_s']['p95']):>7}")
    if long_ptoks:
        print(f"long prompts: {min(long_ptoks)}-{max(long_ptoks)} prompt tokens "
              f"(context {t.ctx})")
    if cached:
        print(f"shared system prompt: cached_tokens median {statistics.median(cached):.0f}")
    print("intended 4xx:", ", ".join(f"{s} ({k.replace('HTTP ', '')}) x{n}"
                                      for s, v in sorted(intended.items())
                                      for k, n in sorted(v.items())) or "none")
    if unsupported:
        print("accepted unsupported (200 where a 400 is intended):",
              ", ".join(f"{k} x{n}" for k, n in sorted(unsupported.items())))
    print("disconnects:", ", ".join(f"{k} x{n}" for k, n in sorted(disconnects.items())) or "none")
    if unexpected:
        print("UNEXPECTED:")
        for k, n in sorted(unexpected.items(), key=lambda x: -x[1]):
            print(f"  {n:>5}  {k}")
    print("server outcomes (requests_total delta):",
          ", ".join(f"{k}={v:.0f}" for k, v in sorted(server_outcomes.items())) or "-")
    print(f"at the end ({'idle' if idle else 'NOT idle'} after {idle_after:.1f}s): "
          f"KV blocks in use {fmt(kv['kv_blocks_in_use'], '{:.0f}')} of "
          f"{fmt(kv['kv_blocks_total'], '{:.0f}')}, prefix-cache blocks (evictable) "
          f"{fmt(kv['prefix_cache_blocks'], '{:.0f}')}, running "
          f"{fmt(kv['requests_running'], '{:.0f}')}, waiting {fmt(kv['requests_waiting'], '{:.0f}')}, "
          f"in-use high-water {kv['kv_blocks_in_use_high_water']:.0f}, preemptions "
          f"{fmt(kv['preemptions'], '{:.0f}')}, prefix hit tokens "
          f"{fmt(kv['prefix_cache_hit_tokens'], '{:.0f}')}")
    if pid:
        print(f"server RSS: end {fmt(rss_end and rss_end / 1024, '{:.1f}')} MiB, peak (VmHWM) "
              f"{fmt(hwm and hwm / 1024, '{:.1f}')} MiB"
              + (f"; growth {rss_info['growth_pct']:+.2f}% (window {rss_info['baseline_window']}"
                 f" -> {rss_info['last_window']})" if rss_info else "")
              + (f", {rss_info['growth_net_of_kv_pct']:+.2f}% without the KV cache's pages"
                 if "growth_net_of_kv_pct" in rss_info else "")
              + (f" (KV resident {rss_info['kv_resident_kb'][0] / 1024:.1f} -> "
                 f"{rss_info['kv_resident_kb'][1] / 1024:.1f} MiB of "
                 f"{rss_info['kv_capacity_kb'] / 1024:.0f})" if "kv_resident_kb" in rss_info
                 else "")
              + (f" (at most {rss_info['kv_first_touch_bound_kb'] / 1024:.1f} MiB of KV pages "
                 f"first touched)" if "kv_first_touch_bound_kb" in rss_info else "")
              + (f"; of the growth, anonymous {rss_info['rss_anon_growth_kb'] / 1024:+.1f} MiB, "
                 f"file-backed {rss_info['rss_file_growth_kb'] / 1024:+.1f} MiB"
                 if "rss_anon_growth_kb" in rss_info and "rss_file_growth_kb" in rss_info
                 else ""))
    for c in checks:
        state = "skip" if c["ok"] is None else ("ok" if c["ok"] else "FAIL")
        extra = {k: v for k, v in c.items() if k not in ("check", "ok")}
        print(f"  [{state:>4}] {c['check']}: {json.dumps(extra, default=str)}")
    verdict = "pass" if not fails else "fail"
    line = "VERDICT: PASS" if not fails else "VERDICT: FAIL: " + "; ".join(fails)

    if a.json_out:
        out = {
            "config": {k: v for k, v in vars(a).items() if k != "mix_kinds"},
            "model": t.model, "context": t.ctx, "server_pid": pid,
            "long_prompt_words": long_words,
            "long_prompt_tokens": [min(long_ptoks), max(long_ptoks)] if long_ptoks else None,
            "windows": windows, "drain": drain,
            "by_kind": by_kind, "intended_4xx": intended, "unexpected": unexpected,
            "accepted_unsupported": unsupported, "disconnects": disconnects,
            "server_outcomes": server_outcomes, "end": kv,
            "rss_end_kb": rss_end, "rss_peak_kb": hwm or rss_peak or None,
            "server_exit": server.exit_code if server else None,
            "verdict": {"result": verdict, "reasons": fails, "checks": checks},
        }
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {a.json_out}")
    print(line, flush=True)
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
