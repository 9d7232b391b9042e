"""The server's HTTP face: a Starlette app over a :class:`~vlmduo.serve.host.PairHost`.

Endpoints:
- ``GET /health``: liveness, no key needed.
- ``GET /api/status``: what is loaded, until when, the queue (``vlmduo ps``).
- ``POST /api/ask``: the native endpoint, returns exactly the ``ask --json`` object.
- ``GET /v1/models``, ``POST /v1/chat/completions``: OpenAI-compatible.

Every error is JSON in OpenAI's shape, and the server keeps serving. Work runs on
its own thread per request (the engine queue makes them take turns); a client that
disconnects sets the request's cancel flag, which stops its ask while it waits or
runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vlmduo import __version__
from vlmduo.answers import formats
from vlmduo.duo import workers
from vlmduo.errors import VlmduoError
from vlmduo.serve import inputs, openai_api, wire
from vlmduo.serve.host import PairHost, QueueFull
from vlmduo.serve.openai_api import ApiError

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

_DONE = object()
# (request body, the host, the app's config, cancel) -> {"stdout", "stderr", "exit_code"}, or
# {"declined": why} when the client must answer itself; wire.BadCall for a malformed body.
CliRunner = Callable[[dict[str, Any], PairHost, "AppConfig", threading.Event], dict[str, Any]]


@dataclass(frozen=True)
class AppConfig:
    """What the app needs besides the host."""

    limits: wire.Limits = field(default_factory=wire.Limits)
    engine: dict[str, int] = field(default_factory=dict)
    api_key: str | None = None
    created: int = field(default_factory=openai_api.now)
    url: str = ""
    record: Any = None  # the server's ServerRecord: thin clients prove they read it (cli_token)
    # Runs a thin client's ``vlmduo ask`` (``POST /api/cli/ask``): handed in by the command
    # line that started the server, which the server does not import. None: no thin clients.
    cli_runner: CliRunner | None = None


def create_app(host: PairHost, config: AppConfig) -> Starlette:
    """The ASGI application serving ``host``."""
    api = _Api(host, config)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/api/status", api.status, methods=["GET"]),
        Route("/api/ask", api.native_ask, methods=["POST"]),
        Route("/api/cli/ask", api.cli_ask, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _unexpected}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    return _KeyCheck(app, config.api_key) if config.api_key else app  # type: ignore[return-value]


# -- errors --------------------------------------------------------------------
async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = {404: f"no such endpoint: {request.url.path}", 405: "method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    error = ApiError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


class _KeyCheck:
    """Requires ``Authorization: Bearer KEY`` on every endpoint but ``/health``."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(
                    401,
                    "missing or wrong API key",
                    code="invalid_api_key",
                    hint="send Authorization: Bearer KEY",
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- helpers -------------------------------------------------------------------
async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, refusing bodies over ``limit`` bytes (413)."""
    too_large = ApiError(
        413,
        f"request body over {limit / 2**20:g} MiB (--max-body-mb)",
        code="request_too_large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def _watch_disconnect(receive: Receive, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
        await asyncio.sleep(0.01)  # a stray message: keep listening, never spin


async def _run_watched(receive: Receive, work: Callable[[threading.Event], Any]) -> Any:
    """Run ``work(cancel)`` on its own thread; a disconnect sets ``cancel``."""
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(receive, cancel))
    try:
        return await asyncio.wrap_future(workers.spawn(work, cancel, name="vlmduo-request"))
    finally:
        watcher.cancel()


class _Api:
    def __init__(self, host: PairHost, config: AppConfig) -> None:
        self.host = host
        self.config = config
        self.pair = host.spec.name

    # -- information -----------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pair": self.pair, "version": __version__})

    async def status(self, request: Request) -> JSONResponse:
        body = self.host.status()
        body.update(
            pid=os.getpid(),
            url=self.config.url,
            version=__version__,
            engine=self.config.engine,
            limits=self.config.limits.to_json(),
            model_ids=openai_api.model_ids(self.pair),
        )
        return JSONResponse(body)

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse(openai_api.models_list(self.pair, self.host.model_names(), self.config.created))

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        mode = openai_api.mode_of(name, self.pair)
        return JSONResponse(
            openai_api.model_card(self.pair, mode, self.host.model_names(), self.config.created)
        )

    # -- asking ----------------------------------------------------------------
    def _admit(self) -> object:
        try:
            return self.host.admit()
        except QueueFull as exc:
            raise ApiError(
                429, exc.message, type="rate_limit_error", code="queue_full", hint=exc.hint
            ) from None

    async def _prepare(self, image_spec: Any) -> tuple[object, Any]:
        """A place in the queue (429 when full), then the request's image, decoded on a
        thread; the place is given up if the image is refused."""
        ticket = self._admit()
        try:
            decoding = workers.spawn(inputs.decode_image, image_spec, self.config.limits, name="vlmduo-image")
            return ticket, await asyncio.wrap_future(decoding)
        except BaseException:
            self.host.queue.withdraw(ticket)
            raise

    def _job(self, ticket: object, image: Any, question: str, options: Any, progress: Any = None) -> Any:
        """The blocking work of one request: wait its turn, answer."""

        def work(cancel: threading.Event) -> Any:
            return self.host.ask(ticket, image, question, options, cancel=cancel, progress=progress)

        return work

    async def _answer(self, request: Request, work: Callable[[threading.Event], Any]) -> Any:
        try:
            return await _run_watched(request.receive, work)
        except VlmduoError as exc:
            raise openai_api.from_vlmduo_error(exc) from None

    async def native_ask(self, request: Request) -> JSONResponse:
        body = await _read_json(request, self.config.limits.max_body_bytes)
        ask = inputs.parse_native(body)
        if ask.engine is not None and ask.engine != self.config.engine:
            raise ApiError(
                409,
                f"this server runs other engine settings ({self.config.engine})",
                code="engine_mismatch",
            )
        ticket, image = await self._prepare(ask.image)
        result = await self._answer(request, self._job(ticket, image, ask.question, ask.options))
        return JSONResponse(result.to_json())

    async def cli_ask(self, request: Request) -> JSONResponse:
        """``vlmduo ask`` for a thin client of this machine's user (``vlmduo.cli.served``)."""
        token = getattr(self.config.record, "cli_token", None)
        given = request.headers.get("x-vlmduo-cli-token", "")
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(403, "not a vlmduo ask of this machine's user", code="forbidden")
        runner = self.config.cli_runner
        if runner is None:
            return JSONResponse({"declined": "this server answers no vlmduo ask"})
        body = await _read_json(request, self.config.limits.max_body_bytes)

        def work(cancel: threading.Event) -> dict[str, Any]:
            return runner(body, self.host, self.config, cancel)

        try:
            return JSONResponse(await _run_watched(request.receive, work))
        except wire.BadCall as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None

    async def chat(self, request: Request) -> Any:
        body = await _read_json(request, self.config.limits.max_body_bytes)
        chat = openai_api.parse_chat(body, self.pair)
        ticket, image = await self._prepare(chat.image_url)
        completion_id, created = openai_api.new_id(), openai_api.now()
        if chat.stream:
            return _ChatStream(self, chat, ticket, image, completion_id, created)
        result = await self._answer(request, self._job(ticket, image, chat.question, chat.options))
        return JSONResponse(openai_api.completion(result, chat, completion_id, created))

    def markers(self) -> set[str]:
        """Thinking markers not to stream as reasoning text."""
        found = {self.host.think_end(role) for role in ("small", "large")}
        return {"</think>"} | {m for m in found if m}


class _ChatStream:
    """A streamed chat completion (server-sent events) as an ASGI response.

    The ask runs on its own thread; reasoning and, for free-format answers, the
    answer are sent as they are decoded. A disconnect cancels the ask.
    """

    def __init__(
        self,
        api: _Api,
        chat: openai_api.ChatRequest,
        ticket: object,
        image: Any,
        completion_id: str,
        created: int,
    ) -> None:
        self.api, self.chat, self.ticket, self.image = api, chat, ticket, image
        self.id, self.created = completion_id, created

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = openai_api.chunk(self.id, self.created, self.chat.model, delta, finish, **extra)
        return _event(body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        live = formats.resolve_format(self.chat.options.fmt, self.chat.question) == "free"

        def sink(kind: str, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, text))

        relay = openai_api.StreamRelay(self.chat.options.mode, live, sink, self.api.markers())
        cancel = threading.Event()
        work = self.api._job(self.ticket, self.image, self.chat.question, self.chat.options, relay)
        future = workers.spawn(work, cancel, name="vlmduo-stream")
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _DONE))
        watcher = asyncio.ensure_future(_watch_disconnect(receive, cancel))
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._send(send, self._chunk({"role": "assistant", "content": ""}))
            while (item := await queue.get()) is not _DONE:
                kind, text = item
                delta = {"reasoning_content": text} if kind == "reasoning" else {"content": text}
                await self._send(send, self._chunk(delta))
            await self._finish(send, future, relay)
        except OSError:  # the client went away while we wrote
            cancel.set()
        finally:
            watcher.cancel()
            if not future.done():
                cancel.set()

    async def _send(self, send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _finish(self, send: Send, future: Any, relay: openai_api.StreamRelay) -> None:
        try:
            result = future.result()
        except VlmduoError as exc:
            await self._send(send, _event(openai_api.from_vlmduo_error(exc).body()))
        except ApiError as exc:
            await self._send(send, _event(exc.body()))
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server goes on
            error = ApiError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error")
            await self._send(send, _event(error.body()))
        else:
            rest = relay.remainder(result.answer or "")
            if rest:
                await self._send(send, self._chunk({"content": rest}))
            data = result.to_json()
            await self._send(send, self._chunk({}, "stop", vlmduo=data))
            if self.chat.include_usage:
                body = openai_api.chunk(self.id, self.created, self.chat.model, {}, None)
                body.update(choices=[], usage=openai_api.usage(data))
                await self._send(send, _event(body))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()
