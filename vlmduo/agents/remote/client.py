"""A small OpenAI-chat client on httpx for model servers (vLLM, SGLang, llama-server, Ollama).

Every failure becomes one :class:`~vlmduo.errors.RemoteError` line that names the
endpoint: down, refused (401/403), unknown model or path (404), timed out, a 5xx,
a connection lost mid-reply, a reply without choices. Only 429 and 503 (busy) are
retried, with exponential backoff (or the server's ``Retry-After``). Chat replies
are streamed (server-sent events): progress can be shown as tokens come, and a
``cancel`` flag shuts the request's socket down, so a read blocked on a long
prefill ends at once and the server sees the client go (llama-server only notices
a client leaving while it streams).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from vlmduo import __version__
from vlmduo.errors import Cancelled, RemoteError

RETRY_STATUS = frozenset({429, 503})
USER_AGENT = f"vlmduo/{__version__}"
_POLL_S = 0.01  # how often a request in flight looks at its cancel flag
_MAX_RETRY_AFTER_S = 30.0


class CancelFlag(Protocol):
    """What a cancel flag offers (``threading.Event`` and ``workers.AnyOf`` both do)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the alternatives the server listed."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Reply:
    """One chat completion as the server sent it, with the request's wall time."""

    text: str
    reasoning: str
    finish_reason: str | None
    tokens: list[TokenLogprob]
    usage: dict[str, Any]
    timings: dict[str, Any]  # llama-server's ``timings`` object; {} from other servers
    wall_ms: float
    attempts: int = 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens the server counted (cached ones included)."""
        return int(self.usage.get("prompt_tokens") or self.timings.get("prompt_n", 0))

    @property
    def completion_tokens(self) -> int:
        """Tokens the server generated."""
        return int(self.usage.get("completion_tokens") or self.timings.get("predicted_n", 0))

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens served from the server's prefix cache; None when it does not say."""
        details = self.usage.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            return int(details["cached_tokens"])
        if "cache_n" in self.timings:  # llama-server
            return int(self.timings["cache_n"])
        return None

    @property
    def prompt_ms(self) -> float | None:
        """The server's own prompt-processing time (llama-server), else None."""
        value = self.timings.get("prompt_ms")
        return None if value is None else float(value)

    @property
    def predicted_ms(self) -> float | None:
        """The server's own generation time (llama-server), else None."""
        value = self.timings.get("predicted_ms")
        return None if value is None else float(value)


def normalize_url(url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a given path is kept, the trailing / dropped."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"'{url}' is not an http(s) URL", hint="use e.g. http://127.0.0.1:8080/v1#MODEL")
    return url if parts.path not in ("", "/") else url + "/v1"


def server_root(url: str) -> str:
    """The base URL without its ``/v1`` (where llama-server and vLLM serve ``/tokenize``)."""
    return url[: -len("/v1")] if url.endswith("/v1") else url


class _Abort:
    """Shuts the request's socket down once ``cancel`` is set, from a watcher thread.

    A read blocked in C (the server prefilling a large image) cannot be
    interrupted otherwise. The socket comes from httpcore's trace of the TCP
    connect, so the client keeps no idle connections: every request connects.
    """

    def __init__(self, cancel: CancelFlag | None) -> None:
        self.cancel = cancel
        self.fired = False
        self._stream: Any = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember the network stream of the new connection."""
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")) and "return_value" in info:
            with self._lock:
                self._stream = info["return_value"]
            if self.fired:
                self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def _watch(self) -> None:
        assert self.cancel is not None
        while not self._done.wait(_POLL_S):
            if self.cancel.is_set():
                self.fired = True
                self._shutdown()
                return

    def __enter__(self) -> _Abort:
        if self.cancel is not None:
            threading.Thread(target=self._watch, name="vlmduo-remote-cancel", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()


class Client:
    """JSON over HTTP to one server's OpenAI-compatible API (``url`` ends with ``/v1``)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_keepalive_connections=0),
            transport=transport,
            trust_env=False,  # a laptop's proxy settings must not route loopback or LAN servers
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get(self, path: str, *, cancel: CancelFlag | None = None) -> httpx.Response:
        """GET ``path`` (relative to the base URL, or absolute); a 2xx response with JSON."""
        return self._send("GET", path, None, cancel)[0]

    def post(self, path: str, body: dict[str, Any], *, cancel: CancelFlag | None = None) -> httpx.Response:
        """POST ``body`` as JSON to ``path``; a 2xx response with JSON."""
        return self._send("POST", path, body, cancel)[0]

    def chat(
        self,
        body: dict[str, Any],
        *,
        cancel: CancelFlag | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> Reply:
        """POST ``/chat/completions`` as a stream and collect the first choice.

        ``on_chunk(n)`` is called after each of the ``n`` content chunks received.
        A server that answers with one JSON object instead of a stream is read too.
        """
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{self.url}: cancelled")
            with _Abort(cancel) as abort:
                try:
                    with self._http.stream(
                        "POST", self.url + "/chat/completions", json=body, extensions={"trace": abort.trace}
                    ) as response:
                        delay = self._retry_delay(response, attempt)
                        if delay is None:
                            reply = self._read_chat(response, cancel, on_chunk)
                            reply.wall_ms = (time.perf_counter() - start) * 1000.0
                            reply.attempts = attempt
                            return reply
                except httpx.HTTPError as exc:
                    if abort.fired:
                        raise Cancelled(f"{self.url}: cancelled") from exc
                    raise transport_error(exc, self.url, self.timeout) from exc
            self._sleep(delay, cancel)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying a busy reply (429/503), None to read it now."""
        if response.status_code in RETRY_STATUS and attempt <= self.retries:
            return self._delay(response, attempt)
        if response.status_code >= 400:
            response.read()
            raise status_error(response, self.url, attempt)
        return None

    def _read_chat(
        self, response: httpx.Response, cancel: CancelFlag | None, on_chunk: Callable[[int], None] | None
    ) -> Reply:
        if "text/event-stream" not in response.headers.get("content-type", ""):
            response.read()
            try:
                data = response.json()
            except ValueError as exc:
                raise RemoteError(
                    f"{self.url} sent a reply that is not JSON (HTTP {response.status_code})",
                    hint="is this an OpenAI-compatible server? the URL usually ends with /v1",
                ) from exc
            return parse_reply(data, self.url, 0.0)
        stream = _Stream(self.url)
        for line in response.iter_lines():
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{self.url}: cancelled")
            if stream.feed(line):
                break
            if on_chunk is not None and stream.changed:
                on_chunk(stream.n_content)
        return stream.reply()

    # -- the request, its retries and its failures -----------------------------------
    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, cancel: CancelFlag | None
    ) -> tuple[httpx.Response, int]:
        target = path if path.startswith("http") else self.url + path
        for attempt in range(1, self.retries + 2):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{self.url}: cancelled")
            response = self._once(method, target, body, cancel)
            if response.status_code in RETRY_STATUS and attempt <= self.retries:
                self._sleep(self._delay(response, attempt), cancel)
                continue
            if response.status_code >= 400:
                raise status_error(response, self.url, attempt)
            try:
                response.json()
                return response, attempt
            except ValueError as exc:
                raise RemoteError(
                    f"{self.url} sent a reply that is not JSON (HTTP {response.status_code})",
                    hint="is this an OpenAI-compatible server? the URL usually ends with /v1",
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(
        self, method: str, target: str, body: dict[str, Any] | None, cancel: CancelFlag | None
    ) -> httpx.Response:
        with _Abort(cancel) as abort:
            try:
                return self._http.request(method, target, json=body, extensions={"trace": abort.trace})
            except httpx.HTTPError as exc:
                if abort.fired:
                    raise Cancelled(f"{self.url}: cancelled") from exc
                raise transport_error(exc, self.url, self.timeout) from exc

    def _delay(self, response: httpx.Response, attempt: int) -> float:
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.strip().isdigit():
            return min(float(retry_after), _MAX_RETRY_AFTER_S)
        return self.backoff_s * 2 ** (attempt - 1)

    def _sleep(self, seconds: float, cancel: CancelFlag | None) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{self.url}: cancelled")
            time.sleep(min(left, 0.05))


def transport_error(exc: httpx.HTTPError, url: str, timeout: float) -> RemoteError:
    """One line for a request that got no HTTP answer."""
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteError(f"cannot reach {url}: connection timed out", hint="is the server up?")
    if isinstance(exc, httpx.ConnectError):
        hint = "is the server running? check the URL and port"
        return RemoteError(f"cannot reach {url}: {_reason(exc)}", hint=hint)
    if isinstance(exc, httpx.TimeoutException):
        return RemoteError(
            f"{url} did not answer within {timeout:g} s",
            hint="the server may be overloaded; raise the entry's timeout in models.toml",
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return RemoteError(
            f"the connection to {url} was lost mid-request ({_reason(exc)})",
            hint="did the server stop or restart? check its log",
        )
    return RemoteError(f"request to {url} failed: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return text.splitlines()[0][:200]


def error_message(response: httpx.Response) -> str:
    """The server's own error text: OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``..."""
    try:
        data = response.json()
    except ValueError:
        return " ".join(response.text.split())[:200]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or ""
        else:
            message = str(error)
        return " ".join(str(message).split())[:200]
    return ""


def status_error(response: httpx.Response, url: str, attempts: int = 1) -> RemoteError:
    """One line (and a hint) for an HTTP error status."""
    status = response.status_code
    said = error_message(response)
    detail = f": {said}" if said else ""
    if status in (401, 403):
        return RemoteError(
            f"{url} refused the request (HTTP {status}){detail}",
            hint="check the API key (the entry's api_key_env, or VLMDUO_API_KEY for a URL)",
            status=status,
        )
    if status == 404:
        return RemoteError(
            f"{url}: not found (HTTP 404){detail}",
            hint="check the model id (listed at /v1/models) and that the URL ends with /v1",
            status=status,
        )
    if status in RETRY_STATUS:
        return RemoteError(f"{url} is busy (HTTP {status} after {attempts} attempts){detail}", status=status)
    if status >= 500:
        return RemoteError(
            f"{url} failed (HTTP {status}){detail}", hint="see the server's log", status=status
        )
    return RemoteError(f"{url} rejected the request (HTTP {status}){detail}", status=status)


class _Stream:
    """Collects a streamed chat completion: content and reasoning deltas, log-probs, the
    finish reason, and the usage (and llama-server's timings) of its last events."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tokens: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.saw_choice = False
        self.done = False
        self.changed = False
        self.n_content = 0

    def feed(self, line: str) -> bool:
        """Take one line of the event stream; True at its end (``[DONE]``)."""
        self.changed = False
        if line.startswith("data:"):
            payload = line[5:].strip()
        elif line.startswith("error:"):  # llama-server names failures this way
            payload = line[6:].strip()
        else:
            return False  # blank separators, comments, event names
        if payload == "[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise RemoteError(f"{self.url} sent a malformed event: {payload[:80]}") from exc
        if (isinstance(chunk, dict) and "error" in chunk) or line.startswith("error:"):
            error = chunk.get("error", chunk) if isinstance(chunk, dict) else chunk
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            raise RemoteError(f"{self.url} failed mid-reply: {' '.join(str(message).split())[:200]}")
        self._add(chunk)
        return False

    def _add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self.saw_choice = True
            delta = choice.get("delta") or choice.get("message") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
                self.n_content += 1
                self.changed = True
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self.reasoning.append(reasoning)
                self.n_content += 1
                self.changed = True
            self.tokens += _logprobs(choice.get("logprobs"))
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]

    def reply(self) -> Reply:
        """The collected reply; RemoteError when it held no choice or ended early."""
        if not self.saw_choice:
            raise RemoteError(f"{self.url} replied without choices", hint="see the server's log")
        if not self.done and self.finish_reason is None:
            raise RemoteError(
                f"the connection to {self.url} was lost mid-reply",
                hint="did the server stop or restart? check its log",
            )
        return Reply(
            text="".join(self.text),
            reasoning="".join(self.reasoning),
            finish_reason=self.finish_reason,
            tokens=self.tokens,
            usage=self.usage,
            timings=self.timings,
            wall_ms=0.0,
        )


def parse_reply(data: Any, url: str, wall_ms: float, attempts: int = 1) -> Reply:
    """A ``Reply`` from a chat completion's JSON; RemoteError when it holds no choice."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        said = f": {json.dumps(data)[:160]}" if data else ""
        raise RemoteError(f"{url} replied without choices{said}", hint="see the server's log")
    choice = choices[0]
    message = choice.get("message") or {}
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    return Reply(
        text=message.get("content") or "",
        reasoning=reasoning if isinstance(reasoning, str) else "",
        finish_reason=choice.get("finish_reason"),
        tokens=_logprobs(choice.get("logprobs")),
        usage=data.get("usage") or {},
        timings=data.get("timings") or {},
        wall_ms=wall_ms,
        attempts=attempts,
        raw=data,
    )


def _logprobs(logprobs: Any) -> list[TokenLogprob]:
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return []
    tokens = []
    for item in content:
        if not isinstance(item, dict) or item.get("logprob") is None:
            continue
        top = tuple(
            (str(alt.get("token", "")), float(alt["logprob"]))
            for alt in item.get("top_logprobs") or ()
            if isinstance(alt, dict) and alt.get("logprob") is not None
        )
        tokens.append(TokenLogprob(str(item.get("token", "")), float(item["logprob"]), top))
    return tokens
