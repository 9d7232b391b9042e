"""A recording OpenAI-compatible stub on 127.0.0.1 for the remote-agent tests.

It records every request (method, path, headers, JSON body) and answers from a
queue of canned replies, so tests can check the exact fields vlmduo sends to
vLLM, SGLang, llama-server or Ollama, and force each failure (401, 404, 5xx, a
reply without choices, a slow reply, a stream cut short) deterministically. A
canned completion is streamed as server-sent events when the request asks for a
stream, the way those servers do: a content delta, a finish, a usage event, [DONE].
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Canned:
    """One reply: status, a JSON body (or raw text), headers, and a delay before it."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw: bytes | None = None
    events: list[Any] | None = None  # explicit stream events (dicts, or raw lines as str)
    cut: bool = False  # end the stream without [DONE], closing the connection


def sse_events(data: dict[str, Any]) -> list[Any]:
    """A completion as the events a streaming server sends (OpenAI's chunk shape)."""
    choice = data["choices"][0]
    message = choice["message"]
    delta = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content") is not None:
        delta["reasoning_content"] = message["reasoning_content"]
    first: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
    if "logprobs" in choice:
        first["logprobs"] = choice["logprobs"]
    last: dict[str, Any] = {"choices": [], "usage": data.get("usage")}
    if "timings" in data:
        last["timings"] = data["timings"]
    return [
        {"object": "chat.completion.chunk", "choices": [first]},
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        last,
    ]


def completion(
    content: str = "A",
    *,
    usage: dict[str, Any] | None = None,
    timings: dict[str, Any] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    """A chat completion as OpenAI-compatible servers return it."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    data: dict[str, Any] = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "choices": [choice],
        "usage": usage or {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41},
    }
    if timings is not None:
        data["timings"] = timings
    return data


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes


class RecordingServer:
    """``with RecordingServer(owned_by="vllm", model="m") as stub: ... stub.url``."""

    def __init__(self, *, model: str = "stub-model", owned_by: str = "vllm", server_header: str = "") -> None:
        self.model = model
        self.owned_by = owned_by
        self.server_header = server_header
        self.requests: list[Recorded] = []
        self.queues: dict[str, deque[Canned]] = {}
        self.active = 0  # requests being answered now
        self.max_active = 0  # the most answered at once
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, path: str, *replies: Canned) -> RecordingServer:
        """Queue replies for ``path`` (e.g. ``/v1/chat/completions``), used in order."""
        with self._lock:
            self.queues.setdefault(path, deque()).extend(replies)
        return self

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        """The JSON bodies posted to ``path``, in order."""
        return [r.body for r in self.requests if r.path == path and r.method == "POST"]

    def raw_bodies(self, path: str = "/v1/chat/completions") -> list[bytes]:
        return [r.raw for r in self.requests if r.path == path and r.method == "POST"]

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, path: str) -> Canned | None:
        with self._lock:
            queue = self.queues.get(path)
            return queue.popleft() if queue else None

    def _default(self, method: str, path: str) -> Canned:
        if path == "/v1/models":
            return Canned({"object": "list", "data": [{"id": self.model, "owned_by": self.owned_by}]})
        if path == "/v1/chat/completions":
            return Canned(completion())
        return Canned({"error": {"message": f"no route {method} {path}"}}, status=404)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                with stub._lock:
                    stub.requests.append(Recorded(self.command, self.path, dict(self.headers), body, raw))
                canned = stub._next(self.path) or stub._default(self.command, self.path)
                with stub._lock:
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                try:
                    if canned.delay_s:
                        time.sleep(canned.delay_s)
                    self._answer(canned, body)
                finally:
                    with stub._lock:
                        stub.active -= 1

            def _answer(self, canned: Canned, body: Any) -> None:
                streamed = isinstance(body, dict) and body.get("stream") and canned.status < 400
                if streamed and canned.raw is None:
                    if canned.events is not None:
                        events = canned.events
                    elif isinstance(canned.body, dict) and canned.body.get("choices"):
                        events = sse_events(canned.body)
                    else:
                        events = [canned.body]
                    self._stream(canned, events)
                    return
                payload = canned.raw if canned.raw is not None else json.dumps(canned.body).encode()
                self._reply(canned, "application/json", payload)

            def _reply(self, canned: Canned, content_type: str, payload: bytes) -> None:
                try:
                    self.send_response(canned.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    if stub.server_header:
                        self.send_header("Server", stub.server_header)
                    for key, value in canned.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client went away (a cancel)
                    pass

            def _stream(self, canned: Canned, events: list[Any]) -> None:
                lines = [e if isinstance(e, str) else f"data: {json.dumps(e)}" for e in events]
                if not canned.cut:
                    lines.append("data: [DONE]")
                payload = "".join(f"{line}\n\n" for line in lines).encode()
                if canned.cut:  # no length, no [DONE]: the reply just stops
                    self.close_connection = True
                    self.send_response(canned.status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._reply(canned, "text/event-stream", payload)

            do_GET = _serve  # noqa: N815 - http.server's naming
            do_POST = _serve  # noqa: N815

        return Handler
