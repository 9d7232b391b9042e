"""Rich rendering for the terminal; stderr only, so stdout stays parseable."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmduo.pipeline import AskResult
from vlmduo.timing import AGENT_STAGES

PIPELINE_STAGES = ("stage1", "select", "transfer_prefill", "answer_decode", "critical_path", "total")


def stderr_console(quiet: bool = False) -> Console:
    """The console for everything that is not the answer."""
    return Console(stderr=True, highlight=False, quiet=quiet, soft_wrap=True)


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


def timing_table(result: AskResult) -> Table:
    """Where the time went, stage by stage, per agent and for the pipeline."""
    agents = [(role, a) for role, a in (("small", result.small), ("large", result.large)) if a]
    title = f"mode {result.mode}" + (f" · route {result.route}" if result.route else "")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("stage")
    for role, agent in agents:
        table.add_column(f"{role} ({agent.model})", justify="right")
    for stage in AGENT_STAGES:
        table.add_row(stage, *[_ms(a.timings_ms.get(stage)) for _, a in agents])
    table.add_row(
        Text("tokens p/i/g", style="dim"),
        *[Text("{prompt}/{image}/{generated}".format(**a.tokens), style="dim") for _, a in agents],
    )
    pad = [""] * (len(agents) - 1)
    for stage in PIPELINE_STAGES:
        if stage in result.timings_ms:
            style = "bold" if stage == "total" else None
            table.add_row(Text(stage, style=style), *pad, Text(_ms(result.timings_ms[stage]), style=style))
    return table


def show_reasoning(console: Console, result: AskResult) -> None:
    """The reasoning that was generated and the part transferred, dim."""
    for role, agent in (("small", result.small), ("large", result.large)):
        if agent and agent.reasoning:
            console.print(Text(f"[{role} reasoning] {agent.reasoning}", style="dim"))
    if result.transferred:
        console.print(
            Text(
                f"[transferred, {result.transferred['tokens']} tokens] {result.transferred['text']}",
                style="dim italic",
            )
        )
