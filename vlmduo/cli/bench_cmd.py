"""``vlmduo bench``: latency analysis of a pair of models. Parse, call the core, render."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmduo.cli import options as opt
from vlmduo.cli.errors import EXIT_INTERRUPTED, boundary
from vlmduo.cli.render import bar_chart, fmt_ms, progress_bar, stderr_console
from vlmduo.engine import EngineSettings
from vlmduo.errors import UsageError, VlmduoError

if TYPE_CHECKING:  # the core loads numpy: imported when the command runs, not for --help
    from vlmduo.bench import BenchReport, ModeCheck, Stat

HELP = """Measure where a pair's latency goes, fit a latency model and show the crossover.

For each model: load time, image preprocess and encode time per image size, \
prefill time per prompt length and decode ms/token per context length, on \
synthetic images and filler prompts (median and min-max of --reps runs). Then a \
fitted latency model per model (fixed + per prompt token + per output token), \
the crossover table (how many tokens the large model may answer in and still \
beat the small model reasoning for m tokens), the predicted time of each mode, \
and a measured ask of each mode against its prediction. Tables go to stderr, \
--json to stdout. Ctrl-C keeps the results so far.

[bold]Examples[/]

  vlmduo bench --pair synthetic --reps 2

  vlmduo bench --pair default --image-sizes 448 --prompt-lengths 64,512 --json > bench.json

  vlmduo bench --small model-2b.gguf --large model-8b.gguf --plot latency.png
"""

PLOT_HINT = "pip install 'vlmduo[plot]'"


def int_list(text: str, option: str) -> tuple[int, ...]:
    """Parse ``"224,448"`` into integers; anything else is a usage error naming the option."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{option} takes comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} needs at least one number")
    return values


def require_matplotlib() -> None:
    """Fail before any work when ``--plot`` cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise VlmduoError("--plot needs matplotlib, which is not installed", hint=PLOT_HINT)


def _stat(stat: Stat) -> str:
    spread = f" \\[{stat.low:.1f}–{stat.high:.1f}]" if stat.n > 1 else ""  # rich markup: \\[ is a literal [
    return f"{stat.median:.1f}{spread}"


def components_table(report: BenchReport) -> Table:
    """Measured parts, one column per model: median ms [min–max]."""
    models = list(report.models.values())
    table = Table(title="Measured (ms: median \\[min–max])", title_justify="left")
    table.add_column("part")
    for bench in models:
        table.add_column(f"{bench.role}: {bench.name}", justify="right")
    table.add_row("load", *[fmt_ms(b.load_ms) for b in models])
    for i, size in enumerate(report.config.image_sizes):
        cells = [
            f"{_stat(b.image[i].total)} · {b.image[i].image_tokens} tok" if i < len(b.image) else "–"
            for b in models
        ]
        table.add_row(f"image {size}px (preprocess+encode+prefill)", *cells)
    if len(report.config.image_sizes) > 1 and all(
        len({p.image_tokens for p in b.image}) == 1 for b in models
    ):
        table.caption = "libmtmd resizes every image to the projector's input size: same tokens at every size"
    for i, length in enumerate(sorted(set(report.config.prompt_lengths))):
        prefill = [
            f"{_stat(b.prefill[i].ms)} · {b.prefill[i].ms_per_token:.3f}/tok" if i < len(b.prefill) else "–"
            for b in models
        ]
        table.add_row(f"prefill {length} tok", *prefill)
    for i in range(max((len(b.decode) for b in models), default=0)):
        contexts = dict.fromkeys(str(b.decode[i].context) for b in models if i < len(b.decode))
        label = "decode ms/token @ context " + "/".join(contexts)
        table.add_row(label, *[_stat(b.decode[i].ms_per_token) if i < len(b.decode) else "–" for b in models])
    return table


def fit_table(report: BenchReport) -> Table:
    """The fitted latency model of each model and how well it fits."""
    table = Table(title="Latency model: ms = fixed + a·prompt tokens + b·output tokens", title_justify="left")
    for name in ("model", "fixed ms", "a ms/prompt tok", "b ms/output tok", "R²", "fit error"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for bench in report.models.values():
        fit = bench.fit
        if fit is None:
            table.add_row(bench.name, Text(f"no fit: {bench.fit_problem or 'not measured'}", style="yellow"))
            continue
        table.add_row(
            bench.name,
            f"{fit.fixed_ms:.2f}",
            f"{fit.per_prompt_token_ms:.4f}",
            f"{fit.per_output_token_ms:.3f}",
            f"{fit.r2:.3f}",
            f"{fit.mean_abs_pct_error:.1f}%",
        )
    return table


def crossover_table(report: BenchReport) -> Table:
    """Large ms / small ms per (m small reasoning tokens, n large answer tokens)."""
    large_tokens = report.config.large_tokens
    table = Table(
        title=f"Crossover at {report.crossover_prompt_tokens} prompt tokens: "
        "large(n) / small(m), below 1 the large model is faster",
        title_justify="left",
    )
    table.add_column("small m", justify="right")
    table.add_column("small ms", justify="right")
    table.add_column("large faster up to n", justify="right")
    for n in large_tokens:
        table.add_column(f"n={n}", justify="right")
    for row in report.crossover:
        ratios = [
            Text(f"{row.ratios[n]:.2f}", style="green" if row.ratios[n] < 1 else "red") for n in large_tokens
        ]
        limit = "never" if row.max_large_tokens is None else str(row.max_large_tokens)
        table.add_row(str(row.small_tokens), f"{row.small_ms:.1f}", limit, *ratios)
    return table


def modes_table(report: BenchReport) -> Table:
    """Predicted time per mode at the configured budgets, and the measured checks."""
    config = report.config
    table = Table(
        title=f"Modes: predicted at think {config.think_tokens}, answer {config.answer_tokens}, "
        f"transfer {config.transfer_tokens} tokens; measured ask vs prediction for its tokens",
        title_justify="left",
    )
    heads = ("mode", "predicted @budgets", "measured ask", "route", "tokens s/l/t", "predicted @its tokens")
    for name in (*heads, "error"):
        table.add_column(name, justify="left" if name in ("mode", "route") else "right")
    checks = {c.mode if c.mode != "duo" else f"duo-{c.route}": c for c in report.checks}
    for mode, predicted in report.predicted_modes.items():
        check = checks.pop(mode, None)
        table.add_row(mode, fmt_ms(predicted), *_check_cells(check))
    for mode, check in checks.items():
        table.add_row(mode, "–", *_check_cells(check))
    return table


def _check_cells(check: ModeCheck | None) -> list[str]:
    if check is None:
        return ["", "", "", "", ""]
    error = check.error_pct
    return [
        fmt_ms(check.measured_ms),
        check.route or "",
        "{small}/{large}/{transferred}".format(**check.tokens),
        fmt_ms(check.predicted_ms),
        "–" if error is None else f"{error:+.0f}%",
    ]


def render(console: Console, report: BenchReport) -> None:
    """Every table and the chart, on stderr."""
    console.print(components_table(report))
    console.print(fit_table(report))
    if report.crossover:
        console.print(crossover_table(report))
    if report.predicted_modes:
        console.print(modes_table(report))
        rows = [(mode, ms, fmt_ms(ms)) for mode, ms in report.predicted_modes.items()]
        console.print(bar_chart("Predicted latency per mode", rows))


def write_plot(report: BenchReport, path: Path) -> None:
    """Latency against output tokens for both models: fitted lines and measured points."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from vlmduo.latency_model import predict_ms

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(report.config.small_tokens), max(report.config.decode_lengths))
    xs = list(range(0, top + 1, max(1, top // 200)))
    for bench in report.models.values():
        points = ax.scatter(
            [s.output_tokens for s in bench.samples], [s.ms for s in bench.samples], s=12, label=None
        )
        if bench.fit is not None:
            ys = [predict_ms(bench.fit, report.crossover_prompt_tokens, x) for x in xs]
            ax.plot(xs, ys, color=points.get_facecolor()[0], label=f"{bench.role}: {bench.name}")
    ax.set_xlabel("output tokens")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Latency vs output tokens ({report.crossover_prompt_tokens} prompt tokens)")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise VlmduoError(f"cannot write plot {path}: {exc}") from exc
    finally:
        plt.close(fig)


def bench(
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    small_mmproj: opt.SmallMmproj = None,
    large_mmproj: opt.LargeMmproj = None,
    pair: opt.Pair = "default",
    reps: Annotated[int, typer.Option(help="Repetitions of every measurement.")] = 3,
    image_sizes: Annotated[
        str, typer.Option(help="Square image sizes in px, comma-separated.")
    ] = "224,448,896",
    prompt_lengths: Annotated[str, typer.Option(help="Filler prompt lengths in tokens.")] = "64,256,1024",
    decode_lengths: Annotated[str, typer.Option(help="Forced output lengths in tokens.")] = "16,64,256",
    think_budget: Annotated[int, typer.Option(help="Reasoning tokens for predictions and checks.")] = 256,
    max_answer_tokens: Annotated[int, typer.Option(help="Answer tokens for predictions and checks.")] = 16,
    transfer_budget: Annotated[int, typer.Option(help="Transferred tokens for predictions.")] = 64,
    check: Annotated[bool, typer.Option(help="Measure one ask per mode against the prediction.")] = True,
    json_out: opt.JsonOut = False,
    plot: Annotated[Path | None, typer.Option(help="Write latency vs output tokens to this PNG.")] = None,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
) -> None:
    from vlmduo.bench import BenchConfig

    if plot is not None:
        require_matplotlib()
    config = BenchConfig(
        reps=reps,
        image_sizes=int_list(image_sizes, "--image-sizes"),
        prompt_lengths=int_list(prompt_lengths, "--prompt-lengths"),
        decode_lengths=int_list(decode_lengths, "--decode-lengths"),
        think_tokens=think_budget,
        answer_tokens=max_answer_tokens,
        transfer_tokens=transfer_budget,
        check=check,
    )
    config.validate()
    from vlmduo.bench import run_bench

    console = stderr_console()
    refs = opt.model_refs(pair, small, large, small_mmproj, large_mmproj)
    settings = EngineSettings(n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, verbose=verbose)
    agents = opt.load_agents(
        ("small", "large"), refs, settings, offline=opt.is_offline(offline), console=console
    )
    with progress_bar(console) as bar:
        task = bar.add_task("bench", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        report = run_bench(agents["small"], agents["large"], config, progress=progress)
    if not json_out:
        render(console, report)
    if plot is not None and any(b.samples for b in report.models.values()):
        write_plot(report, plot)
        console.print(f"[dim]Plot written to {plot}[/]")
    if json_out:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    if report.interrupted:
        console.print(
            f"[yellow]Interrupted: partial results (complete: {', '.join(report.complete) or 'none'}).[/]"
        )
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the app."""
    app.command("bench", help=HELP)(boundary(bench))
