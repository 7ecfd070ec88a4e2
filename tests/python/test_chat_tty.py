"""`supernode run --chat` on a terminal: the paths piped stdin never reaches (crates/supernode/tests/
chat_repl.rs drives the chat through a pipe). Each test runs the binary on a pseudo-terminal, types
keys as a user would (escape sequences for the arrows, ^C, ^D) and reads the screen.

- rustyline's line editing reaches the model's prompt and the history file, and the history comes
  back in the next session with the Up arrow;
- Ctrl-C at the prompt clears the line and keeps the chat; Ctrl-D ends it with status 0;
- Ctrl-C during a long reply stops that reply (the terminal's driver sends SIGINT), says so, and
  the next prompt works.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time
from pathlib import Path

import pytest

from conftest import BIN

CACHE = Path(os.environ.get("SUPERNODE_CACHE", Path.home() / ".cache" / "supernode"))
SMOL = CACHE / "models" / "smollm2-135m.gguf"
PROMPT = b">>> "
UP, LEFT = b"\x1b[A", b"\x1b[D"
CTRL_C, CTRL_D = b"\x03", b"\x04"
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Tty:
    """The chat on the child side of a pseudo-terminal; everything it prints lands in `screen`."""

    def __init__(self, cache: Path, *extra: str):
        if not SMOL.is_file():
            pytest.fail(f"{SMOL} is missing: run `supernode fetch smollm2-135m` first")
        args = [str(BIN), "run", "--chat", "--model", str(SMOL), "--temperature", "0", "--threads", "2", *extra]
        env = {**os.environ, "SUPERNODE_CACHE": str(cache), "TERM": "xterm"}
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its stdin, stdout and stderr
            try:
                os.execve(args[0], args, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.screen = b""
        self.status: int | None = None

    def text(self) -> str:
        return ANSI.sub(b"", self.screen).decode(errors="replace")

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def shown(self) -> bytes:
        """The screen without terminal control sequences (offsets below are into this)."""
        return ANSI.sub(b"", self.screen)

    def expect(self, what: bytes, after: int = 0, timeout: float = 120.0) -> int:
        """Reads until `what` is shown at or past offset `after`; returns the offset past it."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.shown().find(what, after)
            if i >= 0:
                return i + len(what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what!r} within {timeout} s; the screen:\n{self.text()}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat ended before {what!r}; the screen:\n{self.text()}")
                self.screen += chunk

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status, reading the screen until the child is gone."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"the chat did not end within {timeout} s; the screen:\n{self.text()}")
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.fd, 65536)
                except OSError:
                    pass
        os.close(self.fd)
        return self.status

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(self.fd)


@pytest.fixture
def chat(tmp_path):
    ttys: list[Tty] = []

    def start(*extra: str) -> Tty:
        t = Tty(tmp_path, *extra)
        ttys.append(t)
        return t

    yield start
    for t in ttys:
        t.close()


def history(tmp_path: Path) -> list[str]:
    """The entries of rustyline's history file (after its version line)."""
    lines = (tmp_path / "chat_history").read_text().splitlines()
    return [l for l in lines if not l.startswith("#V")]


def settle(t: Tty, secs: float = 1.0) -> None:
    """Reads what the chat prints for `secs` (rustyline echoes each key, or redraws the line)."""
    end = time.monotonic() + secs
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([t.fd], [], [], left)
        if ready:
            t.screen += os.read(t.fd, 65536)


def enter(t: Tty) -> int:
    """Presses Enter once the typed keys are echoed, and waits for the prompt after the reply;
    returns the offset past it."""
    settle(t)
    at = len(t.shown())
    t.send(b"\r")
    return t.expect(PROMPT, at)


def test_the_edited_line_is_sent_and_remembered_across_sessions(chat, tmp_path):
    t = chat("-n", "4")
    t.expect(PROMPT)
    assert "/bye" in t.text(), "the terminal chat starts with its help line"
    # Backspace, the Left arrow and Ctrl-A (home) edit the line: "Name is Bbb" becomes
    # "My Name is Bob", and only that is sent.
    t.send(b"Name is Bbb\x7f" + LEFT + b"o" + b"\x01" + b"My ")
    enter(t)
    t.send(CTRL_D)
    assert t.wait() == 0, t.text()
    assert history(tmp_path) == ["My Name is Bob"]
    # The next session finds it with the Up arrow; "!" is added and the line sent again.
    t = chat("-n", "4")
    at = t.expect(PROMPT)
    t.send(UP)
    t.expect(b"My Name is Bob", at)
    t.send(b"!")
    enter(t)
    t.send(b"/bye")
    settle(t)
    t.send(b"\r")
    assert t.wait() == 0, t.text()
    assert history(tmp_path) == ["My Name is Bob", "My Name is Bob!", "/bye"]


def test_ctrl_c_at_the_prompt_clears_the_line_and_ctrl_d_ends_the_chat(chat, tmp_path):
    t = chat("-n", "4")
    at = t.expect(PROMPT)
    t.send(b"never sent" + CTRL_C)
    at = t.expect(b"Ctrl-C clears the line", at)
    t.expect(PROMPT, at)
    t.send(CTRL_D)
    assert t.wait() == 0, t.text()
    assert not (tmp_path / "chat_history").exists() or history(tmp_path) == []


def test_ctrl_c_stops_a_long_reply_and_the_chat_goes_on(chat, tmp_path):
    # 4,000 tokens at any speed this machine has would take far longer than the test allows.
    t = chat("-n", "4000", "--ignore-eos")
    at = t.expect(PROMPT)
    t.send(b"Write a very long story about a ship.\r")
    at = t.expect(b"ship.\r\n", at)  # the echoed line
    # Wait for the reply to stream a little, then interrupt it as a user would.
    deadline = time.monotonic() + 120
    while len(t.shown()) < at + 40 and time.monotonic() < deadline:
        ready, _, _ = select.select([t.fd], [], [], 0.5)
        if ready:
            t.screen += os.read(t.fd, 65536)
    assert len(t.shown()) >= at + 40, t.text()
    t0 = time.monotonic()
    t.send(CTRL_C)
    at = t.expect(b"(reply stopped)", at, timeout=30)
    at = t.expect(PROMPT, at, timeout=30)
    assert time.monotonic() - t0 < 30
    # The session is alive: a short reply, then the end.
    t.send(b"/help\r")
    at = t.expect(b"/clear", at)
    t.expect(PROMPT, at)
    t.send(b"/bye\r")
    assert t.wait() == 0, t.text()
    assert history(tmp_path) == ["Write a very long story about a ship.", "/help", "/bye"]
