"""A per-stage latency model of a VLM, and the predictions ``vlmduo bench`` makes from it.

The study behind vlmduo splits a VLM's time into its stages. Each is a linear
function of token counts with non-negative costs:

- ``image(i) = image_fixed + encode · i + attend · i²``: preprocess and vision
  encoder, ``i`` image tokens (the encoder's self-attention over the patches
  grows with their square);
- ``prefill(p) = prefill_call · calls + prefill · p``: ``p`` prompt tokens into
  the KV cache, batched (cheap per token), in ``calls`` calls to llama.cpp (one
  per batch of ``n_batch`` tokens, and one per text or image chunk);
- ``decode(n | c) = decode_fixed + Σ_{k<n} (b + c_kv · (c + k))``: ``n`` tokens
  one at a time after ``c`` cells in the KV cache. Every step reads the whole
  cache, so a token costs more the longer the context: ``b + c_kv · context``.

The costs are fitted by non-negative least squares on measured stage times,
weighted so that each sample counts by its relative error (a 5 ms and a 5 s
sample matter alike). Each fit reports its error on the samples it came from.
From two fitted models follow every mode's time, the crossover (how many
tokens a large model may answer in and still beat a small model reasoning for
m) and the duo's expected time for a mix of routes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

STAGES = ("image", "prefill", "decode")
FIT_WARN_PCT = 15.0  # a stage or end-to-end fit worse than this (mean) is flagged
CHECK_WARN_PCT = 20.0  # a measured mode its prediction misses by more than this is flagged


@dataclass(frozen=True)
class StageSample:
    """One measured stage: ``tokens`` image/prompt/output tokens after ``context`` KV cells,
    in ``calls`` calls to llama.cpp (prefill: batches and chunks)."""

    stage: str
    tokens: int
    ms: float
    context: int = 0
    calls: int = 1


@dataclass(frozen=True)
class RunSample:
    """One measured run: its image tokens, prompt KV cells (image included), output tokens, ms."""

    image_tokens: int
    prompt_tokens: int
    output_tokens: int
    ms: float


@dataclass(frozen=True)
class FitQuality:
    """How well fitted values follow the samples: R², mean and worst relative error (%).

    ``params`` is how many costs were fitted to the ``n`` samples: with as many
    samples as costs the fit is exact by construction and its error says nothing.
    """

    n: int
    r2: float
    mean_abs_pct_error: float
    max_abs_pct_error: float
    params: int = 0

    @property
    def exact(self) -> bool:
        """True when there were no more samples than fitted costs."""
        return 0 < self.n <= self.params

    @classmethod
    def of(cls, measured: Sequence[float], predicted: Sequence[float], params: int = 0) -> FitQuality:
        """Compare predictions with positive measurements."""
        y, p = np.asarray(measured, dtype=float), np.asarray(predicted, dtype=float)
        ss_res = float(np.sum((y - p) ** 2))
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        # Constant timings leave nothing to explain: a perfect fit still scores 1.
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
        rel = np.abs(p - y) / y * 100.0
        return cls(len(y), r2, float(rel.mean()), float(rel.max()), params)


@dataclass(frozen=True)
class Prompt:
    """What a model is given: ``tokens`` KV cells of prompt, ``image_tokens`` of them an image."""

    tokens: int
    image_tokens: int = 0

    def prefill_calls(self, n_batch: int) -> int:
        """llama.cpp calls to prefill it: batches of ``n_batch``; an image splits the text in two."""
        text = self.tokens - self.image_tokens
        if not self.image_tokens:
            return prefill_calls(text, n_batch)
        return 2 + prefill_calls(self.image_tokens, n_batch) if text else prefill_calls(self.tokens, n_batch)


def prefill_calls(tokens: int, n_batch: int) -> int:
    """Batches of at most ``n_batch`` that ``tokens`` tokens take (0 for none)."""
    return -(-tokens // max(1, n_batch))


@dataclass(frozen=True)
class LatencyModel:
    """The fitted stage costs of one model (ms), with the quality of each fit.

    ``quality`` maps each fitted stage, and ``total`` (whole runs predicted
    from the stages), to its error on the measured samples.
    """

    image_fixed_ms: float = 0.0
    encode_ms_per_token: float = 0.0
    encode_ms_per_token_squared: float = 0.0
    prefill_ms_per_call: float = 0.0
    prefill_ms_per_token: float = 0.0
    decode_fixed_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    decode_ms_per_token_per_cell: float = 0.0
    n_batch: int = 512
    quality: dict[str, FitQuality] = field(default_factory=dict)

    def image_ms(self, image_tokens: int) -> float:
        """Preprocess and encode of an image of ``image_tokens`` tokens (0: no image)."""
        if not image_tokens:
            return 0.0
        square = self.encode_ms_per_token_squared * image_tokens * image_tokens
        return self.image_fixed_ms + self.encode_ms_per_token * image_tokens + square

    def prefill_ms(self, tokens: int, calls: int | None = None) -> float:
        """Prefill of ``tokens`` tokens in ``calls`` calls (default: batches of ``n_batch``)."""
        if calls is None:
            calls = prefill_calls(tokens, self.n_batch)
        return self.prefill_ms_per_call * calls + self.prefill_ms_per_token * tokens if tokens else 0.0

    def decode_ms(self, tokens: int, context: int) -> float:
        """Decode of ``tokens`` tokens one by one after ``context`` KV cells."""
        if tokens <= 0:
            return 0.0
        cells = tokens * context + tokens * (tokens - 1) / 2  # the contexts the steps read, summed
        per_cell = self.decode_ms_per_token_per_cell
        return self.decode_fixed_ms + self.decode_ms_per_token * tokens + per_cell * cells

    def token_ms(self, context: int) -> float:
        """The cost of one decode step at ``context`` cells."""
        return self.decode_ms_per_token + self.decode_ms_per_token_per_cell * context

    def run_ms(self, prompt: Prompt, output_tokens: int) -> float:
        """A whole run: encode the image, prefill the prompt, decode ``output_tokens``."""
        return (
            self.image_ms(prompt.image_tokens)
            + self.prefill_ms(prompt.tokens, prompt.prefill_calls(self.n_batch))
            + self.decode_ms(output_tokens, prompt.tokens)
        )

    @property
    def fit_error_pct(self) -> float | None:
        """The end-to-end fit's mean error, else the worst stage's; None when nothing was fitted."""
        if "total" in self.quality:
            return self.quality["total"].mean_abs_pct_error
        errors = [q.mean_abs_pct_error for q in self.quality.values()]
        return max(errors) if errors else None


# -- non-negative least squares ---------------------------------------------------------


def nnls(design: np.ndarray, target: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """Minimise ``|design @ x - target|`` subject to ``x >= 0`` (Lawson and Hanson, 1974).

    Columns are scaled to unit norm first (token-count columns differ by orders
    of magnitude); all-zero columns get a zero coefficient.
    """
    a = np.asarray(design, dtype=float)
    b = np.asarray(target, dtype=float)
    norms = np.linalg.norm(a, axis=0)
    usable = norms > 0
    scaled = np.zeros_like(a)
    scaled[:, usable] = a[:, usable] / norms[usable]
    x = _lawson_hanson(scaled, b, max_iter or 30 * a.shape[1])
    out = np.zeros(a.shape[1])
    out[usable] = x[usable] / norms[usable]
    return out


def _lawson_hanson(a: np.ndarray, b: np.ndarray, max_iter: int) -> np.ndarray:
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * max(a.shape) * np.finfo(float).eps * max(1.0, float(np.abs(a).sum(axis=0).max()))
    for _ in range(max_iter):
        gradient = a.T @ (b - a @ x)
        free = ~passive & (gradient > tol)
        if not free.any():
            break
        passive[int(np.argmax(np.where(free, gradient, -np.inf)))] = True
        while True:
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if np.all(trial[passive] > tol):
                x = trial
                break
            # Step from x towards the trial until the first coefficient reaches 0, drop it.
            blocked = passive & (trial <= tol)
            alpha = float(np.min(x[blocked] / (x[blocked] - trial[blocked])))
            x = x + alpha * (trial - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                break
    return x


def fit_linear(rows: Sequence[Sequence[float]], ms: Sequence[float]) -> tuple[np.ndarray, FitQuality]:
    """Non-negative coefficients for ``ms ≈ rows @ coef``, weighted by 1/ms (relative error)."""
    design = np.asarray(rows, dtype=float)
    y = np.asarray(ms, dtype=float)
    coef = nnls(design / y[:, None], np.ones_like(y))
    params = int(np.count_nonzero(np.any(design != 0, axis=0)))
    return coef, FitQuality.of(y, design @ coef, params)


# -- fitting a model --------------------------------------------------------------------


def _image_rows(s: StageSample) -> list[float]:
    return [1.0, s.tokens, s.tokens * s.tokens]


def _prefill_rows(s: StageSample) -> list[float]:
    return [s.calls, s.tokens]


def _decode_rows(s: StageSample) -> list[float]:
    return [1.0, s.tokens, s.tokens * s.context + s.tokens * (s.tokens - 1) / 2]


_ROWS: dict[str, Callable[[StageSample], list[float]]] = {
    "image": _image_rows,
    "prefill": _prefill_rows,
    "decode": _decode_rows,
}
# Which columns to keep, most telling first, when the samples cannot separate them all.
_PRIORITY = {"image": (1, 0, 2), "prefill": (1, 0), "decode": (1, 2, 0)}
_FIELDS = {
    "image": ("image_fixed_ms", "encode_ms_per_token", "encode_ms_per_token_squared"),
    "prefill": ("prefill_ms_per_call", "prefill_ms_per_token"),
    "decode": ("decode_fixed_ms", "decode_ms_per_token", "decode_ms_per_token_per_cell"),
}


def _separable(rows: list[list[float]], priority: Sequence[int]) -> list[list[float]]:
    """Zero the least telling columns until no more costs are fitted than there are
    distinct samples: two image sizes fit a fixed and a per-token cost, one only the latter."""
    keep = set(priority[: len({tuple(row) for row in rows})])
    return [[v if j in keep else 0.0 for j, v in enumerate(row)] for row in rows]


def check_samples(samples: Sequence[StageSample]) -> None:
    """ValueError for samples no fit can use: unknown stage, negative counts, bad times."""
    for s in samples:
        if s.stage not in STAGES:
            raise ValueError(f"unknown stage {s.stage!r}: one of {', '.join(STAGES)}")
        if s.tokens < 0 or s.context < 0 or s.calls < 1:
            raise ValueError(f"token counts must be 0 or more: {s}")
        if not math.isfinite(s.ms) or s.ms <= 0:
            raise ValueError(f"a latency sample must be a positive, finite time: {s}")


def fit_model(
    samples: Sequence[StageSample], runs: Sequence[RunSample] = (), *, n_batch: int = 512
) -> LatencyModel:
    """Fit each stage that has samples; ``runs`` (whole runs) measure the end-to-end error.

    A stage fits at most as many costs as it has distinct samples, the most
    telling first (per token, then fixed, then the squared or context term): one
    image size gives a cost per image token only. ValueError when there is no
    decode sample at all: without a cost per output token nothing can be predicted.
    """
    check_samples(samples)
    values: dict[str, float] = {}
    quality: dict[str, FitQuality] = {}
    for stage in STAGES:
        chosen = [s for s in samples if s.stage == stage and s.tokens > 0]
        if not chosen:
            continue
        rows = _separable([_ROWS[stage](s) for s in chosen], _PRIORITY[stage])
        coef, quality[stage] = fit_linear(rows, [s.ms for s in chosen])
        values.update(zip(_FIELDS[stage], (float(c) for c in coef), strict=True))
    if "decode" not in quality:
        raise ValueError("a latency model needs decode samples (time per output token)")
    model = LatencyModel(**values, n_batch=n_batch, quality=quality)
    if runs:
        predicted = [model.run_ms(Prompt(r.prompt_tokens, r.image_tokens), r.output_tokens) for r in runs]
        quality["total"] = FitQuality.of([r.ms for r in runs], predicted)
    return model


# -- predictions ------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossoverRow:
    """For a small model reasoning ``small_tokens`` tokens: how far the large model may go.

    ``max_large_tokens`` is the largest number of output tokens with which the large
    model is still strictly faster, None when it is slower even with none.
    ``ratios`` maps each large-model token count of the grid to large ms / small ms
    (below 1: the large model is faster).
    """

    small_tokens: int
    small_ms: float
    max_large_tokens: int | None
    ratios: dict[int, float]


def crossover(
    small: LatencyModel,
    large: LatencyModel,
    *,
    small_prompt: Prompt,
    large_prompt: Prompt,
    small_tokens: Sequence[int],
    large_tokens: Sequence[int],
) -> list[CrossoverRow]:
    """One row per small-model reasoning length m in ``small_tokens``.

    Each row gives the largest n for which the large model answering in n tokens
    is still strictly faster than the small model producing m tokens, and the
    ratio large(n) / small(m) for every n in ``large_tokens``. ValueError when
    the large model's decode costs nothing (the limit would be infinite).
    """
    if large.decode_ms_per_token <= 0 and large.decode_ms_per_token_per_cell <= 0:
        raise ValueError("the large model's fit has no per-output-token cost; no crossover")
    if any(t < 0 for t in (*small_tokens, *large_tokens)):
        raise ValueError("token counts must be 0 or more")
    rows = []
    for m in small_tokens:
        small_ms = small.run_ms(small_prompt, m)
        rows.append(
            CrossoverRow(
                small_tokens=m,
                small_ms=small_ms,
                max_large_tokens=_max_tokens_under(large, large_prompt, small_ms),
                ratios={n: _ratio(large.run_ms(large_prompt, n), small_ms) for n in large_tokens},
            )
        )
    return rows


def _ratio(large_ms: float, small_ms: float) -> float:
    """large / small, infinite when a degenerate small fit predicts no time at all."""
    return large_ms / small_ms if small_ms > 0 else math.inf


def _max_tokens_under(model: LatencyModel, prompt: Prompt, limit_ms: float) -> int | None:
    """Largest n >= 0 with model.run_ms(prompt, n) < limit_ms, None if there is none.

    run_ms grows with n (no cost is negative): double an upper bound, then bisect.
    """
    if model.run_ms(prompt, 0) >= limit_ms:
        return None
    low, high = 0, 1
    while model.run_ms(prompt, high) < limit_ms:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if model.run_ms(prompt, mid) < limit_ms else (low, mid)
    return low


def predict_modes(
    small: LatencyModel,
    large: LatencyModel,
    *,
    small_prompt: Prompt,
    large_prompt: Prompt,
    think_tokens: int,
    answer_tokens: int,
    transfer_tokens: int,
    concurrent: bool = False,
) -> dict[str, float]:
    """Predicted ms of each mode and duo route for the given token counts.

    ``small``: the small model reasons and answers. ``large``: the large model
    answers only. ``large-think``: the large model reasons and answers.
    ``duo-agree``: both stage-1 agents (their max when concurrent, else their sum).
    ``duo-transfer``: stage 1, then the large model prefills the transferred tokens
    into its kept KV cache and decodes another answer. ``duo-confident``: the large
    answer is accepted at once, the small agent cancelled or never started.
    """
    for name, value in (
        ("think_tokens", think_tokens),
        ("answer_tokens", answer_tokens),
        ("transfer_tokens", transfer_tokens),
    ):
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
    small_ms = small.run_ms(small_prompt, think_tokens + answer_tokens)
    large_ms = large.run_ms(large_prompt, answer_tokens)
    stage1 = max(small_ms, large_ms) if concurrent else small_ms + large_ms
    # Transfer reuses the KV cache of image + question + first answer: only new tokens cost.
    context = large_prompt.tokens + answer_tokens + transfer_tokens
    transfer = large.prefill_ms(transfer_tokens) + large.decode_ms(answer_tokens, context)
    return {
        "small": small_ms,
        "large": large_ms,
        "large-think": large.run_ms(large_prompt, think_tokens + answer_tokens),
        "duo-agree": stage1,
        "duo-transfer": stage1 + transfer,
        "duo-confident": large_ms,
    }


# -- policies and route mixes -----------------------------------------------------------

POLICIES = ("verify", "always", "confidence")


@dataclass(frozen=True)
class RouteMix:
    """Fractions of questions that take each duo route (they sum to 1)."""

    agree: float = 0.0
    transfer: float = 0.0
    confident: float = 0.0

    def expected_ms(self, routes: dict[str, float]) -> float:
        """Mean time of a question over the mix, from each route's time (``duo-<route>``)."""
        return (
            self.agree * routes["duo-agree"]
            + self.transfer * routes["duo-transfer"]
            + self.confident * routes["duo-confident"]
        )


def policy_mix(policy: str, agreement: float, confident: float = 0.0) -> RouteMix:
    """The routes a policy takes when the two answers agree on ``agreement`` of the questions.

    ``verify``: agree or transfer. ``always``: always transfer. ``confidence``:
    ``confident`` of the questions end at the large answer, the rest are verified.
    """
    if not (0.0 <= agreement <= 1.0 and 0.0 <= confident <= 1.0):
        raise ValueError("agreement and confident rates must be between 0 and 1")
    if policy == "verify":
        return RouteMix(agree=agreement, transfer=1.0 - agreement)
    if policy == "always":
        return RouteMix(transfer=1.0)
    if policy == "confidence":
        rest = 1.0 - confident
        return RouteMix(agree=rest * agreement, transfer=rest * (1.0 - agreement), confident=confident)
    raise ValueError(f"unknown policy {policy!r}: one of {', '.join(POLICIES)}")


def parse_rate(text: str) -> float:
    """``"0.86"``, ``"86%"`` or a count ``"3736/4329"`` as a fraction in [0, 1]."""
    text = text.strip()
    try:
        if "/" in text:
            part, whole = (float(v) for v in text.split("/", 1))
            value = part / whole
        elif text.endswith("%"):
            value = float(text[:-1]) / 100.0
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a rate: {text!r} (write 0.86, 86% or 3736/4329)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a rate must be between 0 and 1: {text!r}")
    return value
