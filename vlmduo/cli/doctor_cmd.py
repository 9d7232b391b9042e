"""``vlmduo doctor``: is this machine ready, and where do things live."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary

HELP = """Check that this machine is ready, and say what to run next.

Shows versions, the llama.cpp backend (CPU/CUDA/Metal), GPU offload, where models \
are cached and the offline state; whether the pair you would use (--pair, or \
VLMDUO_PAIR; default: default) is downloaded and the Hub reachable (3 s at most, \
never when offline), with the exact command to run next; and runs the whole duo \
pipeline on synthetic random-weight models as a self-test (no download).

[bold]Examples[/]

  vlmduo doctor

  vlmduo doctor --json | jq .backend

  vlmduo doctor --no-self-test

  vlmduo doctor --large http://gpu:8000/v1#Qwen/Qwen3-VL-8B-Instruct   (checks the server)
"""


def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    self_test: Annotated[
        bool, typer.Option("--self-test/--no-self-test", help="Run the pipeline on synthetic models.")
    ] = True,
    pair: Annotated[str, typer.Option("--pair", help="The pair to check.", envvar="VLMDUO_PAIR")] = "default",
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    debug: opt.Debug = False,
) -> None:
    from vlmduo.doctor import collect

    small_ref, large_ref = opt.pair_defaults(pair, small, large)
    report = collect(self_test=self_test, pair=pair, refs={"small": small_ref, "large": large_ref})
    if json_out:
        print(json.dumps(report.to_json()))
    else:
        _render(report)
    if not report.ok:
        raise typer.Exit(1)


def _render(report) -> None:
    console = Console(highlight=False)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, version in report.versions.items():
        table.add_row(name, version)
    table.add_row("backend", report.backend)
    table.add_row("GPU offload", "yes" if report.gpu_offload else "no (CPU build)")
    for name, path in report.paths.items():
        table.add_row(name, path)
    table.add_row("offline", "yes (HF_HUB_OFFLINE)" if report.offline else "no")
    table.add_row("threading", report.threading)
    now = report.threads
    if now:
        table.add_row(
            "load",
            f"other programs keep {now['others_busy_cores']:g} of {now['cores']} cores busy: "
            f"llama.cpp would run {now['threads_now']} thread(s) now"
            + (", waiting with a short spin" if now["short_spin_now"] else ""),
        )
    if report.pair is not None:
        _pair_rows(table, report.pair)
    test = report.self_test
    if test:
        if test.get("ok"):
            status = f"[green]passed[/] (duo, route {test['route']}, {test['wall_ms']:.0f} ms)"
        else:
            status = f"[red]FAILED[/] {escape(str(test.get('error') or test))}"
        table.add_row("self-test", status)
    for endpoint in report.endpoints:
        if endpoint.get("ok"):
            status = f"[green]ok[/] {endpoint['server']}, model {escape(endpoint['model'])}, vision accepted"
        else:
            status = f"[red]FAILED[/] {escape(endpoint.get('error') or 'no image accepted')}"
        where = escape(endpoint.get("endpoint", endpoint["name"]))
        table.add_row(f"{endpoint['role']} server", f"{where}: {status}")
    console.print(table)
    if report.pair is not None:
        # Outside the table so that no command is broken over two lines: copy, paste, run.
        for number, step in enumerate(report.pair.next_steps):
            lead = "next:" if number == 0 else "  or:"
            console.print(f"[bold]{lead}[/] {escape(step['command'])}", soft_wrap=True)
            console.print(f"      [dim]{escape(step['note'])}[/]", soft_wrap=True)


def _pair_rows(table: Table, pair) -> None:
    """The pair's models (downloaded or not), the Hub, and the next commands."""
    for number, model in enumerate(pair.models):
        if model.source == "synthetic":
            state = "built locally" if model.downloaded else "built on first use (no download)"
        elif model.source == "remote":
            state = "served remotely (its server is checked below)"
        elif model.downloaded:
            state = "[green]downloaded[/]"
        else:
            size = f" (~{model.size_gb:g} GB)" if model.size_gb else ""
            state = f"[yellow]not downloaded[/]{size}"
        if model.hub and model.hub != "found":
            state += f"; {escape(model.hub)}"
        label = f"pair {pair.pair}" if number == 0 else ""
        table.add_row(label, f"{model.role} {escape(model.name)}: {state}")
    table.add_row("hub", Text(f"{pair.endpoint}: {pair.hub}"))


def register(app: typer.Typer) -> None:
    """Add ``doctor`` to the app."""
    app.command("doctor", help=HELP)(boundary(doctor))
