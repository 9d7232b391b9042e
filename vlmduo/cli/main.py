"""The ``vlmduo`` console script: a warm server answers ``vlmduo ask`` before the CLI loads.

Only the standard library and :mod:`vlmduo.cli.thin_client` are imported until it is
known that no server answers; then :mod:`vlmduo.cli.app` (typer, rich) runs as usual.
"""

from __future__ import annotations

import sys

from vlmduo.cli.process import flush_and_exit


def main() -> None:
    """Entry point of ``vlmduo`` and ``python -m vlmduo``."""
    args = sys.argv[1:]
    if args[:1] == ["ask"] and "--no-server" not in args:
        from vlmduo.cli import thin_client

        code = thin_client.ask(args[1:])
        if code is not None:
            # Nothing of this process needs tearing down (no thread, no model, no exit
            # handler of ours): leave without the interpreter's finalisation.
            flush_and_exit(code)
    from vlmduo.cli.app import main as run

    run(args)
