"""``vlmduo bench``: latency analysis of a pair of models. Parse, call the core, render."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from vlmduo.cli import bench_render as out
from vlmduo.cli import checks
from vlmduo.cli import options as opt
from vlmduo.cli.errors import EXIT_INTERRUPTED, boundary
from vlmduo.cli.render import progress_bar, stderr_console
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import UsageError, VlmduoError

if TYPE_CHECKING:  # the core loads numpy: imported when the command runs, not for --help
    from vlmduo.agents.local import Agent
    from vlmduo.api import ResolvedModel
    from vlmduo.study.bench import BenchConfig
    from vlmduo.study.sweep import StudyConfig

HELP = """Measure where a pair's latency goes, fit a latency model, show the crossover.

For each model: load time, image preprocess and encode time per image size, \
prefill time per prompt length and decode ms/token per context length, on \
synthetic images and filler prompts (median and min-max of --reps runs). Then a \
fitted latency model per model (image, prefill, and decode whose cost per token \
grows with the context), the crossover table (how many tokens the large model \
may answer in and still beat the small model reasoning for m), the predicted \
time of each mode, and a measured ask of each mode against its prediction; a \
warning when a fit misses by over 15% or a prediction by over 20%.

--simulate builds random-weight models with the real checkpoints' shapes and \
quantisation (cached, no download) and runs the paper's study on them: the \
duo against the large model reasoning, per reasoning length and policy. \
Tables go to stderr, --json to stdout. Ctrl-C keeps the results so far.

[bold]Examples[/]

  vlmduo bench --pair synthetic --reps 2

  vlmduo bench --simulate qwen3-vl-2b-thinking,qwen3-vl-8b-instruct

  vlmduo bench --pair default --image-sizes 448 --json > bench.json

  vlmduo bench --small model-2b.gguf --large model-8b.gguf --plot latency.png
"""

PLOT_HINT = "pip install 'vlmduo[plot]'"
# Lighter defaults for real-size simulated models: an 8B model on a laptop CPU
# prefills ~10 tokens/s and encodes a 448 px image in ~10 s.
SIMULATE_DEFAULTS = {
    "reps": 1,
    "image_sizes": "224,448",
    "prompt_lengths": "32,128",
    "decode_lengths": "8,32",
}
FULL_DEFAULTS = {
    "reps": 3,
    "image_sizes": "224,448,896",
    "prompt_lengths": "64,256,1024",
    "decode_lengths": "16,64,256",
}


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


def simulate_names(text: str) -> tuple[str, str]:
    """``--simulate small,large``: two registry names with a real shape each."""
    from vlmduo.study import realsize

    names = opt.name_list(text)
    if len(names) != 2:
        raise UsageError(f"--simulate takes two names, small then large, got {len(names)}: {text!r}")
    known = realsize.real_shape_names()
    for name in names:
        if name not in known:
            raise UsageError(
                f"--simulate: no real shape for '{name}'",
                hint=f"simulated models exist for: {', '.join(sorted(known))}",
            )
    return names[0], names[1]


def build_simulated(
    names: tuple[str, str], threads: int | None, console: Console, *, verbose: bool = False
) -> dict[str, ResolvedModel]:
    """Build (or find in the cache) both real-size models, with a progress bar."""
    from vlmduo.api import ResolvedModel
    from vlmduo.models import registry
    from vlmduo.models.synthetic import cache_root
    from vlmduo.study import realsize

    cache = cache_root().parent / "simulated"
    resolved = {}
    for role, name in zip(("small", "large"), names, strict=True):
        spec = realsize.spec_for(name, cache)
        if not spec.built():
            need = realsize.estimate_bytes(spec)
            console.print(
                f"Building {name} at its real shape (random weights, {spec.quant} by llama.cpp): "
                f"about {need['final'] / 1e9:.1f} GB in {spec.folder}; {need['peak'] / 1e9:.0f} GB "
                "of free disk needed while building"
            )
        spec = _build_one(realsize, name, cache, threads, console, verbose)
        entry = registry.load_registry().model(name)
        resolved[role] = ResolvedModel(
            name, spec.model_path, spec.mmproj_path, entry.thinking, entry.think_start, entry.think_end
        )
    return resolved


def _build_one(
    realsize: ModuleType, name: str, cache: Path, threads: int | None, console: Console, verbose: bool
) -> Any:
    with progress_bar(console) as bar:
        task = bar.add_task(name, total=None)

        def progress(description: str, done: float, total: float) -> None:
            bar.update(task, description=description, completed=done, total=total or None)

        try:
            return realsize.ensure_built(name, cache, threads=threads, progress=progress, verbose=verbose)
        except OSError as exc:
            raise VlmduoError(
                f"cannot build {name}: {exc}", hint="free disk space or set VLMDUO_CACHE"
            ) from exc


def bench(
    small: opt.SmallModel = None,
    large: opt.LargeModel = None,
    small_mmproj: opt.SmallMmproj = None,
    large_mmproj: opt.LargeMmproj = None,
    pair: opt.Pair = "default",
    simulate: Annotated[
        str | None,
        typer.Option(help="Build random-weight models of two real shapes (small,large) and study them."),
    ] = None,
    reps: Annotated[
        int | None, typer.Option(help="Repetitions of each measurement (3; 1 simulated).")
    ] = None,
    image_sizes: Annotated[
        str | None, typer.Option(help="Square image sizes in px (224,448,896; 224,448 simulated).")
    ] = None,
    prompt_lengths: Annotated[
        str | None, typer.Option(help="Filler prompt tokens (64,256,1024; 32,128 simulated).")
    ] = None,
    decode_lengths: Annotated[
        str | None, typer.Option(help="Forced output tokens (16,64,256; 8,32 simulated).")
    ] = None,
    think_budget: Annotated[int, typer.Option(help="Reasoning tokens for predictions and checks.")] = 256,
    max_answer_tokens: Annotated[int, typer.Option(help="Answer tokens for predictions and checks.")] = 16,
    transfer_budget: Annotated[int, typer.Option(help="Transferred tokens for predictions.")] = 64,
    check: Annotated[
        bool | None, typer.Option(help="Measure one ask per mode against its prediction (not simulated).")
    ] = None,
    concurrent: Annotated[
        bool, typer.Option(help="Run the duo's two agents at once in the checks (default: in turn).")
    ] = False,
    study: Annotated[
        bool | None, typer.Option(help="Sweep reasoning lengths, duo vs large-think (on with --simulate).")
    ] = None,
    reasoning_lengths: Annotated[
        str, typer.Option(help="Reasoning lengths of the study, in tokens.")
    ] = "64,128,256,512,1024",
    measure_lengths: Annotated[
        str | None, typer.Option(help="Lengths the study measures, the others only predicted (all).")
    ] = None,
    agreement: Annotated[
        str, typer.Option(help="Agreement rates of the study: 0.5, 86% or counts 3736/4329.")
    ] = "0.5,3736/4329",
    confident: Annotated[str, typer.Option(help="Share of confident answers (confidence policy).")] = "0.5",
    json_out: opt.JsonOut = False,
    plot: Annotated[Path | None, typer.Option(help="Write latency vs output tokens to this PNG.")] = None,
    threads: opt.Threads = None,
    n_gpu_layers: opt.NGpuLayers = -1,
    ctx: opt.Ctx = 4096,
    offline: opt.Offline = False,
    verbose: opt.Verbose = False,
) -> None:
    from vlmduo.study.bench import BenchConfig
    from vlmduo.study.sweep import StudyConfig

    checks.engine(ctx=ctx, threads=threads)
    if plot is not None:
        require_matplotlib()
    names = simulate_names(simulate) if simulate else None
    defaults = SIMULATE_DEFAULTS if names else FULL_DEFAULTS
    config = BenchConfig(
        reps=reps if reps is not None else int(defaults["reps"]),
        image_sizes=int_list(image_sizes or str(defaults["image_sizes"]), "--image-sizes"),
        prompt_lengths=int_list(prompt_lengths or str(defaults["prompt_lengths"]), "--prompt-lengths"),
        decode_lengths=int_list(decode_lengths or str(defaults["decode_lengths"]), "--decode-lengths"),
        think_tokens=think_budget,
        answer_tokens=max_answer_tokens,
        transfer_tokens=transfer_budget,
        check=names is None if check is None else check,
        concurrent=concurrent,
    )
    config.validate()
    study_config = StudyConfig(
        reasoning_lengths=int_list(reasoning_lengths, "--reasoning-lengths"),
        agreement=tuple(opt.name_list(agreement)),
        confident=confident,
        answer_cap=max_answer_tokens,
        transfer_tokens=transfer_budget,
        measure_lengths=int_list(measure_lengths, "--measure-lengths") if measure_lengths else None,
    )
    run_study = names is not None if study is None else study
    if run_study:
        study_config.validate()
    # Reasoning, transfer and ~1000 cells for image and question must fit the context.
    if run_study and max(study_config.reasoning_lengths) + transfer_budget + 1024 > ctx:
        raise UsageError(
            f"--ctx {ctx} is too small for reasoning {max(study_config.reasoning_lengths)} tokens",
            hint=f"raise --ctx to {max(study_config.reasoning_lengths) + transfer_budget + 1024}",
        )

    console = stderr_console()
    settings = EngineSettings(n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, verbose=verbose)
    if names is not None:
        from vlmduo import api

        resolved = build_simulated(names, threads, console, verbose=verbose)
        with console.status("Loading models…"):
            agents, _ = api.load_agents(resolved, settings)
    else:
        refs = opt.model_refs(pair, small, large, small_mmproj, large_mmproj)
        agents = opt.load_agents(
            ("small", "large"), refs, settings, offline=opt.is_offline(offline), console=console
        )
    _run(agents, config, study_config if run_study else None, names, settings, console, json_out, plot)


def _run(
    agents: dict[str, Agent],
    config: BenchConfig,
    study_config: StudyConfig | None,
    names: tuple[str, str] | None,
    settings: EngineSettings,
    console: Console,
    json_out: bool,
    plot: Path | None,
) -> None:
    from vlmduo.study.bench import run_bench
    from vlmduo.study.sweep import environment, run_study, watch_other_cpu

    weights = out.weights_label(agents, simulated=names is not None)
    env = environment(weights, settings.threads(), settings.n_gpu_layers)
    with progress_bar(console) as bar, watch_other_cpu(env):
        task = bar.add_task("bench", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        small, large = agents["small"], agents["large"]
        report = run_bench(small, large, config, progress=progress)
        studied = None
        if study_config is not None and not report.interrupted and report.predicted_modes:
            studied = run_study(small, large, report, study_config, progress=progress)
    simulated = out.simulated_info(names) if names is not None else None
    if not json_out:
        out.render(console, report, studied, env, simulated)
    if plot is not None and any(b.runs for b in report.models.values()):
        out.write_plot(report, plot, env)
        console.print(f"[dim]Plot written to {plot}[/]")
    if json_out:
        data = report.to_json()
        data["environment"] = env.__dict__
        if studied is not None:
            data["study"] = studied.to_json()
        if simulated is not None:
            data["simulated"] = simulated
        print(json.dumps(data, ensure_ascii=False))
    warnings = report.warnings + (studied.warnings if studied else [])
    if env.busy:
        warnings.insert(
            0,
            f"other processes used {env.other_cores:.1f} of the {env.cores} cores while this measured: "
            "timings are slower and noisier than on an idle machine (--threads 1 is steadier on a "
            "shared one)",
        )
    for warning in warnings:
        console.print(Text(f"Warning: {warning}", style="yellow"), soft_wrap=False)
    interrupted = report.interrupted or (studied is not None and studied.interrupted)
    if interrupted:
        done = report.complete + (studied.complete if studied else [])
        line = f"Interrupted: partial results (complete: {', '.join(done) or 'none'})."
        console.print(Text(line, style="yellow"), soft_wrap=False)
        raise typer.Exit(EXIT_INTERRUPTED)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the app."""
    app.command("bench", help=HELP)(boundary(bench))
