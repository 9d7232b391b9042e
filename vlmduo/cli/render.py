"""Rich rendering for the terminal; stderr only, so stdout stays parseable.

Every table here fits the console it is printed on, 80 columns included (rich uses 80
columns when the stream is a pipe or a file and ``COLUMNS`` is unset): names are never
cut. A table too wide for the console is split into several tables that each repeat
the name column (:func:`fitted_tables`), and no cell is ever cut with an ellipsis, a
value too long for any layout folds onto the next line instead.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vlmduo.agents.base import AgentResult
from vlmduo.duo.pipeline import AskResult
from vlmduo.timing import AGENT_STAGES

PIPELINE_STAGES = (
    "stage1",
    "select",
    "transfer_prefill",
    "answer_decode",
    "critical_path",
    "total",
    "process",
)
_GAP = 2  # between two columns: the right padding of one and the left padding of the next


def stderr_console(quiet: bool = False) -> Console:
    """The console for everything that is not the answer."""
    from vlmduo.cli import terminal

    return terminal.console(stderr=True, highlight=False, quiet=quiet, soft_wrap=True)


def fmt_bytes(n: int) -> str:
    """A size in a table: 1.4 GiB, 210.5 MiB, 82 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def fmt_ms(value: float | None, missing: str = "–") -> str:
    """Milliseconds the way people read them: ms below 10 s, seconds above; ``missing`` for None."""
    if value is None:
        return missing
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


# --- tables that fit ------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a fitted table.

    ``wrap`` lets a text column wrap at spaces down to ``min_width``; every other
    column keeps each value on one line. Numbers are right-justified.
    """

    header: str
    justify: str = "left"
    wrap: bool = False
    min_width: int = 16


Cell = str | Text


def _lines_width(value: Cell) -> int:
    plain = value.plain if isinstance(value, Text) else value
    return max((cell_len(line) for line in plain.splitlines()), default=0)


def column_widths(columns: Sequence[Column], rows: Sequence[Sequence[Cell]]) -> list[int]:
    """The width each column needs to show every value (and its header) whole."""
    widths = []
    for index, column in enumerate(columns):
        natural = max([_lines_width(column.header), *(_lines_width(row[index]) for row in rows)])
        widths.append(min(natural, column.min_width) if column.wrap else natural)
    return widths


def pack_columns(widths: Sequence[int], width: int, keys: int = 1) -> list[list[int]]:
    """Split column indexes into groups whose widths fit ``width``, each group starting
    with the ``keys`` first columns (the names), which every group repeats."""
    key_width = sum(widths[:keys]) + _GAP * max(keys - 1, 0)
    groups: list[list[int]] = []
    current: list[int] = []
    used = key_width
    for index in range(keys, len(widths)):
        need = _GAP + widths[index]
        if current and used + need > width:
            groups.append(current)
            current, used = [], key_width
        current.append(index)
        used += need
    if current or not groups:
        groups.append(current)
    return [[*range(keys), *group] for group in groups]


def fitted_tables(
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    *,
    width: int,
    keys: int = 1,
) -> list[Table]:
    """``rows`` as one table when they fit ``width``, else as several tables that each
    repeat the ``keys`` first columns; the first one carries ``title``."""
    groups = pack_columns(column_widths(columns, rows), width, keys)
    tables = []
    for number, group in enumerate(groups):
        table = Table(
            title=title if number == 0 else None,
            title_justify="left",
            box=None,
            pad_edge=False,
            show_edge=False,
        )
        for index in group:
            column = columns[index]
            table.add_column(
                Text(column.header),
                justify=column.justify,  # type: ignore[arg-type]
                no_wrap=not column.wrap,
                min_width=column.min_width if column.wrap else None,  # as packed: wrap no narrower
                overflow="fold",
            )
        for row in rows:
            table.add_row(*(_cell(row[index]) for index in group))
        tables.append(table)
    return tables


def _cell(value: Cell) -> Text:
    return value if isinstance(value, Text) else Text(value)


def print_tables(console: Console, tables: Sequence[RenderableType]) -> None:
    """Print tables one after the other, a blank line between two parts of a split table."""
    for number, table in enumerate(tables):
        if number:
            console.print()
        console.print(table)


# --- charts and progress --------------------------------------------------------------


class BarChart:
    """A horizontal bar per row (label, value, shown text), as wide as the console allows.

    ``full`` (default: the largest value) is a whole bar, so fractions such as
    accuracy can be drawn against 1.
    """

    def __init__(
        self,
        title: str,
        rows: Sequence[tuple[str, float, str]],
        *,
        width: int = 36,
        full: float | None = None,
    ) -> None:
        self.title, self.rows, self.width = title, list(rows), width
        self.full = full or max((v for _, v, _ in rows if v > 0), default=1.0)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        label_width = max((cell_len(label) for label, _, _ in self.rows), default=0)
        shown_width = max((cell_len(shown) for _, _, shown in self.rows), default=0)
        room = options.max_width - label_width - shown_width - 2 * _GAP
        width = max(min(self.width, room), 4)
        table = Table(title=self.title, title_justify="left", box=None, pad_edge=False, show_header=False)
        table.add_column(no_wrap=True, overflow="fold")
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        for label, value, shown in self.rows:
            eighths = round(max(value, 0.0) / self.full * width * 8)
            bar = "█" * (eighths // 8) + (" ▏▎▍▌▋▊▉"[eighths % 8] if eighths % 8 else "")
            table.add_row(Text(label), Text(bar, style="cyan"), Text(shown))
        yield table


def bar_chart(
    title: str, rows: Sequence[tuple[str, float, str]], *, width: int = 36, full: float | None = None
) -> BarChart:
    """A horizontal bar chart (see :class:`BarChart`); bars shrink to fit the console."""
    return BarChart(title, rows, width=width, full=full)


def progress_bar(console: Console) -> Progress:
    """A transient bar for a long run: description, bar, done/total, elapsed time."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


# --- ask ------------------------------------------------------------------------------


def timing_table(result: AskResult) -> Table:
    """Where the time went, stage by stage, per agent and for the pipeline.

    A model's name goes under its role in the header, so the table stays narrow
    (under 80 columns for names up to 30 characters) and names are never cut.
    A remote agent's column says so: its prefill and decode are what its server
    reported, ``request`` is the wall time of its HTTP requests.
    """
    agents = [(role, a) for role, a in (("small", result.small), ("large", result.large)) if a]
    remote = [_is_remote(a) for _, a in agents]
    title = f"mode {result.mode}" + (f" · route {result.route}" if result.route else "")
    caption = "remote: prefill/decode from the server; request: wall" if any(remote) else None
    table = Table(
        title=title, title_justify="left", box=None, pad_edge=False, show_edge=False, caption=caption
    )
    table.add_column("stage", no_wrap=True)
    for (role, agent), is_remote in zip(agents, remote, strict=True):
        head = f"{role} (remote)" if is_remote else role
        table.add_column(f"{head}\n{agent.model}", justify="right", overflow="fold")
    # An image prefix restored from the cache: how long that took, in place of an encode.
    restored = any(a.tokens.get("cached") for _, a in agents)
    stages = list(AGENT_STAGES) + (["request"] if any(remote) else [])
    if restored and not all(remote):
        stages.insert(stages.index("encode"), "restore")
    for stage in stages:
        table.add_row(stage, *[fmt_ms(a.timings_ms.get(stage), missing="") for _, a in agents])
    table.add_row(
        Text("tokens p/i/g", style="dim"),
        *[Text("{prompt}/{image}/{generated}".format(**a.tokens), style="dim") for _, a in agents],
    )
    if any(remote) or restored:
        cached = [a.tokens.get("cached") for _, a in agents]
        table.add_row(Text("cached tok", style="dim"), *[Text("" if c is None else str(c)) for c in cached])
    pad = [""] * (len(agents) - 1)
    rows = dict(result.timings_ms)
    transferred = result.transferred or {}
    if transferred.get("request_ms") is not None:  # a remote transfer: its wall time and cache hits
        rows["transfer_request"] = transferred["request_ms"]
    stages = list(PIPELINE_STAGES)
    stages.insert(stages.index("answer_decode") + 1, "transfer_request")
    for stage in stages:
        if stage in rows:
            style = "bold" if stage in ("total", "process") else None
            shown = fmt_ms(rows[stage], missing="")
            if stage == "transfer_request" and transferred.get("cached_tokens") is not None:
                shown += f" ({transferred['cached_tokens']} cached)"
            table.add_row(Text(stage, style=style), *pad, Text(shown, style=style))
    return table


def _is_remote(agent: AgentResult) -> bool:
    return "request" in agent.timings_ms


# Bidirectional overrides and isolates reorder what a terminal shows; escaped like controls.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escape_controls(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (but newline and tab)
    and bidirectional overrides become visible escapes such as ``\\x1b``."""
    out = []
    for char in text:
        if char in "\n\t":
            out.append(char)
        elif unicodedata.category(char) == "Cc" or char in _BIDI:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def show_reasoning(console: Console, result: AskResult) -> None:
    """The reasoning that was generated and the part transferred, dim, controls escaped."""
    for role, agent in (("small", result.small), ("large", result.large)):
        if agent and agent.reasoning:
            console.print(Text(f"[{role} reasoning] {escape_controls(agent.reasoning)}", style="dim"))
    if result.transferred:
        console.print(
            Text(
                f"[transferred, {result.transferred['tokens']} tokens] "
                f"{escape_controls(result.transferred['text'])}",
                style="dim italic",
            )
        )
