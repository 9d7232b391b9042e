"""Where a command's output goes: this process's stdout and stderr, or another's.

``vlmduo serve`` runs ``vlmduo ask`` for a thin client (:mod:`vlmduo.cli.thin_client`)
with the same code as in-process, so that both print the same thing. Output then
goes to buffers sent back to the client, rendered for the client's terminal: its
width, whether its stdout and stderr are terminals, its colour settings. The
buffers are held in a context variable, so each request's thread writes to its own
and the server's own streams are never replaced.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from vlmduo.cli.process import TERMINAL_ENV

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["TERMINAL_ENV", "Remote", "console", "current", "remote", "stdout"]


class _Stream(io.StringIO):
    """A buffer that answers ``isatty()`` as the client's stream would."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@dataclass
class Remote:
    """The terminal of a client process: what rich needs to render for it."""

    stdout_tty: bool = False
    stderr_tty: bool = False
    size: tuple[int, int] | None = None  # the first of stdin/stdout/stderr that is a terminal
    env: Mapping[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0  # how long the client process had run when it sent the request
    received: float = field(default_factory=time.perf_counter)
    stdout: _Stream = field(init=False)
    stderr: _Stream = field(init=False)

    def __post_init__(self) -> None:
        self.stdout = _Stream(self.stdout_tty)
        self.stderr = _Stream(self.stderr_tty)

    def process_ms(self) -> float:
        """The client's process time so far: its own part plus the server's."""
        return self.elapsed_ms + (time.perf_counter() - self.received) * 1000.0

    def width(self, is_terminal: bool) -> int:
        """The width rich would find in the client process (see ``rich.console.Console.size``)."""
        if is_terminal and self.env.get("TERM", "").lower() in ("dumb", "unknown"):
            return 80
        columns = self.env.get("COLUMNS", "")
        if columns.isdigit():
            return int(columns)
        return (self.size[0] if self.size else 0) or 80


_remote: ContextVar[Remote | None] = ContextVar("vlmduo_remote_terminal", default=None)


@contextlib.contextmanager
def remote(terminal: Remote) -> Iterator[Remote]:
    """Send this context's command output to ``terminal``'s buffers."""
    token = _remote.set(terminal)
    try:
        yield terminal
    finally:
        _remote.reset(token)


def current() -> Remote | None:
    """The client terminal this command writes for, or None for this process's own."""
    return _remote.get()


def stdout() -> IO[str]:
    """Where the answer goes."""
    terminal = _remote.get()
    return terminal.stdout if terminal is not None else sys.stdout


def console(*, stderr: bool = True, **kwargs: Any) -> Console:
    """A rich console on this process's stream, or on the client's buffer rendered as the
    client's terminal would show it (never animated: a spinner has no place in a buffer)."""
    from rich.console import Console

    terminal = _remote.get()
    if terminal is None:
        return Console(stderr=stderr, **kwargs)
    stream = terminal.stderr if stderr else terminal.stdout
    probe = Console(file=stream, _environ=terminal.env)
    return Console(
        file=stream,
        width=terminal.width(probe.is_terminal),
        force_interactive=False,
        _environ=terminal.env,
        **kwargs,
    )
