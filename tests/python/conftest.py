"""Fixtures of the end-to-end tests of `supernode serve`: real server processes on free ports.

The binary is $SUPERNODE_BIN (default: target/release/supernode of this checkout); the model is
smollm2-135m, which scripts/test.sh (or scripts/python-tests.sh) has fetched into the cache.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SUPERNODE_BIN", ROOT / "target" / "release" / "supernode"))
MODEL = "smollm2-135m"
API_KEY = "secret"
START_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30  # --shutdown-timeout given to every server
LISTENING = re.compile(r"listening on (http://\S+)")


class Server:
    """One `supernode serve` process; its stderr is collected for failure messages."""

    def __init__(
        self, *extra: str, api_key: str | None = None, shutdown_timeout: int = SHUTDOWN_TIMEOUT, model: str = MODEL
    ):
        self.api_key = api_key
        self.shutdown_timeout = shutdown_timeout
        args = [
            str(BIN),
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--threads",
            "2",
            "--shutdown-timeout",
            str(shutdown_timeout),
            *extra,
        ]
        if api_key is not None:
            args += ["--api-key", api_key]
        self.args = args
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        if not BIN.exists():
            pytest.fail(f"no server binary at {BIN}: run `cargo build --release` or set SUPERNODE_BIN")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or self.url is None:
            self.kill()
            pytest.fail(
                f"`{' '.join(args)}` did not print its listening line within {START_TIMEOUT}s "
                f"(exit code {self.proc.poll()}); stderr:\n{self.stderr()}"
            )

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter

    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def port(self) -> int:
        assert self.url is not None
        return int(self.url.rsplit(":", 1)[1])

    def client(self, api_key: str | None = None, timeout: float = 120.0) -> OpenAI:
        key = api_key if api_key is not None else (self.api_key or "unused")
        # No retries: a 503 or a timeout must show as what it is.
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def http(self, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def terminate(self) -> int:
        """SIGTERM, then the exit code (killing the process if it overstays the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(self.shutdown_timeout + 20)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not exit within {self.shutdown_timeout + 20}s of SIGTERM; stderr:\n{self.stderr()}")
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stop_cleanly(server: Server) -> None:
    code = server.terminate()
    assert code == 0, f"the server exited with {code} after SIGTERM; stderr:\n{server.stderr()}"


@contextlib.contextmanager
def running(*args: str, **kwargs):
    """A server for a fixture's lifetime: stopped cleanly (SIGTERM, exit code 0) at the end, and a
    failure if it died before."""
    s = Server(*args, **kwargs)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            stop_cleanly(s)
        else:
            pytest.fail(f"the server died during the tests (exit code {s.proc.returncode}); stderr:\n{s.stderr()}")


@pytest.fixture(scope="session")
def server():
    """The default server: prefix caching on, context 8192, 16 sequences."""
    with running() as s:
        yield s


@pytest.fixture(scope="session")
def qwen_server():
    """A server on qwen2.5-0.5b, whose chat template renders tools (the tool-calling tests)."""
    with running("--ctx", "4096", model="qwen2.5-0.5b") as s:
        yield s


@pytest.fixture(scope="session")
def small_server():
    """A server with an API key, one running sequence and room for one waiting request."""
    with running("--max-num-seqs", "1", "--max-waiting", "1", "--kv-cache-mib", "64", api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def http(server):
    with server.http() as c:
        yield c


def metrics(http_client: httpx.Client) -> dict[str, float]:
    """The /metrics samples without labels (and labelled ones under their full name)."""
    r = http_client.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def wait_for(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = pred()
        if ok:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {last}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Writes the pass/fail counts where scripts/python-tests.sh reads them ($SUPERNODE_PYTEST_COUNTS)."""
    path = os.environ.get("SUPERNODE_PYTEST_COUNTS")
    if not path:
        return
    stats = terminalreporter.stats
    passed = len([r for r in stats.get("passed", []) if getattr(r, "when", "call") == "call"])
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    skipped = len(stats.get("skipped", []))
    Path(path).write_text(f"{passed} {failed} {skipped}\n")
