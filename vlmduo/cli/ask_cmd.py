"""``vlmduo ask IMAGE QUESTION``: parse, check, call the core, render."""

from __future__ import annotations

import io
import json
import sys
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer

from vlmduo.cli import batch as many
from vlmduo.cli import checks
from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary
from vlmduo.cli.render import show_reasoning, stderr_console, timing_table
from vlmduo.cli.served import forbid_local
from vlmduo.duo.pipeline import DEFAULT_THINK_BUDGET, AskOptions
from vlmduo.errors import UsageError
from vlmduo.media.images import EXAMPLE_IMAGE

if TYPE_CHECKING:
    from rich.console import Console

    from vlmduo.duo.pipeline import AskResult
    from vlmduo.engine.settings import EngineSettings

# IMAGE `example` names the picture shipped with vlmduo (``media.images.EXAMPLE_IMAGE``).
EXAMPLE = "example"

HELP = """Ask QUESTION about IMAGE: a path, an http(s) URL, - for stdin, or \
example for the picture shipped with vlmduo (use ./example for a file of that name). \
Several questions are answered in turn, one line each, the image paid once.

The answer goes to stdout; the timing table and progress to stderr. Options that \
have no effect in the chosen --mode are refused (exit 2), never silently dropped.

[bold]Examples[/]

  vlmduo ask example "How many red circles are there?"

  vlmduo ask photo.jpg "Which is larger? A. the cup B. the plate" --json

  vlmduo ask photo.jpg "How many people?" "Is it raining?"   (two answers)

  cat scan.png | vlmduo ask - "What does the sign say?" --mode large -q

  vlmduo ask example "Is there a square?" --pair synthetic   (no download)

  vlmduo ask --each photos/ "Is there a dog?" > answers.jsonl   (one load)

A running `vlmduo serve` for the same models answers instead (no load); --no-server \
answers in this process. The models' state up to the image is kept (in the server, \
or on disk: see vlmduo cache), so the next question about the same image costs only \
its own tokens; --no-image-cache neither reuses nor keeps it.
"""

Modes = typer.Option("--mode", help="duo (default), small, large or large-think.")

# Where a parameter's value came from, for "given on the command line" (click's ParameterSource).
_SOURCES_TYPED = ("COMMANDLINE",)


def _needed_roles(mode: str) -> tuple[str, ...]:
    return {"duo": ("small", "large"), "small": ("small",)}.get(mode, ("large",))


def _typed(context: typer.Context) -> set[str]:
    """Names of the parameters given on the command line (not defaults, not env vars)."""
    return {
        name
        for name in context.params
        if (source := context.get_parameter_source(name)) is not None and source.name in _SOURCES_TYPED
    }


def _image_source(image: str) -> str:
    return str(EXAMPLE_IMAGE) if image == EXAMPLE else image


def ask(
    context: typer.Context,
    image: Annotated[
        str | None,
        typer.Argument(
            metavar="IMAGE", help="Image path, http(s) URL, - to read stdin, or example.", show_default=False
        ),
    ] = None,
    questions: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="QUESTION...",
            help="The question(s) about the image, answered in turn.",
            show_default=False,
        ),
    ] = None,
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    small_mmproj: opt.SmallMmproj = None,
    large_mmproj: opt.LargeMmproj = None,
    pair: opt.Pair = "default",
    mode: Annotated[str, Modes] = "duo",
    policy: Annotated[str, typer.Option(help="verify, confidence or always (duo mode).")] = "verify",
    format: Annotated[
        str, typer.Option("--format", help="auto, choice, yesno, number, short or free.")
    ] = "auto",
    max_answer_tokens: opt.MaxAnswerTokens = 16,
    think_budget: opt.ThinkBudget = DEFAULT_THINK_BUDGET,
    transfer_budget: opt.TransferBudget = 64,
    selector: Annotated[str, typer.Option(help="full, tail, steps or surprisal.")] = "steps",
    confidence_threshold: Annotated[
        float, typer.Option(help="Answer probability that skips the small agent (policy confidence).")
    ] = 0.8,
    json_out: opt.JsonOut = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only the answer on stdout; only errors on stderr.")
    ] = False,
    show_reasoning_flag: Annotated[
        bool, typer.Option("--show-reasoning", help="Print reasoning and the transferred part (stderr).")
    ] = False,
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Run the two agents one after the other.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="Reasoning temperature (0: greedy). Default: each model card's sampling "
            "(models.toml); constrained answers are always greedy.",
            show_default=False,
        ),
    ] = None,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    image_max_tokens: opt.ImageMaxTokens = None,
    image_min_tokens: opt.ImageMinTokens = None,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
    debug: opt.Debug = False,
    no_server: many.NoServer = False,
    no_image_cache: Annotated[
        bool,
        typer.Option(
            "--no-image-cache",
            help="Neither reuse nor keep the models' state up to the image (see vlmduo cache).",
        ),
    ] = False,
    each: many.Each = None,
    batch: many.Batch = None,
) -> None:
    options = AskOptions(
        mode=mode,
        policy=policy,
        fmt=format,
        max_answer_tokens=max_answer_tokens,
        think_budget=think_budget,
        transfer_budget=transfer_budget,
        selector=selector,
        sequential=sequential,
        seed=seed,
        temperature=temperature,
        confidence_threshold=confidence_threshold,
        image_cache=not no_image_cache,
    )
    # Every check before any work: no image read, no model resolved or loaded.
    options.validate()
    many_images = each is not None or batch is not None
    questions = questions or []
    if not many_images and (image is None or not questions):
        raise UsageError(
            f"missing {'IMAGE and QUESTION' if image is None else 'QUESTION'}",
            hint='vlmduo ask IMAGE QUESTION, e.g. vlmduo ask photo.jpg "What is this?"',
        )
    checks.applicable(mode, policy, _typed(context))
    checks.output(quiet=quiet, show_reasoning=show_reasoning_flag)
    # With --each/--batch the one positional argument is the (default) question.
    for text in [image] if many_images and image is not None else questions:
        checks.question_format(text, format)
    settings = opt.engine_settings(
        options,
        ctx=ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=verbose,
        image_max_tokens=image_max_tokens,
        image_min_tokens=image_min_tokens,
    )
    refs = opt.model_refs(pair, small, large, small_mmproj, large_mmproj)
    if many_images:
        if show_reasoning_flag:
            raise UsageError(
                "--show-reasoning does not go with --each or --batch: each JSON line has the reasoning"
            )
        question = questions[0] if questions else None
        if len(questions) > 1:
            raise UsageError(
                "with --each or --batch give one QUESTION", hint="vlmduo ask --each photos/ 'Is there a dog?'"
            )
        raise typer.Exit(
            _ask_many(image, question, each, batch, options, refs, settings, offline, no_server, quiet)
        )
    assert image is not None
    console = stderr_console(quiet=quiet or json_out)
    source = _image_source(image)
    stdin = sys.stdin.buffer if image == "-" else None
    if stdin is not None and len(questions) > 1 and not stdin.isatty():  # read once, asked about often
        stdin = _Rereadable(stdin.read(_STDIN_MAX_BYTES + 1))
    while questions and not no_server:  # the server keeps the image's prefix between them
        served = many.through_server(source, questions[0], options, refs, settings, console, stdin)
        stdin = served.stdin  # the image's bytes, when they were read for the server already
        if served.result is None:
            break  # no server (or it went away): the rest in this process
        _render(served.result, json_out, show_reasoning_flag, console, caption=served.caption())
        questions = questions[1:]
    if not questions:
        return
    forbid_local("--no-server: the client loads the models itself")
    _ask_here(
        source, stdin, questions, options, refs, settings, offline, console, json_out, show_reasoning_flag
    )


# load_image's own cap on stdin (a byte more, so that it still says the image is too large).
_STDIN_MAX_BYTES = 50 * 2**20


class _Rereadable(io.BytesIO):
    """Stdin's bytes, read in full by every reader (one per question)."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.tell() >= len(self.getbuffer()):
            self.seek(0)  # all read: the next question reads the image from the start
        return data


def _ask_here(
    source: str,
    stdin: BinaryIO | None,
    questions: list[str],
    options: AskOptions,
    refs: dict[str, tuple[str, str | None]],
    settings: EngineSettings,
    offline: bool,
    console: Console,
    json_out: bool,
    show_reasoning_flag: bool,
) -> None:
    """Load the models in this process and answer each question in turn about one image,
    printing each answer as it comes; the image prefixes are kept on disk for the next
    process (``vlmduo cache``)."""
    from vlmduo import api, paths
    from vlmduo.media.images import load_image

    if options.image_cache:
        size = opt.image_cache_disk_bytes()
        api.keep_image_prefixes(disk=paths.kv_dir() if size else None, disk_bytes=size)
    loaded_image = load_image(source, stdin=stdin)
    resolved = opt.resolve_roles(
        _needed_roles(options.mode), refs, offline=opt.is_offline(offline), progress=not (console.quiet)
    )
    with console.status("Loading models…") as status:
        agents, load_ms = api.load_agents(resolved, settings)

        def progress(agent: str, phase: str, tokens: int) -> None:
            status.update(f"{agent}: {phase} · {tokens} tokens")

        for question in questions:
            result = api.answer(
                loaded_image,
                question,
                options,
                small=agents.get("small"),
                large=agents.get("large"),
                load_ms=load_ms,
                progress=progress,
            )
            load_ms = {}  # the first answer reports the one load
            status.stop()
            _render(result, json_out, show_reasoning_flag, console)
            status.start()


def _render(
    result: AskResult, json_out: bool, show_reasoning_flag: bool, console: Console, caption: str | None = None
) -> None:
    """The answer (or the JSON object) on stdout; reasoning and the timing table on stderr;
    ``caption`` says who answered, when a server did."""
    from vlmduo.cli import terminal
    from vlmduo.cli.clock import process_ms

    # Everything the user waited for, from the interpreter's start to the answer.
    result.timings_ms["process"] = round(process_ms()[0], 3)
    out = terminal.stdout()
    if json_out:
        print(json.dumps(result.to_json(), ensure_ascii=False), file=out)
    else:
        print(result.answer if result.answer is not None else "", file=out)
    if show_reasoning_flag:
        # Asked for, so shown even beside --json (stderr; stdout keeps the one object).
        show_reasoning(stderr_console(), result)
    if not json_out:
        table = timing_table(result)
        table.caption = caption
        table.caption_justify = "left"
        console.print(table)


def _ask_many(
    image: str | None,
    question: str | None,
    each: str | None,
    batch: str | None,
    options: AskOptions,
    refs: dict[str, tuple[str, str | None]],
    settings: EngineSettings,
    offline: bool,
    no_server: bool,
    quiet: bool,
) -> int:
    """``--each`` / ``--batch``: one JSON line per item on stdout; the exit code."""
    forbid_local("--each and --batch run in the client")
    items, total = many.many_items(image, question, each, batch)
    return many.run_many(
        items,
        total,
        options=options,
        refs=refs,
        settings=settings,
        offline=opt.is_offline(offline),
        no_server=no_server,
        console=stderr_console(quiet=quiet),
    )


def register(app: typer.Typer) -> None:
    """Add ``ask`` to the app."""
    app.command("ask", help=HELP)(boundary(ask))
