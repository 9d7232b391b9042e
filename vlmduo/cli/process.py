"""What a CLI process shares before typer or rich load: its exit, and the terminal's
variables. Standard library only (the thin client imports it)."""

from __future__ import annotations

import os
import sys

# The environment variables rich reads to decide on colour, width and terminal-ness
# (vlmduo.cli.terminal renders for a thin client with these).
TERMINAL_ENV = ("TERM", "COLORTERM", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
TERMINAL_ENV += ("COLUMNS", "LINES")


def flush_and_exit(code: int) -> None:
    """Flush stdout and stderr and end the process now, without the interpreter's teardown.

    A reader that went away (``vlmduo ask ... | head -c1``) is not an error of ours.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
