"""Rich rendering for the terminal; stderr only, so stdout stays parseable."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vlmduo.agents import AgentResult
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
    """Where the time went, stage by stage, per agent and for the pipeline.

    A remote agent's column says so; its prefill and decode are what its server
    reported, and ``request`` is the wall time of its HTTP requests.
    """
    agents = [(role, a) for role, a in (("small", result.small), ("large", result.large)) if a]
    remote = [_is_remote(a) for _, a in agents]
    title = f"mode {result.mode}" + (f" · route {result.route}" if result.route else "")
    caption = "remote: prefill/decode as its server reports them; request: wall time" if any(remote) else None
    table = Table(title=title, title_justify="left", box=None, pad_edge=False, caption=caption)
    table.add_column("stage")
    for (role, agent), is_remote in zip(agents, remote, strict=True):
        table.add_column(f"{role} ({agent.model}{', remote' if is_remote else ''})", justify="right")
    for stage in AGENT_STAGES + (("request",) if any(remote) else ()):
        table.add_row(stage, *[fmt_ms(a.timings_ms.get(stage), missing="") for _, a in agents])
    table.add_row(
        Text("tokens p/i/g", style="dim"),
        *[Text("{prompt}/{image}/{generated}".format(**a.tokens), style="dim") for _, a in agents],
    )
    if any(remote):
        cached = [a.tokens.get("cached") for _, a in agents]
        table.add_row(Text("cached tok", style="dim"), *[Text("" if c is None else str(c)) for c in cached])
    pad = [""] * (len(agents) - 1)
    rows = dict(result.timings_ms)
    transferred = result.transferred or {}
    if transferred.get("request_ms") is not None:  # a remote transfer: its wall time and cache hits
        rows["transfer_request"] = transferred["request_ms"]
    for stage in (*PIPELINE_STAGES[:4], "transfer_request", *PIPELINE_STAGES[4:]):
        if stage in rows:
            style = "bold" if stage == "total" else None
            shown = fmt_ms(rows[stage], missing="")
            if stage == "transfer_request" and transferred.get("cached_tokens") is not None:
                shown += f" ({transferred['cached_tokens']} cached)"
            table.add_row(Text(stage, style=style), *pad, Text(shown, style=style))
    return table


def _is_remote(agent: AgentResult) -> bool:
    return "request" in agent.timings_ms


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
