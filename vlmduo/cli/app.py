"""Assembles the typer app from the command modules and owns the exit code."""

from __future__ import annotations

import os
import sys

import typer

from vlmduo import __version__

app = typer.Typer(
    name="vlmduo",
    help=(
        "Ask a question about an image with two local VLMs: a small one reasons, "
        "a large one answers.\n\n"
        "Example: vlmduo ask photo.jpg 'How many cats are there?'"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"vlmduo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """vlmduo: a small VLM reasons, a large VLM answers."""


def _register_commands() -> None:
    # Each command module adds its commands to ``app``; imported here so the
    # app module stays the only place that knows them all.
    import importlib

    for module in ("ask_cmd", "models_cmd", "doctor_cmd", "bench_cmd", "eval_cmd", "serve_cmd"):
        try:
            mod = importlib.import_module(f"vlmduo.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlmduo.cli.{module}":
                raise
            continue
        mod.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vlmduo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        # Accepted anywhere on the line, like VLMDUO_DEBUG=1: tracebacks on.
        os.environ["VLMDUO_DEBUG"] = "1"
        args = [a for a in args if a != "--debug"]
    app(args=args, prog_name="vlmduo")


if __name__ == "__main__":
    main()
