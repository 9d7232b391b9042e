"""``vlmduo ask`` through a running server, and many images per call (``--each``, ``--batch``).

Kept apart from ``ask_cmd`` so the single ask stays a short read: ``ask_cmd`` calls
:func:`through_server` before it would load models, and :func:`run_many` when
``--each`` or ``--batch`` is given.
"""

from __future__ import annotations

import glob
import io
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer
from rich.console import Console

from vlmduo.errors import Cancelled, UsageError, VlmduoError

if TYPE_CHECKING:
    from vlmduo.duo.pipeline import AskOptions, AskResult
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.serve.runtime import ServerRecord

NoServer = Annotated[
    bool,
    typer.Option(
        "--no-server",
        help="Answer in this process even when a vlmduo server serves the models.",
        envvar="VLMDUO_NO_SERVER",
    ),
]
Each = Annotated[
    str | None,
    typer.Option(
        "--each",
        metavar="DIR|GLOB",
        help="Ask QUESTION about every image in DIR (or matching GLOB): one JSON line per image.",
    ),
]
Batch = Annotated[
    str | None,
    typer.Option(
        "--batch",
        metavar="FILE.jsonl|-",
        help='JSON Lines of {"image": ..., "question": ...} (QUESTION, if given, is the default): '
        "one JSON line per item.",
    ),
]

# What Pillow reads without plugins; a GLOB picks its own files.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".tga"}
)


def _roles(mode: str) -> tuple[str, ...]:
    return {"duo": ("small", "large"), "small": ("small",)}.get(mode, ("large",))


# -- one ask through a server ----------------------------------------------------
@dataclass
class Served:
    """What :func:`through_server` did: the result and who answered it, or, when no
    server took the ask, the stdin to read the image from in this process."""

    result: AskResult | None = None
    record: ServerRecord | None = None
    stdin: BinaryIO | None = None

    def caption(self) -> str | None:
        """The timing table's line on who answered."""
        if self.result is None or self.record is None:
            return None
        agents = [a for a in (self.result.small, self.result.large) if a is not None]
        reloaded = any(a.timings_ms.get("load", 0.0) > 0 for a in agents)
        state = "models reloaded after an idle unload" if reloaded else "models already loaded: load 0"
        return f"answered by vlmduo serve at {self.record.url} (pid {self.record.pid}); {state}"


def find_server(
    refs: dict[str, tuple[str, str | None]], options: AskOptions, settings: EngineSettings, console: Console
) -> Any:
    """The running server that serves what this ask needs with these settings (a Match);
    one still loading the models is waited for."""
    from vlmduo.serve import runtime

    def waiting(record: ServerRecord) -> None:
        console.print(f"[dim]Waiting for the server at {record.url} to load the models…[/]")

    return runtime.find_server(refs, _roles(options.mode), runtime.engine_fields(settings), on_wait=waiting)


def through_server(
    image: str,
    question: str,
    options: AskOptions,
    refs: dict[str, tuple[str, str | None]],
    settings: EngineSettings,
    console: Console,
    stdin: BinaryIO | None,
) -> Served:
    """Ask a running server that serves these models, if one does.

    Errors the server reports are raised as in-process (same line, same exit code).
    """
    from vlmduo.cli import served
    from vlmduo.serve import client

    resident = served.current()
    if resident is not None:  # running inside the server for a thin client: its own models
        result = resident.ask(image, question, options, refs, _roles(options.mode), runtime_engine(settings))
        return Served(result, resident.record)
    match = find_server(refs, options, settings, console)
    if match.record is None:
        if match.note:
            console.print(f"[dim]Note: {match.note}[/]")
        return Served(stdin=stdin)
    data, name, read_ms = client.read_image(image, stdin)
    try:
        with console.status(f"Asking the server at {match.record.url}…"), client.Client(match.record) as http:
            result = http.ask(data, name, read_ms, question, options, runtime_engine(settings))
    except client.ServerGone:
        # Not reachable (or not for this request): answer here, from the bytes already read.
        return Served(stdin=io.BytesIO(data) if image == "-" and data is not None else stdin)
    return Served(result, match.record)


def runtime_engine(settings: EngineSettings) -> dict[str, int]:
    """The engine fields a server must share (see ``vlmduo.serve.runtime``)."""
    from vlmduo.serve import runtime

    return runtime.engine_fields(settings)


# -- many images ---------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image and question of a run, or why its line could not be read."""

    image: str | None
    question: str | None
    error: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # passed through to the output line (an "id")


def each_items(spec: str, question: str) -> list[Item]:
    """The images of a directory (by suffix) or of a glob (every file it matches), sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        where = f"no images in {spec} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        where = f"no file matches {spec}"
    if not files:
        raise VlmduoError(where, hint="--each takes a directory or a glob such as 'photos/*.jpg' (quoted)")
    return [Item(str(p), question) for p in files]


def batch_items(lines: Iterable[str], question: str | None) -> Iterator[Item]:
    """Items from JSON Lines; a line that cannot be used is an item with its error."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            yield Item(None, None, f"line {number}: not JSON ({exc})")
            continue
        if not isinstance(data, dict):
            yield Item(None, None, f"line {number}: expected an object with image and question")
            continue
        image, text = data.get("image"), data.get("question", question)
        extra = tuple((k, data[k]) for k in ("id",) if k in data)
        if not isinstance(image, str) or not image or image == "-":
            yield Item(None, text, f"line {number}: image must be a path or an http(s) URL", extra)
        elif not isinstance(text, str):
            yield Item(image, None, f"line {number}: no question (give one per line, or QUESTION)", extra)
        else:
            yield Item(image, text, None, extra)


class _InProcess:
    """Answers items with models loaded once, in this process."""

    where = "in this process"

    def __init__(self, refs: dict, options: AskOptions, settings: EngineSettings, offline: bool) -> None:
        from vlmduo import api

        resolved = {role: api.resolve(*refs[role], offline=offline) for role in _roles(options.mode)}
        self.agents, self.load_ms = api.load_agents(resolved, settings)
        self.options = options

    def answer(self, item: Item) -> AskResult:
        from vlmduo import api

        result = api.answer(
            item.image,
            item.question or "",
            self.options,
            small=self.agents.get("small"),
            large=self.agents.get("large"),
            load_ms=self.load_ms,
        )
        self.load_ms = {}  # the first item answered reports the one load
        return result

    def close(self) -> None:
        """Nothing to release: the models stay in this process's cache."""


class _ThroughServer:
    """Answers items through a running server, on one connection."""

    def __init__(self, record: ServerRecord, options: AskOptions, settings: EngineSettings) -> None:
        from vlmduo.serve.client import Client

        self.where = f"by the server at {record.url}"
        self.client = Client(record)
        self.options = options
        self.engine = runtime_engine(settings)

    def answer(self, item: Item) -> AskResult:
        from vlmduo.serve.client import read_image

        data, name, read_ms = read_image(item.image)
        return self.client.ask(data, name, read_ms, item.question or "", self.options, self.engine)

    def close(self) -> None:
        self.client.close()


def many_items(
    image: str | None, question: str | None, each: str | None, batch: str | None
) -> tuple[Iterable[Item], int | None]:
    """The items of ``--each`` or ``--batch`` (and how many, when known). The one
    positional argument given is the question (IMAGE's place holds it)."""
    if each is not None and batch is not None:
        raise UsageError("give --each or --batch, not both")
    if question is not None:
        raise UsageError(
            "with --each or --batch the images come from the option: give only QUESTION",
            hint="vlmduo ask --each photos/ 'What is in the picture?'",
        )
    if each is not None:
        if image is None:
            raise UsageError(
                "--each needs QUESTION", hint="vlmduo ask --each photos/ 'What is in the picture?'"
            )
        items = each_items(each, image)
        return items, len(items)
    assert batch is not None
    if batch == "-":
        return batch_items(sys.stdin, image), None
    try:
        text = Path(batch).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VlmduoError(
            f"cannot read --batch file {batch}: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    items = list(batch_items(text.splitlines(), image))
    return items, len(items)


def run_many(
    items: Iterable[Item],
    total: int | None,
    *,
    options: AskOptions,
    refs: dict[str, tuple[str, str | None]],
    settings: EngineSettings,
    offline: bool,
    no_server: bool,
    console: Console,
) -> int:
    """Answer every item, one JSON line each on stdout as it completes; 1 if any failed."""
    match = None if no_server else find_server(refs, options, settings, console)
    if match is not None and match.record is None and match.note:
        console.print(f"[dim]Note: {match.note}[/]")
    if match is not None and match.record is not None:
        answerer: Any = _ThroughServer(match.record, options, settings)
    else:
        with console.status("Loading models…"):
            answerer = _InProcess(refs, options, settings, offline)
    done = failed = 0
    start = time.perf_counter()
    try:
        with console.status("Answering…") as status:
            for item in items:
                line, answerer = _one(item, answerer, refs, options, settings, offline)
                failed += "error" in line
                done += 1
                print(json.dumps(line, ensure_ascii=False), flush=True)
                of = f"/{total}" if total is not None else ""
                status.update(f"Answered {done}{of} · {failed} failed")
    finally:
        answerer.close()
    seconds = time.perf_counter() - start
    console.print(f"[dim]{done - failed} answered, {failed} failed, {seconds:.1f} s, {answerer.where}[/]")
    return 1 if failed else 0


def _one(
    item: Item,
    answerer: Any,
    refs: dict,
    options: AskOptions,
    settings: EngineSettings,
    offline: bool,
) -> tuple[dict[str, Any], Any]:
    """The output line of one item (and the answerer for the next one)."""
    from vlmduo.serve.client import ServerGone

    head: dict[str, Any] = {"image": item.image, "question": item.question, **dict(item.extra)}
    if item.error is not None:
        return {**head, "error": {"message": item.error, "hint": None}}, answerer
    try:
        try:
            result = answerer.answer(item)
        except ServerGone:  # the server went away: the rest in this process
            answerer.close()
            answerer = _InProcess(refs, options, settings, offline)
            result = answerer.answer(item)
    except Cancelled:
        raise
    except VlmduoError as exc:
        return {**head, "error": {"message": exc.message, "hint": exc.hint}}, answerer
    return {**head, **result.to_json()}, answerer
