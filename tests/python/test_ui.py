"""The chat page of `serve --ui`, in headless Chromium (Debian's package), driven through the
DevTools protocol: a message typed and sent streams an answer from the real model, markdown
renders (and model output never becomes HTML), reasoning is folded, and a screenshot of the
conversation differs from one of the empty page.

scripts/python-tests.sh installs Chromium when it is missing and it can (root and apt).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import websocket
from PIL import Image, ImageChops

from conftest import Server, stop_cleanly

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A headless Chromium with one page, spoken to over the DevTools protocol."""

    def __init__(self):
        if CHROMIUM is None:
            pytest.fail("no chromium on PATH: install Debian's `chromium` package")
        self.profile = tempfile.mkdtemp(prefix="supernode-ui-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--window-size=1000,800", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(expr):
                    return
            except AssertionError:
                pass  # (the page may still be loading)
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expr}")

    def screenshot(self) -> Image.Image:
        import base64

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def ui_server():
    # The page sets no `max_tokens`, and at the default temperature a small model can write
    # until its context is full (a CI run timed out so); `-n` caps what it writes.
    s = Server("--ui", "-n", "200")
    try:
        yield s
    finally:
        stop_cleanly(s)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def test_the_page_is_served_only_when_asked(server, ui_server):
    assert httpx.get(server.url + "/").status_code == 404
    r = httpx.get(ui_server.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_chat_in_the_browser(ui_server, browser):
    b = browser
    b.call("Page.enable")
    b.call("Emulation.setDeviceMetricsOverride", width=1000, height=800, deviceScaleFactor=1, mobile=False)
    b.call("Page.navigate", url=ui_server.url + "/")
    b.wait_for("document.getElementById('model').textContent === 'smollm2-135m'")
    empty = b.screenshot()
    b.eval("""(() => {
        const t = document.getElementById('input');
        t.value = 'Write a haiku about the sea.';
        t.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));
    })()""")
    b.wait_for("document.querySelector('.msg.assistant')?.dataset.done !== undefined")
    state = b.eval("""(() => {
        const a = document.querySelector('.msg.assistant');
        return {done: a.dataset.done, text: a.querySelector('.body').textContent,
                user: document.querySelector('.msg.user .body').textContent,
                error: a.classList.contains('error')};
    })()""")
    assert not state["error"], state
    assert state["done"] in ("stop", "length"), state
    assert state["user"] == "Write a haiku about the sea."
    assert len(state["text"].strip()) > 0, state
    # The page samples with the server's defaults, so the answer's text is not pinned: its
    # presence, its finish, and its mark on the screenshot are.
    shot = b.screenshot()
    if out := os.environ.get("SUPERNODE_UI_SCREENSHOT"):
        shot.save(out)
    assert shot.size == empty.size == (1000, 800)
    diff = ImageChops.difference(empty, shot).getbbox()
    assert diff is not None, "the conversation left no mark on the screenshot"
    # The change is in the conversation area, below the header.
    assert diff[3] > 60, diff


def test_markdown_renders_and_output_never_becomes_html(ui_server, browser):
    b = browser
    b.call("Page.navigate", url=ui_server.url + "/")
    b.wait_for("typeof renderMarkdown === 'function'")
    html = b.eval(r"""renderMarkdown("# Title\n**bold** and `a<b>` and *it*\n\n- one\n- two\n\n```py\nprint('<x>')\n```\n<img src=x onerror=alert(1)>")""")
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>a&lt;b&gt;</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code class="language-py">print(&#39;&lt;x&gt;&#39;)</code></pre>' in html
    assert "<img" not in html and "&lt;img" in html
    # Links only to http(s): a javascript: link stays text.
    assert "<a " not in b.eval(r"""renderMarkdown("[x](javascript:alert(1))")""")


def test_reasoning_is_folded(ui_server, browser):
    b = browser
    b.call("Page.navigate", url=ui_server.url + "/")
    b.wait_for("typeof Reply === 'function'")
    state = b.eval("""(() => {
        const r = new Reply(addMessage('assistant'));
        r.delta({reasoning_content: 'think **hard**'});
        r.delta({content: 'the answer'});
        r.done('stop');
        const box = r.div.querySelector('details.reasoning');
        return {hidden: box.hidden, open: box.open, think: box.querySelector('.think').innerHTML,
                body: r.div.querySelector('.body').textContent};
    })()""")
    assert state == {"hidden": False, "open": False, "think": "<p>think <strong>hard</strong></p>",
                     "body": "the answer"}


def test_a_bad_key_shows_the_error(browser):
    s = Server("--ui", api_key="k")
    try:
        browser.call("Page.navigate", url=s.url + "/")
        browser.wait_for("document.getElementById('model').textContent.includes('API key')")
    finally:
        stop_cleanly(s)
