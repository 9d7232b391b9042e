"""A linear latency model per VLM and the predictions ``vlmduo bench`` makes from it.

The study behind vlmduo finds that a VLM's end-to-end time is a fixed cost (load
excluded: image encoding, set-up) plus a cost per prompt token (batched prefill,
cheap) plus a cost per output token (sequential decode, expensive). Fitting those
three numbers to measured runs lets us predict every mode's latency and the
crossover: how many tokens a large model may spend answering and still beat a
small model that reasons.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencySample:
    """One measured run: tokens in the prompt (image tokens included), tokens decoded, wall ms."""

    prompt_tokens: int
    output_tokens: int
    ms: float


@dataclass(frozen=True)
class LatencyFit:
    """``ms ≈ fixed_ms + per_prompt_token_ms * prompt + per_output_token_ms * output``.

    ``r2`` is the coefficient of determination of the fit on its samples and
    ``mean_abs_pct_error`` the mean absolute error relative to each sample, in percent.
    """

    fixed_ms: float
    per_prompt_token_ms: float
    per_output_token_ms: float
    r2: float
    mean_abs_pct_error: float


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


def fit_latency(samples: Sequence[LatencySample]) -> LatencyFit:
    """Fit the three costs by least squares, none of them negative.

    Needs at least 3 samples whose prompt and output token counts both vary and
    are not proportional to each other; raises ValueError otherwise.
    """
    _check_samples(samples)
    design = np.array([[1.0, s.prompt_tokens, s.output_tokens] for s in samples])
    ms = np.array([s.ms for s in samples], dtype=float)
    coef = _nonnegative_lstsq(design, ms)
    predicted = design @ coef
    ss_res = float(np.sum((ms - predicted) ** 2))
    ss_tot = float(np.sum((ms - ms.mean()) ** 2))
    # Constant timings leave nothing to explain: a perfect fit still scores 1.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    mape = float(np.mean(np.abs(predicted - ms) / ms) * 100.0)
    return LatencyFit(
        fixed_ms=float(coef[0]),
        per_prompt_token_ms=float(coef[1]),
        per_output_token_ms=float(coef[2]),
        r2=r2,
        mean_abs_pct_error=mape,
    )


def _check_samples(samples: Sequence[LatencySample]) -> None:
    """Reject sample sets that cannot determine all three costs."""
    if len(samples) < 3:
        raise ValueError(f"a latency fit needs at least 3 samples, got {len(samples)}")
    for s in samples:
        if s.prompt_tokens < 0 or s.output_tokens < 0:
            raise ValueError(f"token counts must be 0 or more: {s}")
        if not math.isfinite(s.ms) or s.ms <= 0:
            raise ValueError(f"a latency sample must be a positive, finite time: {s}")
    if len({s.prompt_tokens for s in samples}) < 2:
        raise ValueError("a latency fit needs samples with different prompt token counts")
    if len({s.output_tokens for s in samples}) < 2:
        raise ValueError("a latency fit needs samples with different output token counts")
    design = np.array([[1.0, s.prompt_tokens, s.output_tokens] for s in samples])
    if np.linalg.matrix_rank(design) < 3:
        # e.g. output always twice the prompt: the two per-token costs cannot be told apart.
        raise ValueError("prompt and output token counts vary together; vary them independently")


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (physical costs cannot be negative).

    A negative coefficient is clamped to 0 and the rest refitted. With three
    coefficients it is cheap to try every set of clamped ones and keep the best
    feasible fit, which is the exact constrained optimum.
    """
    n = design.shape[1]
    best = np.zeros(n)
    best_residual = float(np.sum(target**2))
    for size in range(1, n + 1):
        for free in itertools.combinations(range(n), size):
            sub, *_ = np.linalg.lstsq(design[:, free], target, rcond=None)
            if np.any(sub < 0):
                continue
            coef = np.zeros(n)
            coef[list(free)] = sub
            residual = float(np.sum((target - design @ coef) ** 2))
            if residual < best_residual:
                best, best_residual = coef, residual
    return best


def predict_ms(fit: LatencyFit, prompt_tokens: int, output_tokens: int) -> float:
    """Predicted wall time in ms of one run with these token counts."""
    return fit.fixed_ms + fit.per_prompt_token_ms * prompt_tokens + fit.per_output_token_ms * output_tokens


def predict_modes(
    small: LatencyFit,
    large: LatencyFit,
    *,
    prompt_tokens: int,
    think_tokens: int,
    answer_tokens: int,
    transfer_tokens: int,
    concurrent: bool = True,
) -> dict[str, float]:
    """Predicted ms of each mode and duo route for the given token counts.

    ``small``: the small model reasons and answers. ``large``: the large model
    answers only. ``large-think``: the large model reasons and answers.
    ``duo-agree``: both stage-1 agents (their max when concurrent, else their sum).
    ``duo-transfer``: stage 1, then the large model prefills the transferred tokens
    into its kept KV cache and decodes another answer. ``duo-confident``: the large
    answer is accepted at once and the small agent cancelled.
    """
    for name, value in (
        ("prompt_tokens", prompt_tokens),
        ("think_tokens", think_tokens),
        ("answer_tokens", answer_tokens),
        ("transfer_tokens", transfer_tokens),
    ):
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")
    small_ms = predict_ms(small, prompt_tokens, think_tokens + answer_tokens)
    large_ms = predict_ms(large, prompt_tokens, answer_tokens)
    stage1 = max(small_ms, large_ms) if concurrent else small_ms + large_ms
    # Transfer reuses the KV cache of image + question: only the new tokens cost.
    transfer = transfer_tokens * large.per_prompt_token_ms + answer_tokens * large.per_output_token_ms
    return {
        "small": small_ms,
        "large": large_ms,
        "large-think": predict_ms(large, prompt_tokens, think_tokens + answer_tokens),
        "duo-agree": stage1,
        "duo-transfer": stage1 + transfer,
        "duo-confident": large_ms,
    }


def crossover(
    small: LatencyFit,
    large: LatencyFit,
    *,
    prompt_tokens: int,
    small_tokens: Sequence[int],
    large_tokens: Sequence[int],
) -> list[CrossoverRow]:
    """One row per small-model reasoning length m in ``small_tokens``.

    Each row gives the largest n for which the large model answering in n tokens
    is still strictly faster than the small model producing m tokens, and the
    ratio large(n) / small(m) for every n in ``large_tokens``. Raises ValueError
    when the large fit has no per-output-token cost (the limit would be infinite).
    """
    if large.per_output_token_ms <= 0:
        raise ValueError("the large model's fit has no per-output-token cost; no crossover")
    if prompt_tokens < 0 or any(t < 0 for t in (*small_tokens, *large_tokens)):
        raise ValueError("token counts must be 0 or more")
    large_base = predict_ms(large, prompt_tokens, 0)
    rows = []
    for m in small_tokens:
        small_ms = predict_ms(small, prompt_tokens, m)
        rows.append(
            CrossoverRow(
                small_tokens=m,
                small_ms=small_ms,
                max_large_tokens=_max_tokens_under(large, prompt_tokens, small_ms, large_base),
                ratios={n: _ratio(predict_ms(large, prompt_tokens, n), small_ms) for n in large_tokens},
            )
        )
    return rows


def _ratio(large_ms: float, small_ms: float) -> float:
    """large / small, infinite when a degenerate small fit predicts no time at all."""
    return large_ms / small_ms if small_ms > 0 else math.inf


def _max_tokens_under(large: LatencyFit, prompt_tokens: int, limit_ms: float, base_ms: float) -> int | None:
    """Largest n >= 0 with predict_ms(large, prompt, n) < limit_ms, None if there is none."""
    if base_ms >= limit_ms:
        return None
    n = math.floor((limit_ms - base_ms) / large.per_output_token_ms)
    # Floating-point rounding can land exactly on the limit; the inequality is strict.
    while n > 0 and predict_ms(large, prompt_tokens, n) >= limit_ms:
        n -= 1
    return n
