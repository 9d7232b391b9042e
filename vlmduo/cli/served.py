"""``vlmduo ask`` run inside the server for a thin client (``POST /api/cli/ask``).

``vlmduo serve`` hands :func:`run_for_client` to the server it starts (the server
never imports the command line): the server calls it for each thin client's ask.

A ``vlmduo ask`` process that finds a ready server sends it its command line, the
image's bytes and what its terminal looks like (:mod:`vlmduo.cli.thin_client`),
and prints what comes back. The server parses and checks that command line with
the same typer command, answers it with the models it holds, and renders the
answer, the timing table and any error with the same code, for the client's
terminal: the client needs none of typer, rich, httpx or the engine, which is most
of a ``vlmduo ask`` process's start (about 0.4 s of 0.5 s).

The server declines (:class:`Declined`, and the client runs ``vlmduo ask`` itself,
as before) whatever it cannot answer exactly as the client would: other models or
engine settings, an environment that could change what the command means, an image
it was not sent, an image over its caps, ``--no-server``, ``--each``/``--batch``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmduo import __version__
from vlmduo.cli import terminal, thin_client
from vlmduo.serve.wire import BadCall

if TYPE_CHECKING:
    from vlmduo.duo.pipeline import AskOptions, AskResult
    from vlmduo.serve.app import AppConfig
    from vlmduo.serve.host import PairHost
    from vlmduo.serve.runtime import ServerRecord
    from vlmduo.serve.wire import Limits


class Declined(BaseException):  # noqa: N818 - control flow, like GeneratorExit
    """The server does not answer this ask: the client answers it itself.

    A BaseException so that the command's error boundary, which reports every
    Exception as an error line, lets it through untouched.
    """


@dataclass(frozen=True)
class CliCall:
    """What a thin client sends: its ``vlmduo ask`` arguments and its surroundings."""

    argv: list[str]
    image: bytes | None  # the bytes of the IMAGE argument (a file or stdin), read by the client
    read_ms: float
    env: dict[str, str]  # the client's variables that change what an ask means
    version: str
    terminal: terminal.Remote


def parse(body: dict[str, Any]) -> CliCall:
    """The call in a request body; BadCall when it is not one."""
    argv, image, term = body.get("argv"), body.get("image"), body.get("terminal") or {}
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise BadCall("argv must be a list of strings")
    if not isinstance(term, dict):
        raise BadCall("terminal must be an object")
    data = None
    if image is not None:
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise BadCall("image is not base64") from None
    size, shown = term.get("size"), terminal.TERMINAL_ENV
    try:
        return CliCall(
            argv=argv,
            image=data,
            read_ms=float(body.get("read_ms") or 0.0),
            env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
            version=str(body.get("version", "")),
            terminal=terminal.Remote(
                stdout_tty=bool(term.get("stdout_tty")),
                stderr_tty=bool(term.get("stderr_tty")),
                size=(int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None,
                env={str(k): str(v) for k, v in (term.get("env") or {}).items() if k in shown},
                elapsed_ms=float(body.get("elapsed_ms") or 0.0),
            ),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadCall(f"malformed call: {exc}") from None


@dataclass
class Resident:
    """The server's models, as ``vlmduo ask`` running inside the server reaches them."""

    host: PairHost
    record: ServerRecord
    limits: Limits
    call: CliCall
    cancel: threading.Event

    def ask(
        self,
        source: str,
        question: str,
        options: AskOptions,
        refs: dict[str, tuple[str, str | None]],
        roles: tuple[str, ...],
        engine: dict[str, int],
    ) -> AskResult:
        """Answer as ``vlmduo ask`` would in the client; Declined when this server cannot."""
        from vlmduo.media.images import decode_image_bytes
        from vlmduo.serve import runtime

        if not runtime.serves(self.record, runtime.normalize_refs({role: refs[role] for role in roles})):
            raise Declined("this server serves other models")
        if self.record.engine != engine:
            raise Declined("this server runs other engine settings")
        data, read_ms = self.call.image, self.call.read_ms
        if data is None:
            data, read_ms = _shipped_image(source), 0.0
        if len(data) > self.limits.max_image_bytes:
            raise Declined("the image is over this server's cap")
        image = decode_image_bytes(data, source, max_pixels=self.limits.max_pixels, read_ms=read_ms)
        ticket = self.host.admit()
        return self.host.ask(ticket, image, question, options, cancel=self.cancel)


def _shipped_image(source: str) -> bytes:
    """The bytes of ``vlmduo ask example``'s picture, the only image the client may leave out."""
    from vlmduo.media.images import EXAMPLE_IMAGE

    if source != str(EXAMPLE_IMAGE):
        raise Declined("the client did not send the image")
    return EXAMPLE_IMAGE.read_bytes()


_resident: ContextVar[Resident | None] = ContextVar("vlmduo_resident", default=None)


def current() -> Resident | None:
    """The server's models when ``vlmduo ask`` runs inside the server for a client."""
    return _resident.get()


def forbid_local(what: str) -> None:
    """Inside the server, work the client must do itself (load models, many images) declines."""
    if _resident.get() is not None:
        raise Declined(what)


@contextlib.contextmanager
def _inside(resident: Resident) -> Iterator[None]:
    token = _resident.set(resident)
    try:
        with terminal.remote(resident.call.terminal):
            yield
    finally:
        _resident.reset(token)


def run(resident: Resident) -> dict[str, Any]:
    """Run the client's ``vlmduo ask``: ``{"stdout", "stderr", "exit_code"}``, or
    ``{"declined": why}`` when the client must answer it itself."""
    call = resident.call
    if call.version != __version__:
        return {"declined": f"the server runs vlmduo {__version__}, the client {call.version}"}
    if call.env != thin_client.meaning_env(os.environ):
        return {"declined": "the client's environment differs from the server's"}
    from vlmduo.cli.app import run_command

    try:
        with _inside(resident):
            code = run_command(["ask", *call.argv])
    except Declined as why:
        return {"declined": str(why)}
    out = call.terminal
    return {"stdout": out.stdout.getvalue(), "stderr": out.stderr.getvalue(), "exit_code": code}


def run_for_client(
    body: dict[str, Any], host: PairHost, config: AppConfig, cancel: threading.Event
) -> dict[str, Any]:
    """The server's ``cli_runner``: a thin client's call (``BadCall`` for anything else),
    run with this server's models as :func:`run` does."""
    resident = Resident(host, config.record, config.limits, parse(body), cancel)
    return run(resident)
