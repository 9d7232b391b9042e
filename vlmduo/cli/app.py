"""Assembles the typer app from the command modules and owns the exit code."""

from __future__ import annotations

import copy
import functools
import os
import sys
from typing import Any

import typer
import typer.main

from vlmduo import __version__

app = typer.Typer(
    name="vlmduo",
    help=(
        "Ask a question about an image with two local VLMs: a small one reasons, "
        "a large one answers.\n\n"
        'First run: vlmduo doctor, then: vlmduo ask example "How many red circles are there?"'
        " (a picture shipped with vlmduo)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _debug(value: bool) -> None:
    if value:
        os.environ["VLMDUO_DEBUG"] = "1"


def _version(value: bool) -> None:
    if value:
        print(f"vlmduo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False,
        "--debug",
        callback=_debug,
        is_eager=True,
        help="Show the Python traceback of an error (also VLMDUO_DEBUG=1); accepted anywhere on the line.",
    ),
) -> None:
    """vlmduo: a small VLM reasons, a large VLM answers."""


def _register_commands() -> None:
    # Each command module adds its commands to ``app``; imported here so the
    # app module stays the only place that knows them all.
    import importlib

    for module in ("ask_cmd", "models_cmd", "doctor_cmd", "bench_cmd", "eval_cmd", "serve_cmd", "cache_cmd"):
        try:
            mod = importlib.import_module(f"vlmduo.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlmduo.cli.{module}":
                raise
            continue
        mod.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Run the command line ``argv`` (default: this process's) and exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        # Accepted anywhere on the line, like VLMDUO_DEBUG=1: tracebacks on.
        os.environ["VLMDUO_DEBUG"] = "1"
        args = [a for a in args if a != "--debug"]
    from vlmduo.cli.process import flush_and_exit
    from vlmduo.engine import bindings

    # This process is ours: llama-cpp-python's high-level API (numpy, jinja2...) is
    # imported only if something asks for it.
    bindings.import_bindings_only()
    code = run_command(args)
    # Leave without the interpreter's teardown: freeing loaded models and every module
    # one object at a time takes 50-60 ms after the answer is out, and the OS reclaims
    # it all at once (llama.cpp's own tools also just exit). Commands finish their
    # files and threads before they return.
    flush_and_exit(code)


@functools.cache
def _click_command(name: str | None = None) -> Any:
    """The click command typer builds from ``app``, once per process per ``name``.

    For a known command ``name``, a group that holds only that command: typer builds
    every command's parameters up front, 24 ms for all of them against 6 ms for
    ``ask`` alone, paid by every process (and a server runs a command per thin-client
    ask). Anything else (``--help``, a typo) gets the whole app.
    """
    only = [info for info in app.registered_commands if info.name == name]
    if not only:
        return typer.main.get_command(app)
    one = copy.copy(app)  # the same settings and root callback
    one.registered_commands = only
    return typer.main.get_command(one)


def run_command(args: list[str]) -> int:
    """Run one command line and return its exit code; every error is reported on stderr.

    A command-line mistake that click catches (an unknown option, a missing argument,
    a value of the wrong type) is reported like every other error: one ``Error:`` line
    and a ``Hint:`` line on stderr, exit 2. ``vlmduo serve`` runs ``ask`` through here
    for thin clients, on its request threads.
    """
    from vlmduo.cli.errors import is_usage_error, report, report_usage

    try:
        known = {info.name for info in app.registered_commands}
        command = _click_command(args[0] if args and args[0] in known else None)
        code = command.main(args=args, prog_name="vlmduo", standalone_mode=False)
    except typer.Abort:
        code = report(KeyboardInterrupt())
    except Exception as exc:  # noqa: BLE001 - the command line's own mistakes, by shape
        if type(exc).__name__ == "NoArgsIsHelpError":  # `vlmduo` alone: help already printed
            code = exc.exit_code  # type: ignore[attr-defined]
        elif is_usage_error(exc):
            code = report_usage(exc)
        else:
            code = report(exc)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
