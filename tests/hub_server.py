"""A local stand-in for the Hugging Face Hub, enough of it for ``hf_hub_download``.

What huggingface_hub asks for (see its ``file_download.py``):

- ``HEAD /{repo}/resolve/{revision}/{filename}``: the metadata call. It needs
  ``X-Repo-Commit`` and an ETag (``X-Linked-Etag`` is preferred, as for LFS files),
  and the size from ``X-Linked-Size`` (or ``Content-Length`` when not redirected).
  Errors are told apart by ``X-Error-Code``: ``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``, ``GatedRepo``.
- Large files redirect (302) to a CDN on another host; huggingface_hub does not follow
  a redirect that leaves the Hub, takes the metadata from the 302 itself and downloads
  from ``Location``. Here the "CDN" is this same server reached as ``localhost``
  instead of ``127.0.0.1``: another host name, so the same code path runs.
- ``GET`` of the file, with ``Range: bytes=N-`` answered by ``206`` and
  ``Content-Range`` so an interrupted download can resume.

Faults for tests: cut the connection part way once (``cut``), or stall part way until
released (``stall``, to interrupt a client), gated repos that need a token.
Every request is recorded in ``requests``.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def fake_gguf(size: int, seed: int) -> bytes:
    """Deterministic bytes that start like a GGUF file; content does not matter here."""
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


@dataclass
class Recorded:
    """One request the server saw."""

    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeRepo:
    """A model repo: its files and the commit they belong to."""

    files: dict[str, bytes]
    commit: str
    token: str | None = None  # gated: only this bearer token gets in


@dataclass
class FakeHub:
    """The server's state; tests change it between requests."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent before cutting
    stall: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent before waiting
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    redirect: bool = True
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo: str, files: dict[str, bytes], token: str | None = None) -> str:
        """Publish ``files`` as ``repo``; returns the commit hash."""
        commit = hashlib.sha1(repo.encode()).hexdigest()
        self.repos[repo] = FakeRepo(dict(files), commit, token)
        return commit

    def reset(self) -> None:
        """Forget repos, faults and the request log."""
        self.release.set()  # let a stalled handler finish before the state goes
        with self._lock:
            self.repos.clear()
            self.requests.clear()
            self.cut.clear()
            self.stall.clear()
            self.redirect = True
        self.stalled = threading.Event()
        self.release = threading.Event()

    def record(self, entry: Recorded) -> None:
        """Append to the request log (handlers run in threads)."""
        with self._lock:
            self.requests.append(entry)

    def start(self) -> FakeHub:
        """Listen on 127.0.0.1 on a free port, in a daemon thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def blob(self, sha: str) -> bytes | None:
        """The content whose sha256 is ``sha``, from any repo."""
        for repo in self.repos.values():
            for content in repo.files.values():
                if hashlib.sha256(content).hexdigest() == sha:
                    return content
        return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # keep pytest output clean

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization")
        self.hub.record(Recorded(self.command, path, self.headers.get("Range"), auth))
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "cdn":
            content = self.hub.blob(parts[1])
            if content is None:
                return self._error(404, "EntryNotFound", None)
            return self._send_file(content, "", head=head, name_for_faults=parts[1])
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound", None)
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", None)
        if repo.token is not None and auth != f"Bearer {repo.token}":
            return self._error(401, "GatedRepo", None, "Access to this model is restricted.")
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", None)
        content = repo.files.get(filename)
        if content is None:
            return self._error(404, "EntryNotFound", repo.commit)
        sha = hashlib.sha256(content).hexdigest()
        if self.hub.redirect:
            self.send_response(302)
            self._hub_headers(repo.commit, sha, len(content))
            self.send_header("Location", f"http://localhost:{self.hub.port}/cdn/{sha}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send_file(content, repo.commit, head=head, name_for_faults=filename)

    def _hub_headers(self, commit: str, sha: str, size: int) -> None:
        self.send_header("X-Repo-Commit", commit)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("ETag", f'"{sha}"')

    def _send_file(self, content: bytes, commit: str, *, head: bool, name_for_faults: str) -> None:
        sha = hashlib.sha256(content).hexdigest()
        start = _range_start(self.headers.get("Range"))
        status = 206 if start else 200
        body = content[start:]
        self.send_response(status)
        if commit:
            self._hub_headers(commit, sha, len(content))
        else:
            self.send_header("ETag", f'"{sha}"')
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        name = self._fault_name(name_for_faults, content)
        if start == 0 and name in self.hub.cut:
            self._cut(body[: self.hub.cut.pop(name)])
        elif start == 0 and name in self.hub.stall:
            self.wfile.write(body[: self.hub.stall.pop(name)])
            self.wfile.flush()
            self.hub.stalled.set()
            self.hub.release.wait(timeout=60)
            self._cut(b"")
        else:
            self.wfile.write(body)

    def _fault_name(self, name: str, content: bytes) -> str:
        # Faults are set by file name; CDN requests only know the content's hash.
        for repo in self.hub.repos.values():
            for filename, data in repo.files.items():
                if data is content:
                    return filename
        return name

    def _cut(self, partial: bytes) -> None:
        self.close_connection = True
        try:
            self.wfile.write(partial)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client is already gone (it was interrupted)

    def _error(self, status: int, code: str, commit: str | None, message: str = "") -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)
