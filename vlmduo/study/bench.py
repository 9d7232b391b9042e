"""Latency analysis of a pair of VLMs (``vlmduo bench``): where the time goes.

For each model it measures, on generated inputs, the load time, image preprocess
and vision-encode time per image size, prefill time against prompt length and
decode time per token against context length, each repeated (median and
min/max). From those it fits the per-stage latency model of
:mod:`vlmduo.study.latency_model` (image, prefill, and decode with a per-token cost
that grows with the context), builds the crossover table the duo method rests
on and predicts every mode's time, then checks the predictions against a
measured ``pipeline.ask`` of each mode, and says when a fit or a prediction
misses.

The fits use the steady cost of each measurement: the fastest of its
repetitions (interference from other processes only ever adds time) and, for
decode, the median of neighbouring steps, so that a step preempted by another
process does not count as a slower context. The tables show the raw medians
and ranges.

Pure measurement: progress goes to a callback, rendering is the CLI's job.
Ctrl-C stops the measuring but keeps what was measured; ``complete`` says which
parts finished.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmduo.agents.local import Agent
from vlmduo.duo.pipeline import AskOptions, AskResult, ask, make_question
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.session import Session
from vlmduo.errors import UsageError
from vlmduo.media.images import LoadedImage, synthetic_image
from vlmduo.study import latency_model as lm
from vlmduo.study.ask_timing import ModeCheck, predict_result, stage_ms

# Called as progress(description, steps_done, steps_total).
BenchProgress = Callable[[str, int, int], None]

CHECK_MODES = ("small", "large", "large-think", "duo")  # duo last: it changes thread counts
QUESTION_TOKENS = 32  # a short question after the image, for the crossover and predictions
BENCH_QUESTION = "Which colour covers most of the image?\nA. red\nB. green\nC. blue\nD. grey"
# Plain words every tokenizer splits predictably; the model never has to make sense of them.
_FILLER = (
    "the picture shows a small red car next to a large blue bus on the left side of the "
    "street while two people walk past a green tree and the sky above them is white "
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and which token counts to predict for."""

    reps: int = 3
    image_sizes: tuple[int, ...] = (224, 448, 896)
    prompt_lengths: tuple[int, ...] = (64, 256, 1024)
    decode_lengths: tuple[int, ...] = (16, 64, 256)
    think_tokens: int = 256
    answer_tokens: int = 16
    transfer_tokens: int = 64
    small_tokens: tuple[int, ...] = (64, 128, 256, 512, 1024)
    large_tokens: tuple[int, ...] = (1, 4, 16, 64, 256)
    check: bool = True
    concurrent: bool = False  # duo checks: stage-1 agents at once (splitting the cores) or in turn
    seed: int = 0

    def validate(self) -> None:
        """Reject settings that cannot give a fit, before any model work."""
        checks = [
            (self.reps >= 1, "--reps must be at least 1"),
            (bool(self.image_sizes) and min(self.image_sizes) >= 1, "image sizes must be 1 px or more"),
            (len(set(self.prompt_lengths)) >= 2, "give at least 2 different --prompt-lengths"),
            (len(set(self.decode_lengths)) >= 2, "give at least 2 different --decode-lengths"),
            (min(self.prompt_lengths, default=0) >= 1, "prompt lengths must be 1 token or more"),
            (min(self.decode_lengths, default=0) >= 1, "decode lengths must be 1 token or more"),
            (self.answer_tokens >= 1, "--max-answer-tokens must be at least 1"),
            (min(self.think_tokens, self.transfer_tokens) >= 0, "token budgets must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def fit_image_size(self) -> int:
        """The image size of the fitted runs and the mode checks: the middle one given."""
        return sorted(self.image_sizes)[len(self.image_sizes) // 2]


@dataclass(frozen=True)
class Stat:
    """Median and spread (min, max) of repeated measurements, in ms."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarise at least one value."""
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))


@dataclass(frozen=True)
class ImagePoint:
    """One image size: preprocess (libmtmd resize + patching), encode and prefill times."""

    size: int
    image_tokens: int  # libmtmd resizes to the projector's size, so often the same for all
    cells: int  # KV cells of the whole prompt: image and the chat template around it
    preprocess: Stat
    encode: Stat
    prefill: Stat  # image embeddings plus the short chat template around them
    total: Stat


@dataclass(frozen=True)
class PrefillPoint:
    """Prefill of ``tokens`` filler tokens after a cached image prefix."""

    requested: int
    tokens: int
    ms: Stat

    @property
    def ms_per_token(self) -> float:
        """Median ms per prompt token (batched: far below a decode step)."""
        return self.ms.median / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class DecodePoint:
    """Decode after ``context`` tokens in the KV cache, forced to ``tokens`` tokens."""

    context: int
    tokens: int
    ms_per_token: Stat
    eog_restarts: int  # end-of-generation tokens replaced to keep the length fixed


@dataclass
class ModelBench:
    """Everything measured and fitted for one model."""

    role: str
    name: str
    load_ms: float | None = None
    prefix_tokens: int = 0  # KV cells of image + chat template of the fitted runs
    prefix_image_tokens: int = 0
    prefix_ms: float | None = None
    n_batch: int = 512  # llama.cpp's batch: prompts longer than this take several calls
    image: list[ImagePoint] = field(default_factory=list)
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    stage_samples: list[lm.StageSample] = field(default_factory=list)
    runs: list[lm.RunSample] = field(default_factory=list)  # whole runs: prefix + prompt + decode
    fit: lm.LatencyModel | None = None
    fit_problem: str | None = None

    @property
    def question_prompt(self) -> lm.Prompt:
        """The prompt of a question about the fitted runs' image: its prefix plus ~32 tokens."""
        return lm.Prompt(self.prefix_tokens + QUESTION_TOKENS, self.prefix_image_tokens)


@dataclass
class BenchReport:
    """The whole analysis; ``complete`` lists the parts that finished."""

    config: BenchConfig
    models: dict[str, ModelBench]
    crossover: list[lm.CrossoverRow] = field(default_factory=list)
    predicted_modes: dict[str, float] = field(default_factory=dict)
    checks: list[ModeCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def prompts(self) -> dict[str, lm.Prompt]:
        """The question prompt of each role, for the crossover and the predictions."""
        return {role: bench.question_prompt for role, bench in self.models.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (non-finite numbers become null)."""
        data = dataclasses.asdict(self)
        for row in data["crossover"]:
            row["ratios"] = {str(k): v for k, v in row["ratios"].items()}
        data["checks"] = [
            {**dataclasses.asdict(c), "error_pct": c.error_pct, "outside_ms": c.outside_ms}
            for c in self.checks
        ]
        data["prompts"] = {role: dataclasses.asdict(p) for role, p in self.prompts.items()}
        for name, bench in self.models.items():
            data["models"][name]["prefill"] = [
                {**dataclasses.asdict(p), "ms_per_token": p.ms_per_token} for p in bench.prefill
            ]
            if bench.fit is not None:
                data["models"][name]["fit"]["fit_error_pct"] = bench.fit.fit_error_pct
        return finite(data)


def finite(value: Any) -> Any:
    """Replace inf/nan by None, recursively: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class _Ticker:
    """Counts steps for the progress callback."""

    def __init__(self, total: int, progress: BenchProgress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, description: str, advance: int = 1) -> None:
        self.done += advance
        if self.progress is not None:
            self.progress(description, self.done, self.total)


def run_bench(
    small: Agent, large: Agent, config: BenchConfig, *, progress: BenchProgress | None = None
) -> BenchReport:
    """Measure both models, fit, predict and (``config.check``) check against real asks.

    KeyboardInterrupt stops the measuring; the report keeps everything measured so
    far, is analysed as far as the data allows and has ``interrupted`` set.
    """
    config.validate()
    for agent in (small, large):
        if getattr(agent, "is_remote", False):  # its stages run on a server: nothing to time here
            raise UsageError(f"bench times models in this process; {agent.name} is served remotely")
    report = BenchReport(
        config, {"small": ModelBench("small", small.name), "large": ModelBench("large", large.name)}
    )
    per_model = 1 + config.reps * (len(config.image_sizes) + len(config.prompt_lengths))
    tick = _Ticker(2 * per_model + (len(CHECK_MODES) if config.check else 0), progress)
    try:
        for role, agent in (("small", small), ("large", large)):
            _measure_model(agent.model, report.models[role], config, report.complete, tick)
    except KeyboardInterrupt:
        report.interrupted = True
    _analyse(report)
    if config.check and not report.interrupted and report.predicted_modes:
        try:
            _check_modes(report, small, large, tick)
        except KeyboardInterrupt:
            report.interrupted = True
    return report


def _measure_model(
    model: VisionLanguageModel, bench: ModelBench, config: BenchConfig, complete: list[str], tick: _Ticker
) -> None:
    bench.load_ms = model.load_times.get("load")
    bench.n_batch = model.n_batch
    complete.append(f"{bench.role}:load")
    tick(f"{bench.name}: loaded")
    if model.has_vision:
        for point in _measure_images(model, config, tick):
            bench.image.append(point)
            # The prompt around the image is text, image (in batches), text: that many calls.
            calls = 2 + lm.prefill_calls(point.image_tokens, model.n_batch)
            bench.stage_samples += [
                lm.StageSample("image", point.image_tokens, point.preprocess.low + point.encode.low),
                lm.StageSample("prefill", point.cells, point.prefill.low, calls=calls),
            ]
        complete.append(f"{bench.role}:image")
    else:
        tick(f"{bench.name}: no projector, image skipped", config.reps * len(config.image_sizes))
    _measure_prompt_and_decode(model, bench, config, tick)
    complete.extend((f"{bench.role}:prefill", f"{bench.role}:decode"))


def bench_image(size: int, seed: int) -> LoadedImage:
    # decode_ms of a generated image is generation time, not decoding: leave it out.
    return dataclasses.replace(synthetic_image(size, size, seed=seed), decode_ms=0.0)


def _measure_images(model: VisionLanguageModel, config: BenchConfig, tick: _Ticker) -> list[ImagePoint]:
    """Every image size, repetitions interleaved (each size once, then again...), so that
    a busy spell of the machine spreads over the sizes instead of skewing one."""
    prompt = model.render_prompt("Describe the image.", image=True)
    images = [bench_image(size, config.seed) for size in config.image_sizes]
    runs: list[list[dict[str, float]]] = [[] for _ in images]
    counts = [(0, 0)] * len(images)
    for rep in range(config.reps):
        for i, image in enumerate(images):
            session = model.session()
            session.prefill(prompt, image)
            runs[i].append(dict(session.times.ms))
            counts[i] = (session.n_image_tokens, session.n_kv)
            tick(f"{model.name}: image {image.width}px ({rep + 1}/{config.reps})")

    def stat(i: int, *stages: str) -> Stat:
        return Stat.of([sum(run.get(s, 0.0) for s in stages) for run in runs[i]])

    return [
        ImagePoint(
            size=size,
            image_tokens=counts[i][0],
            cells=counts[i][1],
            preprocess=stat(i, "image"),
            encode=stat(i, "encode"),
            prefill=stat(i, "prefill"),
            total=stat(i, "image", "encode", "prefill"),
        )
        for i, size in enumerate(config.image_sizes)
    ]


def filler_text(model: VisionLanguageModel, n_tokens: int) -> str:
    """Plain filler text of at most ``n_tokens`` tokens of this model, as close as it gets."""
    # Real tokenizers average 3-5 characters a token: 16 a token leaves room to spare.
    long = (_FILLER * (n_tokens // 8 + 2))[: n_tokens * 16]
    low, high = 0, len(long) + 1
    while low + 1 < high:  # binary search on characters: the token count grows with them
        mid = (low + high) // 2
        low, high = (mid, high) if model.count_tokens(long[:mid]) <= n_tokens else (low, mid)
    return long[:low]


def _prefix(model: VisionLanguageModel, config: BenchConfig) -> tuple[Session, float]:
    """A session holding the fitted runs' image prefix, and what it cost."""
    session = model.session()
    image = bench_image(config.fit_image_size, config.seed) if model.has_vision else None
    session.prefill(model.render_prompt("Describe the image.", image=image is not None), image)
    return session, sum(session.times.ms.values())


def _measure_prompt_and_decode(
    model: VisionLanguageModel, bench: ModelBench, config: BenchConfig, tick: _Ticker
) -> None:
    """Per prompt length: prefill filler after the cached image prefix, then decode.

    The session is rewound to the prefix between runs, so the image is encoded once.
    """
    session, prefix_ms = _prefix(model, config)
    # Rewind by position; count context by KV cells (M-RoPE images fill more
    # cells than they advance positions).
    base, cells = session.n_past, session.n_kv
    fits = {s.size: s.total.low for s in bench.image}
    bench.prefix_ms = fits.get(config.fit_image_size, prefix_ms)
    bench.prefix_tokens, bench.prefix_image_tokens = cells, session.n_image_tokens
    n_decode = max(config.decode_lengths)
    needed = cells + max(config.prompt_lengths) + n_decode + 8
    if needed > model.n_ctx:
        raise UsageError(
            f"{model.name}: the bench needs a {needed}-token context, the model has {model.n_ctx}",
            hint=f"raise --ctx to {needed} or shorten --prompt-lengths/--decode-lengths",
        )
    lengths = sorted(set(config.prompt_lengths))
    texts = [filler_text(model, length) for length in lengths]
    prefill_ms: list[list[float]] = [[] for _ in lengths]
    steps: list[list[list[float]]] = [[] for _ in lengths]
    tokens, restarts = [0] * len(lengths), [0] * len(lengths)
    for rep in range(config.reps):  # interleaved, as for the images
        for i, text in enumerate(texts):
            session.rewind(base)
            start = time.perf_counter()
            tokens[i] = session.append(text, stage="bench_prefill")
            prefill_ms[i].append((time.perf_counter() - start) * 1000.0)
            deltas, extra = forced_decode(session, n_decode)
            restarts[i] += extra
            steps[i].append(deltas)
            tick(f"{model.name}: prompt {lengths[i]} + decode {n_decode} ({rep + 1}/{config.reps})")
    for i, length in enumerate(lengths):
        per_token = [statistics.median(d) if d else math.nan for d in steps[i]]
        context = cells + tokens[i]
        bench.prefill.append(PrefillPoint(length, tokens[i], Stat.of(prefill_ms[i])))
        bench.decode.append(DecodePoint(context, n_decode, Stat.of(per_token), restarts[i]))
        prefill = min(prefill_ms[i])
        calls = lm.prefill_calls(tokens[i], model.n_batch)
        bench.stage_samples.append(lm.StageSample("prefill", tokens[i], prefill, context=cells, calls=calls))
        cumulative = _cumsum(steady_steps(steps[i]))
        for n in sorted(set(config.decode_lengths)):
            if n <= len(cumulative):
                decode = cumulative[n - 1]
                bench.stage_samples.append(lm.StageSample("decode", n, decode, context=context))
                run_ms = bench.prefix_ms + prefill + decode
                bench.runs.append(lm.RunSample(bench.prefix_image_tokens, context, n, run_ms))


def steady_steps(runs: Sequence[Sequence[float]], window: int = 9) -> list[float]:
    """Each decode step's steady cost: its fastest repetition, then the median of the
    steps centred on it, up to ``window`` (a step preempted by another process is an
    outlier; the slow growth with the context is not: a centred median keeps a trend).
    The first step, which sets up sampling, is kept as it is."""
    n = min((len(r) for r in runs), default=0)
    fastest = [min(r[k] for r in runs) for k in range(n)]
    out = fastest[:1]
    for k in range(1, n):
        half = min(window // 2, k - 1, n - 1 - k)
        out.append(statistics.median(fastest[k - half : k + half + 1]))
    return out


def _cumsum(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def forced_decode(session: Session, n_tokens: int) -> tuple[list[float], int]:
    """Decode exactly ``n_tokens`` tokens (fewer only if the context fills up).

    Returns the ms of each token and how many end-of-generation tokens were met:
    each is replaced by a filler word (prefilled, not timed) so generation goes on
    at the same context length, unconstrained, as real reasoning would run.
    """
    deltas: list[float] = []
    restarts = 0
    while len(deltas) < n_tokens:
        last = 0.0
        for event in session.stream(n_tokens - len(deltas)):
            deltas.append(event.elapsed_ms - last)
            last = event.elapsed_ms
        if session.last.stop_reason != "eog" or restarts > n_tokens:
            break
        restarts += 1
        session.append(" the", stage="bench_filler")
    return deltas, restarts


def _analyse(report: BenchReport) -> None:
    """Fit each model and, with both fits, build the crossover and mode predictions."""
    for bench in report.models.values():
        try:
            bench.fit = lm.fit_model(bench.stage_samples, bench.runs, n_batch=bench.n_batch)
            report.complete.append(f"{bench.role}:fit")
        except ValueError as exc:
            bench.fit_problem = str(exc)
            continue
        report.warnings += fit_warnings(bench.name, bench.fit)
    small, large = report.models["small"], report.models["large"]
    if small.fit is None or large.fit is None:
        return
    config = report.config
    try:
        report.crossover = lm.crossover(
            small.fit,
            large.fit,
            small_prompt=small.question_prompt,
            large_prompt=large.question_prompt,
            small_tokens=config.small_tokens,
            large_tokens=config.large_tokens,
        )
        report.complete.append("crossover")
    except ValueError as exc:
        large.fit_problem = str(exc)
    report.predicted_modes = lm.predict_modes(
        small.fit,
        large.fit,
        small_prompt=small.question_prompt,
        large_prompt=large.question_prompt,
        think_tokens=config.think_tokens,
        answer_tokens=config.answer_tokens,
        transfer_tokens=config.transfer_tokens,
        concurrent=config.concurrent,
    )
    report.complete.append("predict")


def fit_warnings(name: str, fit: lm.LatencyModel) -> list[str]:
    """One line per fit (a stage or whole runs) whose mean error is over the threshold."""
    out = []
    for part, quality in fit.quality.items():
        if not quality.exact and quality.mean_abs_pct_error > lm.FIT_WARN_PCT:
            what = "whole runs" if part == "total" else f"its {part} times"
            out.append(
                f"{name}: the latency model misses {what} by {quality.mean_abs_pct_error:.0f}% on "
                f"average (over {lm.FIT_WARN_PCT:.0f}%); its predictions are rough"
            )
    return out


def _check_modes(report: BenchReport, small: Agent, large: Agent, tick: _Ticker) -> None:
    """Run ``ask`` once per mode and compare with the prediction for its token counts."""
    config = report.config
    seeing = small.model.has_vision and large.model.has_vision
    image = bench_image(config.fit_image_size, config.seed) if seeing else None
    question = make_question(BENCH_QUESTION, image, "auto")
    for mode in CHECK_MODES:
        options = AskOptions(
            mode=mode,
            think_budget=config.think_tokens,
            max_answer_tokens=config.answer_tokens,
            transfer_budget=config.transfer_tokens,
            sequential=not config.concurrent,
            seed=config.seed,
        )
        result = ask(question, options, small=small, large=large)
        check = mode_check(report, result)
        report.checks.append(check)
        report.complete.append(f"check:{mode}")
        if check.error_pct is not None and abs(check.error_pct) > lm.CHECK_WARN_PCT:
            label = mode if mode != "duo" else f"duo ({check.route})"
            report.warnings.append(
                f"ask --mode {label} spent {check.stages_ms:.0f} ms in llama.cpp, the latency model "
                f"predicted {check.predicted_ms:.0f} ms ({check.error_pct:+.0f}%, "
                f"over ±{lm.CHECK_WARN_PCT:.0f}%)"
            )
        tick(f"ask --mode {mode}")


def mode_check(report: BenchReport, result: AskResult) -> ModeCheck:
    """Predict ``result``'s time from the fits with the token counts it actually had."""
    small_fit, large_fit = report.models["small"].fit, report.models["large"].fit
    assert small_fit is not None and large_fit is not None  # checks run only with both fits
    predicted = predict_result(small_fit, large_fit, result, concurrent=report.config.concurrent)
    small_gen = result.small.tokens["generated"] if result.small else 0
    large_gen = result.large.tokens["generated"] if result.large else 0
    transferred = (result.transferred or {}).get("prefill_tokens", 0)
    agent = result.large or result.small
    assert agent is not None
    prompt = agent.tokens["prompt"] + agent.tokens["image"]
    tokens = {"prompt": prompt, "small": small_gen, "large": large_gen, "transferred": transferred}
    stages = stage_ms(result, concurrent=report.config.concurrent)
    return ModeCheck(result.mode, result.route, result.timings_ms["total"], stages, predicted, tokens)
