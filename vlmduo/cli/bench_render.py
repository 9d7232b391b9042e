"""Tables and plot of ``vlmduo bench``, readable at 80 columns: names are never cut.

Model names go in titles and in columns sized to hold them; long headers wrap;
numbers are right-aligned and kept short (``1234`` ms rather than ``1234.0 ms``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmduo.cli.render import bar_chart, fmt_ms
from vlmduo.errors import VlmduoError

if TYPE_CHECKING:
    from vlmduo.agents.local import Agent
    from vlmduo.study.ask_timing import ModeCheck
    from vlmduo.study.bench import BenchReport, ModelBench, Stat
    from vlmduo.study.latency_model import FitQuality, LatencyModel
    from vlmduo.study.sweep import Environment, StudyReport


def num(value: float | None) -> str:
    """A time in ms, short: 3 significant figures below 100, whole numbers above."""
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _stat(stat: Stat) -> str:
    spread = f" \\[{num(stat.low)}–{num(stat.high)}]" if stat.n > 1 else ""  # \\[ is a literal [
    return f"{num(stat.median)}{spread}"


def _table(title: str, caption: str | None = None) -> Table:
    return Table(
        title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD
    )


def _join(values: list[str]) -> str:
    """One value when all agree (``49``), else each (``49/64``)."""
    return values[0] if len(set(values)) == 1 else "/".join(values)


def components_table(report: BenchReport, env: Environment) -> Table:
    """Measured parts, one column per model: median ms [min–max]."""
    models = list(report.models.values())
    roles = ", ".join(f"{b.role} = {b.name}" for b in models)
    table = _table(f"Measured ms, median \\[min–max] of {report.config.reps}: {roles}", caption=env.short())
    table.add_column("part", no_wrap=True)
    for bench in models:
        table.add_column(bench.role, justify="right", no_wrap=True)
    table.add_row("load", *[num(b.load_ms) for b in models])
    for i, size in enumerate(report.config.image_sizes):
        tokens = _join([str(b.image[i].image_tokens) for b in models if i < len(b.image)])
        cells = [_stat(b.image[i].total) if i < len(b.image) else "–" for b in models]
        table.add_row(f"image {size} px, {tokens} tok", *cells)
    for i, length in enumerate(sorted(set(report.config.prompt_lengths))):
        cells = [_stat(b.prefill[i].ms) if i < len(b.prefill) else "–" for b in models]
        table.add_row(f"prefill {length} tok", *cells)
    for i in range(max((len(b.decode) for b in models), default=0)):
        contexts = _join([str(b.decode[i].context) for b in models if i < len(b.decode)])
        cells = [_stat(b.decode[i].ms_per_token) if i < len(b.decode) else "–" for b in models]
        table.add_row(f"decode/token @ {contexts}", *cells)
    return table


def _coef(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def fit_table(report: BenchReport, env: Environment) -> Table:
    """Each model's fitted stages and how well each fits (mean and worst error)."""
    table = _table(
        "Latency model (ms, non-negative least squares): i image tokens, p prompt tokens "
        "in c llama.cpp calls, n output tokens, k KV cells in thousands",
        caption=env.short(),
    )
    width = max(len(f"{b.role}: {b.name}") for b in report.models.values())
    table.add_column("model / stage", min_width=width, no_wrap=True)
    table.add_column("fitted ms")
    table.add_column("error mean/max", justify="right")
    for bench in report.models.values():
        table.add_row(Text(f"{bench.role}: {bench.name}", style="bold"), "", "")
        if bench.fit is None:
            table.add_row("", Text(f"no fit: {bench.fit_problem or 'not measured'}", style="yellow"), "")
            continue
        for stage, formula in _formulas(bench.fit):
            quality = bench.fit.quality.get(stage)
            error = "–" if quality is None else _errors(quality)
            style = "yellow" if quality is not None and quality.mean_abs_pct_error > 15 else None
            table.add_row(f"  {stage}", formula, Text(error, style=style))
    return table


def _errors(quality: FitQuality) -> str:
    if quality.exact:
        return f"exact, n={quality.n}"  # as many samples as costs: no error to speak of
    return f"{quality.mean_abs_pct_error:.0f}%/{quality.max_abs_pct_error:.0f}%"


def _formulas(fit: LatencyModel) -> list[tuple[str, str]]:
    c_per_k = fit.decode_ms_per_token_per_cell * 1000
    return [
        (
            "image",
            f"{_coef(fit.image_fixed_ms)} + {_coef(fit.encode_ms_per_token)}·i"
            + (f" + {_coef(fit.encode_ms_per_token_squared)}·i²" if fit.encode_ms_per_token_squared else ""),
        ),
        ("prefill", f"{_coef(fit.prefill_ms_per_call)}·c + {_coef(fit.prefill_ms_per_token)}·p"),
        (
            "decode",
            f"{_coef(fit.decode_fixed_ms)} + n·({_coef(fit.decode_ms_per_token)} + {_coef(c_per_k)}·k)",
        ),
        ("total", "image + prefill + decode of a run"),
    ]


def crossover_table(report: BenchReport, env: Environment) -> Table:
    """Large ms / small ms per (m small reasoning tokens, n large answer tokens)."""
    large_tokens = report.config.large_tokens
    prompts = report.prompts
    table = _table(
        f"Crossover (fitted model, {prompts['large'].tokens}-token prompt with the image): "
        "large(n) / small(m), below 1 the large model is faster",
        caption=env.short(),
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
        table.add_row(str(row.small_tokens), num(row.small_ms), limit, *ratios)
    return table


def modes_table(report: BenchReport, env: Environment) -> Table:
    """Each measured ask against the prediction for the tokens it generated."""
    way = "at once" if report.config.concurrent else "in turn"
    table = _table(
        f"Measured asks vs the latency model for the tokens each generated (duo agents {way}); "
        "llama.cpp: time in its stages, what the model predicts; other: prompt rendering, grammar "
        "and Python around them",
        caption=env.short(),
    )
    table.add_column("mode", min_width=13, no_wrap=True)
    for name in ("tokens s/l/t", "predicted", "llama.cpp", "error", "other"):
        table.add_column(name, justify="right")
    for check in report.checks:
        table.add_row(_mode_name(check), *_check_cells(check))
    return table


def _mode_name(check: ModeCheck) -> str:
    return check.mode if check.mode != "duo" else f"duo-{check.route}"


def _check_cells(check: ModeCheck) -> list[str | Text]:
    error = check.error_pct
    style = "yellow" if error is not None and abs(error) > 20 else None
    return [
        "{small}/{large}/{transferred}".format(**check.tokens),
        num(check.predicted_ms),
        num(check.stages_ms),
        Text("–" if error is None else f"{error:+.0f}%", style=style),
        num(check.outside_ms),
    ]


def sweep_tables(study: StudyReport, env: Environment) -> list[Table]:
    """Route times and the duo's speedup over large-think per reasoning length."""
    lengths = [p.reasoning_tokens for p in study.points]
    times = _table(
        "Seconds per question at reasoning length m, predicted/measured "
        "(duo in turn: large answers, small reasons, transfer)",
        caption=env.short(),
    )
    speed = _table(
        "Duo speedup over large-think (×), predicted/measured, per policy at agreement rate a",
        caption="a: share of questions where both answers agree; confidence: the given share of "
        f"confident answers ends at the large answer. {env.short()}",
    )
    for table, label in ((times, "route"), (speed, "policy")):
        table.add_column(label, no_wrap=True)
        for m in lengths:
            table.add_column(f"m={m}", justify="right", overflow="fold")
    for route in ("large-think", "duo-agree", "duo-transfer", "duo-confident"):
        cells = [_pair(p.predicted.get(route), p.measured.get(route), 1000.0) for p in study.points]
        times.add_row(route, *cells)
    predicted = dict(study.speedups("predicted"))
    for label, measured in study.speedups("measured"):
        cells = [_pair(a, b, 1.0) for a, b in zip(predicted[label], measured, strict=True)]
        speed.add_row(_short_policy(label), *cells)
    return [times, speed]


def _short_policy(label: str) -> str:
    """``verify @86% (3736/4329) agree`` -> ``verify a=86%``: the caption explains."""
    if label == "always":
        return label
    policy, rest = label.split(" @", 1)
    rate = rest.split(" ", 1)[0]
    return f"{policy} a={rate}"


def _pair(predicted: float | None, measured: float | None, scale: float) -> str:
    def show(value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value / scale:.2f}" if value / scale < 10 else f"{value / scale:.1f}"

    return f"{show(predicted)}/{show(measured)}"


def simulated_lines(info: dict[str, dict]) -> list[str]:
    """One line per simulated model: what was built, from which dimensions, against the published."""
    lines = []
    for name, built in info.items():
        size = built["bytes"]
        published = f", published {built['published_gb']} GB" if built.get("published_gb") else ""
        took = sum(built.get("times_s", {}).values())
        lines.append(
            f"{name}: {built['quant']} {size['model'] / 1e9:.2f} GB + projector {built['projector']} "
            f"{size['mmproj'] / 1e9:.2f} GB{published} ({built['published']}); dimensions: "
            f"{built['dims_source']}; built here in {took:.0f} s"
        )
    return lines


def render(
    console: Console,
    report: BenchReport,
    study: StudyReport | None,
    env: Environment,
    simulated: dict[str, dict] | None = None,
) -> None:
    """Every table and the chart, on stderr, wrapped to the console's width."""

    def show(item: Table | Text) -> None:
        # Titles and captions as paragraphs of the console's width, not of a narrow table's;
        # soft_wrap off: the stderr console would otherwise leave long lines unwrapped.
        title = caption = None
        if isinstance(item, Table):
            title, caption, item.title, item.caption = item.title, item.caption, None, None
        if title:
            console.print(Text.from_markup(str(title), style="bold"), soft_wrap=False)
        console.print(item, soft_wrap=False)
        if caption:
            console.print(Text.from_markup(str(caption), style="dim"), soft_wrap=False)

    show(Text(f"Measured: {env.line()}", style="dim"))
    if simulated:
        show(Text("Simulated models (random weights of the real shapes, never downloaded):", style="bold"))
        for line in simulated_lines(simulated):
            show(Text(f"  {line}", style="dim"))
    show(components_table(report, env))
    show(fit_table(report, env))
    if report.crossover:
        show(crossover_table(report, env))
    if report.checks:
        show(modes_table(report, env))
    if report.predicted_modes:
        config = report.config
        rows = [(mode, ms, fmt_ms(ms)) for mode, ms in report.predicted_modes.items()]
        title = (
            f"Predicted latency per mode (think {config.think_tokens}, answer {config.answer_tokens}, "
            f"transfer {config.transfer_tokens} tokens)"
        )
        show(bar_chart(title, rows, width=30))
    if study is not None and study.points:
        for table in sweep_tables(study, env):
            show(table)


def weights_label(agents: dict[str, Agent], *, simulated: bool) -> str:
    """What the weights are, for every table's caption."""
    if simulated:
        return "simulated weights of real shapes (random values, quantised as published)"
    synthetic = all(a.name.startswith("synthetic") for a in agents.values())
    return "synthetic tiny models (random weights)" if synthetic else "the given model files"


def simulated_info(names: tuple[str, str]) -> dict[str, object]:
    """The build record of each simulated model (provenance, sizes, build times)."""
    from vlmduo.models.synthetic import cache_root
    from vlmduo.study import realsize

    cache = cache_root().parent / "simulated"
    return {name: realsize.build_info(realsize.spec_for(name, cache)) for name in names}


def write_plot(report: BenchReport, path: Path, env: Environment) -> None:
    """Whole-run latency against output tokens, one panel per model: each measured series
    (a prompt length) as points, its fitted curve as a line of the same colour, a legend."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from vlmduo.study.latency_model import Prompt

    models = list(report.models.values())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, bench in zip(axes[0], models, strict=True):
        for prompt_tokens, runs in sorted(_series(bench).items()):
            label = f"{prompt_tokens}-token prompt"
            points = ax.scatter([r.output_tokens for r in runs], [r.ms for r in runs], s=18, label=label)
            if bench.fit is None:
                continue
            top = max(r.output_tokens for r in runs)
            xs = list(range(0, top + 1, max(1, top // 100)))
            prompt = Prompt(prompt_tokens, bench.prefix_image_tokens)
            ax.plot(xs, [bench.fit.run_ms(prompt, x) for x in xs], color=points.get_facecolor()[0])
        ax.set_title(f"{bench.role}: {bench.name}", fontsize="medium")
        ax.set_xlabel("output tokens")
        ax.set_ylabel("latency of the run (ms)")
        ax.legend(fontsize="small", title="points measured, lines fitted", title_fontsize="small")
    fig.text(0.01, 0.005, env.short(), fontsize="x-small")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    try:
        fig.savefig(path)
    except OSError as exc:
        raise VlmduoError(f"cannot write plot {path}: {exc}") from exc
    finally:
        plt.close(fig)


def _series(bench: ModelBench) -> dict[int, list]:
    out: dict[int, list] = {}
    for run in bench.runs:
        out.setdefault(run.prompt_tokens, []).append(run)
    return out
