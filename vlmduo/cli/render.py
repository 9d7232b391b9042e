"""Rich rendering for the terminal; stderr only, so stdout stays parseable."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vlmduo.pipeline import AskResult
from vlmduo.timing import AGENT_STAGES

PIPELINE_STAGES = ("stage1", "select", "transfer_prefill", "answer_decode", "critical_path", "total")


def stderr_console(quiet: bool = False) -> Console:
    """The console for everything that is not the answer."""
    return Console(stderr=True, highlight=False, quiet=quiet, soft_wrap=True)


def fmt_ms(value: float | None, missing: str = "–") -> str:
    """Milliseconds the way people read them: ms below 10 s, seconds above; ``missing`` for None."""
    if value is None:
        return missing
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


def bar_chart(
    title: str, rows: Sequence[tuple[str, float, str]], *, width: int = 36, full: float | None = None
) -> Table:
    """A horizontal bar per row (label, value, shown text); ``full`` (default: the largest
    value) is a whole bar, so fractions such as accuracy can be drawn against 1."""
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    top = full or max((v for _, v, _ in rows if v > 0), default=1.0)
    for label, value, shown in rows:
        eighths = round(max(value, 0.0) / top * width * 8)
        bar = "█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths % 8 else "")
        table.add_row(label, Text(bar, style="cyan"), shown)
    return table


def progress_bar(console: Console) -> Progress:
    """A transient bar for a long run: description, bar, done/total, elapsed time."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


def timing_table(result: AskResult) -> Table:
    """Where the time went, stage by stage, per agent and for the pipeline."""
    agents = [(role, a) for role, a in (("small", result.small), ("large", result.large)) if a]
    title = f"mode {result.mode}" + (f" · route {result.route}" if result.route else "")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("stage")
    for role, agent in agents:
        table.add_column(f"{role} ({agent.model})", justify="right")
    for stage in AGENT_STAGES:
        table.add_row(stage, *[fmt_ms(a.timings_ms.get(stage), missing="") for _, a in agents])
    table.add_row(
        Text("tokens p/i/g", style="dim"),
        *[Text("{prompt}/{image}/{generated}".format(**a.tokens), style="dim") for _, a in agents],
    )
    pad = [""] * (len(agents) - 1)
    for stage in PIPELINE_STAGES:
        if stage in result.timings_ms:
            style = "bold" if stage == "total" else None
            table.add_row(
                Text(stage, style=style),
                *pad,
                Text(fmt_ms(result.timings_ms[stage], missing=""), style=style),
            )
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
