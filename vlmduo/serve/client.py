"""Asking a running server, as ``vlmduo ask`` does (httpx).

The client reads the image's bytes itself (same messages as in-process for a
missing or unreadable file), the server decodes them under the same name, and the
``ask --json`` object comes back; :func:`ask_server` rebuilds the
:class:`~vlmduo.duo.pipeline.AskResult` from it, so what ``vlmduo ask`` prints is the
same either way. A server that cannot be reached before the request is sent is
:class:`ServerGone` (the caller answers in-process instead); an error the server
reports becomes the same error, with its exit code.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, BinaryIO

from vlmduo.errors import VlmduoError
from vlmduo.serve import wire
from vlmduo.serve.runtime import ServerRecord

if TYPE_CHECKING:
    from vlmduo.duo.pipeline import AskOptions, AskResult


class ServerGone(Exception):
    """The server cannot take this request (not reachable, other settings, too large):
    answer in this process instead."""


class ServerReportedError(VlmduoError):
    """An error the server reported for the ask, with the exit code it maps to."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


class Client:
    """An HTTP client bound to one server (keeps its connection for many asks)."""

    def __init__(self, record: ServerRecord, *, api_key: str | None = None) -> None:
        import httpx

        self.record = record
        key = api_key if api_key is not None else os.environ.get("VLMDUO_API_KEY")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        # No read timeout on asks (a long reasoning is legitimate; Ctrl-C ends it, and
        # the server cancels the work when the connection closes). Proxies from the
        # environment are ignored: the server is local. Its URL is plain http, so no
        # TLS is ever negotiated: verify=False only skips loading a CA bundle that
        # would never be used (about 90 ms of every `vlmduo ask`).
        self._http = httpx.Client(
            base_url=record.url,
            headers=headers,
            timeout=httpx.Timeout(None, connect=5.0),
            trust_env=False,
            verify=False,
        )

    def close(self) -> None:
        """Close the connection."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """``GET /api/status``; ServerGone when it does not answer in ``timeout``."""
        import httpx

        try:
            response = self._http.get("/api/status", timeout=timeout)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServerGone(str(exc)) from exc

    def ask(
        self,
        image: bytes | None,
        image_name: str,
        read_ms: float,
        question: str,
        options: AskOptions,
        engine: dict[str, int],
    ) -> AskResult:
        """``POST /api/ask``: the answer, or the server's error raised as ours."""
        import httpx

        body = wire.native_request(question, image, image_name, read_ms, options, engine)
        try:
            response = self._http.post("/api/ask", json=body)
        except httpx.ConnectError as exc:
            raise ServerGone(f"cannot connect to {self.record.url}: {exc}") from exc
        except httpx.TransportError as exc:
            raise VlmduoError(
                f"the server at {self.record.url} stopped answering: {exc or type(exc).__name__}",
                hint="see vlmduo ps; --no-server answers in this process",
            ) from exc
        if response.status_code == 200:
            return wire.result_from_json(response.json())
        if response.status_code in (409, 413):  # other settings; more than it takes
            raise ServerGone(response.text)
        raise _reported(response)


def _reported(response: Any) -> ServerReportedError:
    try:
        error = response.json()["error"]
        return ServerReportedError(
            error["message"], hint=error.get("hint"), exit_code=int(error.get("exit_code", 1))
        )
    except (ValueError, KeyError, TypeError):
        return ServerReportedError(f"the server answered HTTP {response.status_code}: {response.text[:200]}")


def read_image(source: str | None, stdin: BinaryIO | None = None) -> tuple[bytes | None, str, float]:
    """The image's encoded bytes, its source (the server names it by it in messages, as
    in-process), and the ms it took to read."""
    if source is None:
        return None, "", 0.0
    from vlmduo.media.images import read_image_bytes

    start = time.perf_counter()
    data = read_image_bytes(source, stdin=stdin)
    return data, source, (time.perf_counter() - start) * 1000.0


def ask_server(
    record: ServerRecord,
    image: str | None,
    question: str,
    options: AskOptions,
    engine: dict[str, int],
    *,
    stdin: BinaryIO | None = None,
) -> AskResult:
    """One ask through the server of ``record`` (ServerGone: answer in-process)."""
    data, name, read_ms = read_image(image, stdin)
    with Client(record) as client:
        return client.ask(data, name, read_ms, question, options, engine)
