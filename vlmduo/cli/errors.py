"""The one place that turns exceptions into a message and an exit code."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from vlmduo.cli import terminal
from vlmduo.cli.process import flush_and_exit
from vlmduo.errors import VlmduoError, one_line

EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    """True when the user asked for tracebacks (``--debug`` or ``VLMDUO_DEBUG=1``)."""
    return os.environ.get("VLMDUO_DEBUG", "") not in ("", "0", "false")


def report(exc: BaseException, console: Console | None = None) -> int:
    """Print ``exc`` on stderr and return the exit code it maps to.

    The form is fixed: one ``Error: <cause>`` line, then, when there is a next step,
    one ``Hint: <what to do>`` line. Neither is ever broken over two lines (a terminal
    wraps them on screen only), so ``2>&1 | grep ^Error:`` finds the cause whole.
    """
    console = console or terminal.console(stderr=True, highlight=False, soft_wrap=True)
    if debug_enabled() and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
        console.print("[red]Interrupted.[/]")
        return EXIT_INTERRUPTED
    if isinstance(exc, VlmduoError):
        console.print(f"[bold red]Error:[/] {escape(one_line(exc.message))}")
        if exc.hint:
            console.print(f"[dim]Hint: {escape(one_line(exc.hint))}[/]")
        return exc.exit_code
    console.print(f"[bold red]Error:[/] unexpected {type(exc).__name__}: {escape(one_line(str(exc)))}")
    console.print(
        "[dim]Hint: run it again with --debug (or VLMDUO_DEBUG=1) for the traceback, and report it.[/]"
    )
    return 1


def is_usage_error(exc: BaseException) -> bool:
    """True for click's own errors (unknown option, missing argument, bad value).

    Told by shape, not class: typer (0.26 on) vendors click, so its exceptions are not
    ``click.ClickException``, and its vendored module is private.
    """
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def report_usage(exc: BaseException) -> int:
    """A mistake click found on the command line, as one Error line and one Hint line."""
    console = terminal.console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]Error:[/] {escape(one_line(exc.format_message()))}")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        console.print(f"[dim]Hint: see {escape(ctx.command_path)} --help[/]")
    return exc.exit_code  # type: ignore[attr-defined]


F = TypeVar("F", bound=Callable[..., Any])


def boundary(func: F) -> F:
    """Wrap a command so every failure becomes one line and the right exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            code = report(exc)
            # Agents were told to stop, but one may sit in an image encode that
            # cannot be interrupted: leave now, as llama.cpp's own tools do on
            # SIGINT, instead of joining it (and running exit handlers under it).
            flush_and_exit(code)
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            raise typer.Exit(report(exc)) from None

    return wrapper  # type: ignore[return-value]
