"""``vlmduo doctor``: is this machine ready, and where do things live."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary

HELP = """Check versions, the llama.cpp backend (CPU/CUDA/Metal), GPU offload, where
models are cached, offline state, and run the whole duo pipeline on synthetic
random-weight models as a self-test (no download).

[bold]Examples[/]

  vlmduo doctor

  vlmduo doctor --json | jq .backend

  vlmduo doctor --no-self-test

  vlmduo doctor --large http://gpu:8000/v1#Qwen/Qwen3-VL-8B-Instruct   (checks the server)
"""


def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    self_test: Annotated[bool, typer.Option(help="Run the pipeline on synthetic models.")] = True,
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    pair: opt.Pair = "default",
) -> None:
    from vlmduo.diagnostics import collect

    small_ref, large_ref = opt.pair_defaults(pair, small, large)
    report = collect(self_test=self_test, refs={"small": small_ref, "large": large_ref})
    if json_out:
        print(json.dumps(report.to_json()))
    else:
        _render(report)
    if not report.ok:
        raise typer.Exit(1)


def _render(report) -> None:
    console = Console(highlight=False)
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, version in report.versions.items():
        table.add_row(name, version)
    table.add_row("backend", report.backend)
    table.add_row("GPU offload", "yes" if report.gpu_offload else "no (CPU build)")
    for name, path in report.paths.items():
        table.add_row(name, path)
    table.add_row("offline", "yes (HF_HUB_OFFLINE)" if report.offline else "no")
    table.add_row("threading", report.threading)
    test = report.self_test
    if test:
        if test.get("ok"):
            status = f"[green]passed[/] (duo, route {test['route']}, {test['wall_ms']:.0f} ms)"
        else:
            status = f"[red]FAILED[/] {test.get('error') or test}"
        table.add_row("self-test", status)
    for endpoint in report.endpoints:
        if endpoint.get("ok"):
            status = f"[green]ok[/] {endpoint['server']}, model {endpoint['model']}, vision accepted"
        else:
            status = f"[red]FAILED[/] {endpoint.get('error') or 'vision not accepted'}"
        table.add_row(f"{endpoint['role']} server", f"{endpoint.get('endpoint', endpoint['name'])}: {status}")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``doctor`` to the app."""
    app.command("doctor", help=HELP)(boundary(doctor))
