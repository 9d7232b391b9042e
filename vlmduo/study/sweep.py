"""The paper's latency study: the duo against the large model reasoning, per reasoning length.

``vlmduo bench`` measures each model's stages and fits a latency model; the
study then sweeps the reasoning length m (64 to 1024 tokens by default) and,
at each, measures the large model reasoning for m tokens (``large-think``, the
baseline the paper compares against) and the duo in turn (the large model's
short answer, the small model reasoning for m tokens, the transfer and the
large model's final answer), and predicts the same from the fits.

A question takes one of the duo's routes: ``agree`` (both answers match: the
large answer stands), ``transfer`` (they differ: reasoning goes to the large
model) or ``confident`` (the large answer is accepted at once). Which one
depends on the answers, not on latency, so the study measures each route's
time and mixes them at given rates: the verify policy at an agreement rate a
takes ``a·agree + (1-a)·transfer``, always takes ``transfer``, confidence at a
confident rate c takes ``c·confident + (1-c)·verify``. The speedup is
large-think's time over that mix, predicted (from the fits) and measured (from
the measured route times).

Pure measurement: progress goes to a callback, rendering is the CLI's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmduo.agents.local import Agent
from vlmduo.duo.pipeline import AskOptions, AskResult, ask, make_question
from vlmduo.errors import UsageError
from vlmduo.study import latency_model as lm
from vlmduo.study.ask_timing import chain_ms, predict_result, stage_ms
from vlmduo.study.bench import BENCH_QUESTION, BenchReport, bench_image, finite

StudyProgress = Callable[[str, int, int], None]
# The paper's MMBench routing: 3736 of 4329 questions where the two models agreed.
PAPER_AGREEMENT = "3736/4329"
ROUTES = ("large-think", "duo-agree", "duo-transfer", "duo-confident")


@dataclass(frozen=True)
class StudyConfig:
    """Reasoning lengths to sweep and the route mixes to report."""

    reasoning_lengths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    agreement: tuple[str, ...] = ("0.5", PAPER_AGREEMENT)  # rates as written: 0.5, 86%, 3736/4329
    confident: str = "0.5"  # the confidence policy's share of confident answers
    # The study's question is multiple choice, as MMBench's: the constrained answer
    # is one letter, one token (predictions); the asks cap it at answer_cap.
    answer_tokens: int = 1
    answer_cap: int = 16
    transfer_tokens: int = 64
    measure: bool = True  # run the asks; False: predictions only
    measure_lengths: tuple[int, ...] | None = None  # the lengths to measure (None: all)
    seed: int = 0

    def validate(self) -> None:
        """Reject settings that cannot be studied, before any model work."""
        if not self.reasoning_lengths or min(self.reasoning_lengths) < 1:
            raise UsageError("--reasoning-lengths must be 1 token or more")
        try:
            for rate in (*self.agreement, self.confident):
                lm.parse_rate(rate)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not self.agreement:
            raise UsageError("give at least one --agreement rate")
        extra = set(self.measure_lengths or ()) - set(self.reasoning_lengths)
        if extra:
            raise UsageError(
                f"--measure-lengths {','.join(map(str, sorted(extra)))} not among --reasoning-lengths"
            )

    def measured(self, length: int) -> bool:
        """True when the sweep measures this reasoning length (not only predicts it)."""
        return self.measure and (self.measure_lengths is None or length in self.measure_lengths)

    def mixes(self) -> list[tuple[str, lm.RouteMix]]:
        """(label, route mix) of every policy at every agreement rate (always once)."""
        confident = lm.parse_rate(self.confident)
        out = [
            (f"verify @{_pct(a)} agree", lm.policy_mix("verify", lm.parse_rate(a))) for a in self.agreement
        ]
        out.append(("always", lm.policy_mix("always", 0.0)))
        out += [
            (
                f"confidence @{_pct(a)} agree, {confident:.0%} conf.",
                lm.policy_mix("confidence", lm.parse_rate(a), confident),
            )
            for a in self.agreement
        ]
        return out


def _pct(rate: str) -> str:
    value = lm.parse_rate(rate)
    shown = f"{value:.0%}"
    return f"{shown} ({rate})" if "/" in rate else shown


@dataclass
class LengthPoint:
    """One reasoning length: each route's time, predicted at the budgets and measured."""

    reasoning_tokens: int
    predicted: dict[str, float]
    measured: dict[str, float] = field(default_factory=dict)
    # The fits' prediction for the token counts the measured asks actually had, and
    # those asks' time inside llama.cpp's stages (what the fits model).
    predicted_actual: dict[str, float] = field(default_factory=dict)
    measured_stages: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class Environment:
    """Where and how the numbers were measured: every table says so.

    ``other_cores``: CPU that other processes used, on average, while the
    measurements ran (in cores; None where it cannot be read). Timings taken
    on a busy machine are slower and noisier.
    """

    weights: str
    hardware: str
    backend: str
    threads: int
    gpu_layers: int
    llama_cpp: str
    cores: int = 1
    other_cores: float | None = None

    @property
    def busy(self) -> bool:
        """True when other processes took a quarter core or more while measuring."""
        return self.other_cores is not None and self.other_cores >= 0.25

    def _threads(self) -> str:
        return f"{self.threads} thread{'' if self.threads == 1 else 's'}"

    def short(self) -> str:
        """A short form for captions: weights, hardware, backend and threads."""
        weights = self.weights.split(" (", 1)[0]
        busy = f" · others used {self.other_cores:.1f} cores" if self.busy else ""
        return f"{weights} · {self.hardware} · {self.backend}, {self._threads()}{busy}"

    def line(self) -> str:
        """The whole description, once per report."""
        gpu = f", {self.gpu_layers} layers offloaded" if self.backend != "CPU" else ""
        others = "" if self.other_cores is None else f"; other processes used {self.other_cores:.2f} cores"
        return (
            f"{self.weights}; {self.hardware}; {self.backend} backend{gpu}, {self._threads()}"
            f"{others}; llama-cpp-python {self.llama_cpp}; answers not reported"
        )


def environment(weights: str, threads: int, gpu_layers: int) -> Environment:
    """Describe this machine and build (hardware, backend, versions)."""
    from importlib import metadata

    import llama_cpp

    from vlmduo.engine.backend import backend_name

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    cores = os.cpu_count() or 1
    return Environment(
        weights=weights,
        hardware=f"{_cpu_name()}, {cores} cores",
        backend=backend_name(info),
        threads=threads,
        gpu_layers=gpu_layers,
        llama_cpp=metadata.version("llama-cpp-python"),
        cores=cores,
    )


@contextlib.contextmanager
def watch_other_cpu(env: Environment) -> Iterator[None]:
    """Within: measure the CPU other processes use; sets ``env.other_cores`` on leaving.

    Linux only (``/proc/stat`` holds the machine's busy time, ``getrusage``
    this process's); elsewhere ``other_cores`` stays None.
    """
    start = _cpu_clocks()
    try:
        yield
    finally:
        end = _cpu_clocks()
        if start is not None and end is not None and end[2] > start[2]:
            machine, mine, wall = (b - a for a, b in zip(start, end, strict=True))
            env.other_cores = max(0.0, (machine - mine) / wall)


def _cpu_clocks() -> tuple[float, float, float] | None:
    """(machine busy CPU s, this process's CPU s, wall s), or None without /proc/stat."""
    import resource

    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields[:8]) - idle) / ticks, usage.ru_utime + usage.ru_stime, time.monotonic()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass
class StudyReport:
    """The sweep; ``complete`` lists the lengths measured, ``warnings`` what missed."""

    config: StudyConfig
    points: list[LengthPoint] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    interrupted: bool = False

    def speedups(self, which: str) -> list[tuple[str, list[float | None]]]:
        """Per route mix, large-think / mix at each length, from ``predicted`` or ``measured``."""
        rows = []
        for label, mix in self.config.mixes():
            values: list[float | None] = []
            for point in self.points:
                times = getattr(point, which)
                if not all(route in times for route in ROUTES):
                    values.append(None)
                    continue
                values.append(times["large-think"] / mix.expected_ms(times))
            rows.append((label, values))
        return rows

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (non-finite numbers become null)."""
        data = dataclasses.asdict(self)
        data["mixes"] = {label: dataclasses.asdict(mix) for label, mix in self.config.mixes()}
        data["speedup"] = {
            which: {label: values for label, values in self.speedups(which)}
            for which in ("predicted", "measured")
        }
        return finite(data)


def run_study(
    small: Agent,
    large: Agent,
    bench: BenchReport,
    config: StudyConfig,
    *,
    progress: StudyProgress | None = None,
) -> StudyReport:
    """Predict (and with ``config.measure``, measure) every reasoning length of the sweep.

    Needs both fits of ``bench``. KeyboardInterrupt stops the measuring and keeps
    the lengths done so far (``interrupted`` set).
    """
    config.validate()
    small_fit, large_fit = bench.models["small"].fit, bench.models["large"].fit
    if small_fit is None or large_fit is None:
        raise UsageError("the study needs a latency fit of both models; the bench has none")
    report = StudyReport(config)
    prompts = bench.prompts
    for m in config.reasoning_lengths:
        predicted = lm.predict_modes(
            small_fit,
            large_fit,
            small_prompt=prompts["small"],
            large_prompt=prompts["large"],
            think_tokens=m,
            answer_tokens=config.answer_tokens,
            transfer_tokens=config.transfer_tokens,
        )
        report.points.append(LengthPoint(m, {r: predicted[r] for r in ROUTES}))
    todo = [p for p in report.points if config.measured(p.reasoning_tokens)]
    if not todo:
        return report
    seeing = small.model.has_vision and large.model.has_vision
    image = bench_image(bench.config.fit_image_size, config.seed) if seeing else None
    question = make_question(BENCH_QUESTION, image, "auto")
    total = 2 * len(todo)
    try:
        for i, point in enumerate(todo):
            if progress is not None:
                progress(f"large-think, reasoning {point.reasoning_tokens}", 2 * i, total)
            think = _ask(question, config, point.reasoning_tokens, "large-think", small, large)
            if progress is not None:
                progress(f"duo in turn, reasoning {point.reasoning_tokens}", 2 * i + 1, total)
            duo = _ask(question, config, point.reasoning_tokens, "duo", small, large)
            _record(point, think, duo, small_fit, large_fit)
            report.complete.append(f"m={point.reasoning_tokens}")
    except KeyboardInterrupt:
        report.interrupted = True
    report.warnings += _misses(report.points)
    return report


def _ask(question: Any, config: StudyConfig, think: int, mode: str, small: Agent, large: Agent) -> AskResult:
    options = AskOptions(
        mode=mode,
        policy="always",  # the transfer route: its stage 1 is the agree route's time
        think_budget=think,
        max_answer_tokens=config.answer_cap,
        transfer_budget=config.transfer_tokens,
        sequential=True,  # each agent with all the threads, as the fits were measured
        seed=config.seed,
    )
    return ask(question, options, small=small, large=large)


def _record(
    point: LengthPoint, think: AskResult, duo: AskResult, small: lm.LatencyModel, large: lm.LatencyModel
) -> None:
    point.measured = {
        "large-think": think.timings_ms["total"],
        "duo-agree": duo.timings_ms["stage1"],
        "duo-transfer": duo.timings_ms["total"],
        "duo-confident": chain_ms(duo.large),  # the large agent's short answer alone
    }
    point.measured_stages = {
        "large-think": stage_ms(think, concurrent=False),
        "duo-transfer": stage_ms(duo, concurrent=False),
    }
    point.predicted_actual = {
        "large-think": predict_result(small, large, think, concurrent=False),
        "duo-transfer": predict_result(small, large, duo, concurrent=False),
    }
    point.tokens = {
        "large-think": think.large.tokens["generated"] if think.large else 0,
        "small": duo.small.tokens["generated"] if duo.small else 0,
        "transferred": (duo.transferred or {}).get("prefill_tokens", 0),
    }


def _misses(points: Sequence[LengthPoint]) -> list[str]:
    out = []
    for point in points:
        for route, predicted in point.predicted_actual.items():
            measured = point.measured_stages.get(route)
            if not measured:
                continue
            error = (predicted - measured) / measured * 100.0
            if abs(error) > lm.CHECK_WARN_PCT:
                out.append(
                    f"reasoning {point.reasoning_tokens}: {route} spent {measured:.0f} ms in llama.cpp, "
                    f"the latency model predicted {predicted:.0f} ms "
                    f"({error:+.0f}%, over ±{lm.CHECK_WARN_PCT:.0f}%)"
                )
    return out
