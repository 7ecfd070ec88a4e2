"""A local mock of the Hub's HTTP routes that hf-hub's client calls, for tests/python/test_hub.py.

Routes (as hf-hub 0.4 calls them; REV is `main` or another revision of the repository, URL-escaped):
- `GET /api/models/{org}/{repo}/revision/{REV}`: `{"sha": COMMIT, "siblings": [{"rfilename": ..}]}`.
- `GET /{org}/{repo}/resolve/{REV}/{file}`: the file, honouring `Range: bytes=A-` and `bytes=A-B`
  (206 with `Content-Range`), with `ETag` (the SHA-256 of the file, as the Hub gives for large
  files), `X-Repo-Commit` and `Content-Length`. hf-hub first asks for `bytes=0-0` to learn the
  size, ETag and commit, then for `bytes=START-`.

A repository may be gated: without `Authorization: Bearer <token>` it answers 401. A file may be
set to break: the next `drops[file]` downloads of it stop after `drop_after` bytes, the
connection closed mid-body. A file in `stalls` sends its headers and first bytes and then nothing
for `stall_secs`; a repository in `stall_info` answers its file list only after `stall_secs`.
Every request is logged as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 16


@dataclass
class MockRepo:
    files: dict[str, Path]  # repo file name -> local file with its bytes (revision `main`)
    token: str | None = None  # gated: this bearer token is required
    revisions: dict[str, dict[str, Path]] = field(default_factory=dict)  # other revisions' files
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for files in [self.files, *self.revisions.values()]:
            for path in files.values():
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                self.sha256[str(path)] = h.hexdigest()

    def at(self, rev: str) -> tuple[str, dict[str, Path]] | None:
        """The commit and files of revision `rev`, or None if there is no such revision."""
        if rev == "main":
            return COMMIT, self.files
        if rev in self.revisions:
            return hashlib.sha1(rev.encode()).hexdigest(), self.revisions[rev]
        return None


class MockHub:
    def __init__(self, repos: dict[str, MockRepo]):
        self.repos = repos
        self.log: list[tuple[str, str, str | None]] = []
        self.drops: dict[str, int] = {}
        self.drop_after = 1 << 20
        self.stalls: set[str] = set()
        self.stall_info: set[str] = set()
        self.stall_secs = 30.0
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

            def do_GET(self) -> None:
                hub.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, file: str, rev: str = "main") -> list[str | None]:
        """The Range headers of the downloads of `file` at revision `rev`, in order."""
        return [r for (_, p, r) in self.log if p.endswith(f"/resolve/{rev}/{file}")]

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "application/json") -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def repo_of(self, h: BaseHTTPRequestHandler, repo_id: str) -> MockRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.reply(h, 404, json.dumps({"error": "Repository not found"}).encode())
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self.reply(h, 401, json.dumps({"error": "Access to this model is restricted"}).encode())
            return None
        return repo

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.log.append(("GET", h.path, h.headers.get("Range")))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", h.path)
        if m:
            repo = self.repo_of(h, m.group(1))
            if repo is None:
                return
            if m.group(1) in self.stall_info:
                time.sleep(self.stall_secs)
            found = repo.at(urllib.parse.unquote(m.group(2)))
            if found is None:
                self.reply(h, 404, b'{"error": "Invalid rev id"}')
                return
            commit, files = found
            body = {"id": m.group(1), "sha": commit, "siblings": [{"rfilename": f} for f in files]}
            self.reply(h, 200, json.dumps(body).encode())
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", h.path)
        if not m:
            self.reply(h, 404, b'{"error": "no such route"}')
            return
        repo = self.repo_of(h, m.group(1))
        if repo is None:
            return
        found = repo.at(urllib.parse.unquote(m.group(2)))
        name = m.group(3)
        if found is None or name not in found[1]:
            self.reply(h, 404, b'{"error": "Entry not found"}')
            return
        self.send_file(h, repo, found[1][name], name, found[0])

    def send_file(self, h: BaseHTTPRequestHandler, repo: MockRepo, path: Path, name: str, commit: str) -> None:
        size = path.stat().st_size
        start, end = 0, size - 1
        rng = h.headers.get("Range")
        partial = False
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            if not m or int(m.group(1)) >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            partial = True
        length = end - start + 1
        drop = False
        with self.lock:
            if length > 1 and self.drops.get(name, 0) > 0:
                self.drops[name] -= 1
                drop = True
        h.send_response(206 if partial else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.send_header("ETag", f'"{repo.sha256[str(path)]}"')
        h.send_header("X-Repo-Commit", commit)
        h.send_header("Accept-Ranges", "bytes")
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if drop:
            h.send_header("Connection", "close")
        h.end_headers()
        limit = min(length, self.drop_after) if drop else length
        stall = length > 1 and name in self.stalls
        with open(path, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < limit:
                block = f.read(min(CHUNK, limit - sent))
                if not block:
                    break
                h.wfile.write(block)
                sent += len(block)
                if stall:
                    h.wfile.flush()
                    time.sleep(self.stall_secs)
                    return
        if drop:
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
