"""``vlmduo eval DATASET``: accuracy, tokens, latency and routes per configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmduo.cli import options as opt
from vlmduo.cli.errors import EXIT_INTERRUPTED, boundary
from vlmduo.cli.render import (
    Column,
    bar_chart,
    fitted_tables,
    fmt_ms,
    print_tables,
    progress_bar,
    stderr_console,
)
from vlmduo.duo.pipeline import DEFAULT_THINK_BUDGET, AskOptions
from vlmduo.errors import UsageError

if TYPE_CHECKING:  # imported when the command runs, not for --help
    from vlmduo.study.eval_run import EvalOutcome, EvalProgress
    from vlmduo.study.evaluation import TokenStats

HELP = """Evaluate modes, policies and selectors on a dataset, with both models loaded once.

DATASET is an MMBench .tsv (index, question, hint, A-D, answer, category, base64 \
image), a .jsonl file (image path, URL or base64; question; options; answer) or a \
folder holding one of them. Every (configuration, item) result is appended to \
--results as it comes, so an interrupted run continues with --resume. Rows that \
cannot be evaluated are counted and listed, never fatal. The summary table goes \
to stderr, --json to stdout.

[bold]Examples[/]

  vlmduo eval mmbench_dev_en.tsv --limit 200 --shuffle --seed 1

  vlmduo eval questions.jsonl --modes large,duo --policies verify,always --selectors steps,tail

  vlmduo eval mmbench_dev_en.tsv --results run1.jsonl --resume --json > summary.json

  vlmduo eval mmbench_dev_en.tsv --limit 100 --circular   (each rotation reuses the image)
"""


def _results_path(results: Path | None, dataset: Path, resume: bool) -> Path:
    """The log file; an existing one is only reused on purpose (``--resume``)."""
    path = results or Path(f"{dataset.expanduser().resolve().name.split('.')[0]}-results.jsonl")
    if not resume and path.exists() and path.stat().st_size > 0:
        raise UsageError(
            f"results file {path} already exists",
            hint="add --resume to continue it, or pass --results NEW.jsonl",
        )
    return path


SUMMARY_COLUMNS = (
    Column("config"),
    Column("accuracy", justify="right"),
    Column("n", justify="right"),
    Column("errors", justify="right"),
    Column("p50", justify="right"),
    Column("p90", justify="right"),
    Column("small tok\nmean/med", justify="right"),
    Column("large tok\nmean/med", justify="right"),
    Column("routes", wrap=True, min_width=12),
    Column("transferred\ntokens", justify="right"),
)


def summary_tables(outcome: EvalOutcome, width: int) -> list[Table]:
    """One row per configuration: accuracy (and CircularEval's, when run), latency,
    tokens, routes; split in two tables (configurations repeated) where one does not
    fit ``width``."""
    circular = any(s.circular is not None for s in outcome.summaries)
    columns = list(SUMMARY_COLUMNS)
    if circular:
        columns.insert(2, Column("circular", justify="right"))
    rows = [
        [
            s.config,
            f"{s.accuracy:.1%}",
            *([f"{s.circular.accuracy:.1%}" if s.circular else "–"] if circular else []),
            str(s.n),
            str(s.n_errors),
            fmt_ms(s.latency_p50_ms),
            fmt_ms(s.latency_p90_ms),
            _tokens(s.small_tokens),
            _tokens(s.large_tokens),
            " ".join(f"{k}:{v}" for k, v in s.routes.items()),
            "" if s.mean_transferred_tokens is None else f"{s.mean_transferred_tokens:.1f}",
        ]
        for s in outcome.summaries
    ]
    title = f"{outcome.dataset}: {outcome.n_items} items"
    return fitted_tables(title, columns, rows, width=width)


def _tokens(stats: TokenStats | None) -> str:
    if stats is None:
        return "–"
    return f"{stats.mean:.1f}/{stats.median:.0f}"


def category_tables(outcome: EvalOutcome, width: int) -> list[Table]:
    """Accuracy per category (rows) and configuration (columns), when items have categories."""
    categories = sorted({c for s in outcome.summaries for c in s.categories})
    if not categories:
        return []
    columns = [Column("category"), *(Column(s.config, justify="right") for s in outcome.summaries)]
    rows = [
        [
            category,
            *(
                f"{s.categories[category].accuracy:.0%} ({s.categories[category].n})"
                if category in s.categories
                else "–"
                for s in outcome.summaries
            ),
        ]
        for category in categories
    ]
    return fitted_tables("Accuracy per category", columns, rows, width=width)


def render(console: Console, outcome: EvalOutcome) -> None:
    """Tables, a bar chart of accuracy and latency, and the bad items, on stderr."""
    print_tables(console, summary_tables(outcome, console.width))
    per_category = category_tables(outcome, console.width)
    if per_category:
        console.print()
        print_tables(console, per_category)
    summaries = outcome.summaries
    console.print()
    console.print(
        bar_chart("Accuracy", [(s.config, s.accuracy, f"{s.accuracy:.1%}") for s in summaries], full=1.0)
    )
    latency = [(s.config, s.latency_p50_ms or 0.0, fmt_ms(s.latency_p50_ms)) for s in summaries]
    console.print()
    console.print(bar_chart("Latency p50", latency))
    bad = outcome.bad_items
    if bad:
        shown = "; ".join(f"{b.id}: {b.reason}" for b in bad[:5]) + (" …" if len(bad) > 5 else "")
        console.print(f"[yellow]{len(bad)} bad item(s) skipped:[/] {escape(shown)}")
    console.print(
        f"[dim]{outcome.n_run} run, {outcome.n_skipped} already done, {outcome.n_errors} error(s); "
        f"results in {escape(outcome.results_path)}[/]"
    )


def eval_command(
    dataset: Annotated[Path, typer.Argument(help="MMBench .tsv, .jsonl, or a folder holding one.")],
    modes: Annotated[
        str, typer.Option(help="Comma-separated: small, large, large-think, duo.")
    ] = "small,large,large-think,duo",
    policies: Annotated[str, typer.Option(help="Duo policies: verify, confidence, always.")] = "verify",
    selectors: Annotated[str, typer.Option(help="Duo selectors: full, tail, steps, surprisal.")] = "steps",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N items (after --shuffle).")] = None,
    shuffle: Annotated[bool, typer.Option(help="Shuffle the items first (with --seed).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --shuffle and of sampling.")] = 0,
    results: Annotated[
        Path | None, typer.Option(help="JSON Lines results file (default DATASET-results.jsonl).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Skip (config, item) pairs already in --results.")] = False,
    concurrency: Annotated[
        int, typer.Option(help="Items in flight at once; above 1 needs remote agents (URL#MODEL).")
    ] = 1,
    circular: Annotated[
        bool,
        typer.Option(
            "--circular",
            help="MMBench's CircularEval: ask each multiple-choice item once per rotation of its "
            "options; right only if every pass is (reported beside the plain accuracy).",
        ),
    ] = False,
    json_out: opt.JsonOut = False,
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    small_mmproj: opt.SmallMmproj = None,
    large_mmproj: opt.LargeMmproj = None,
    pair: opt.Pair = "default",
    think_budget: opt.ThinkBudget = DEFAULT_THINK_BUDGET,
    max_answer_tokens: opt.MaxAnswerTokens = 16,
    transfer_budget: opt.TransferBudget = 64,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    image_max_tokens: opt.ImageMaxTokens = None,
    image_min_tokens: opt.ImageMinTokens = None,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
    debug: opt.Debug = False,
) -> None:
    from vlmduo.study.datasets import load_dataset
    from vlmduo.study.eval_run import expand_configs, required_roles, run_eval
    from vlmduo.study.evaluation import ResultsLog

    configs = expand_configs(opt.name_list(modes), opt.name_list(policies), opt.name_list(selectors))
    options = AskOptions(
        max_answer_tokens=max_answer_tokens,
        think_budget=think_budget,
        transfer_budget=transfer_budget,
        seed=seed,
    )
    options.validate()
    settings = opt.engine_settings(  # checks --ctx, --threads and the image limits first
        options,
        ctx=ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        verbose=verbose,
        image_max_tokens=image_max_tokens,
        image_min_tokens=image_min_tokens,
    )
    data = load_dataset(dataset, limit=limit, shuffle=shuffle, seed=seed)
    log = ResultsLog(_results_path(results, dataset, resume))
    console = stderr_console()
    refs = opt.model_refs(pair, small, large, small_mmproj, large_mmproj)
    agents = opt.load_agents(
        required_roles(configs), refs, settings, offline=opt.is_offline(offline), console=console
    )
    with progress_bar(console) as bar:
        task = bar.add_task("eval", total=len(configs) * len(data.items))

        def progress(state: EvalProgress) -> None:
            acc = state.accuracy
            shown = "–" if acc is None else f"{acc:.1%}"
            description = f"{state.config} · acc {shown} · errors {state.errors}"
            bar.update(task, description=escape(description), completed=state.done)

        outcome = run_eval(
            data,
            configs,
            log,
            small=agents.get("small"),
            large=agents.get("large"),
            options=options,
            resume=resume,
            progress=progress,
            concurrency=concurrency,
            circular=circular,
        )
    if json_out:
        print(json.dumps(outcome.to_json(), ensure_ascii=False))
    else:
        render(console, outcome)
    if outcome.interrupted:
        console.print("[yellow]Interrupted: rerun with --resume to continue.[/]")
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the app."""
    app.command("eval", help=HELP)(boundary(eval_command))
