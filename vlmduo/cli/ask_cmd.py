"""``vlmduo ask IMAGE QUESTION``: parse, check, call the core, render."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlmduo.cli import checks
from vlmduo.cli import options as opt
from vlmduo.cli.errors import boundary
from vlmduo.cli.render import show_reasoning, stderr_console, timing_table
from vlmduo.pipeline import AskOptions

# IMAGE `example` names this picture, shipped with vlmduo: three red circles, a blue
# square and a green triangle, so a first question has an answer anyone can check.
EXAMPLE = "example"
EXAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "example.png"

HELP = """Ask QUESTION about IMAGE: a path, an http(s) URL, - for stdin, or \
example for the picture shipped with vlmduo (use ./example for a file of that name).

The answer goes to stdout; the timing table and progress to stderr. Options that \
have no effect in the chosen --mode are refused (exit 2), never silently dropped.

[bold]Examples[/]

  vlmduo ask example "How many red circles are there?"

  vlmduo ask photo.jpg "Which is larger? A. the cup B. the plate" --json

  cat scan.png | vlmduo ask - "What does the sign say?" --mode large -q

  vlmduo ask example "Is there a square?" --pair synthetic   (no download)
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
    image: Annotated[str, typer.Argument(help="Image path, http(s) URL, - to read stdin, or example.")],
    question: Annotated[str, typer.Argument(help="The question about the image.")],
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
    think_budget: opt.ThinkBudget = 256,
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
    temperature: Annotated[float, typer.Option(help="0 decodes greedily.")] = 0.0,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    image_max_tokens: opt.ImageMaxTokens = None,
    image_min_tokens: opt.ImageMinTokens = None,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
    debug: opt.Debug = False,
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
    )
    # Every check before any work: no image read, no model resolved or loaded.
    options.validate()
    checks.applicable(mode, policy, _typed(context))
    checks.output(quiet=quiet, show_reasoning=show_reasoning_flag)
    checks.question_format(question, format)
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

    from vlmduo.api import answer, load_agents
    from vlmduo.cli.clock import process_ms
    from vlmduo.images import load_image

    console = stderr_console(quiet=quiet or json_out)
    loaded_image = load_image(_image_source(image), stdin=sys.stdin.buffer if image == "-" else None)
    resolved = opt.resolve_roles(
        _needed_roles(options.mode), refs, offline=opt.is_offline(offline), progress=not (quiet or json_out)
    )
    with console.status("Loading models…") as status:
        agents, load_ms = load_agents(resolved, settings)

        def progress(agent: str, phase: str, tokens: int) -> None:
            status.update(f"{agent}: {phase} · {tokens} tokens")

        result = answer(
            loaded_image,
            question,
            options,
            small=agents.get("small"),
            large=agents.get("large"),
            load_ms=load_ms,
            progress=progress,
        )
    # Everything the user waited for, from the interpreter's start to the answer.
    result.timings_ms["process"] = round(process_ms()[0], 3)
    if json_out:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(result.answer if result.answer is not None else "")
    if show_reasoning_flag:
        # Asked for, so shown even beside --json (stderr; stdout keeps the one object).
        show_reasoning(stderr_console(), result)
    if not json_out:
        console.print(timing_table(result))


def register(app: typer.Typer) -> None:
    """Add ``ask`` to the app."""
    app.command("ask", help=HELP)(boundary(ask))
