"""The latency model behind ``vlmduo bench``: fitting, predictions, crossover (pure logic)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from vlmduo.latency_model import (
    CrossoverRow,
    LatencyFit,
    LatencySample,
    crossover,
    fit_latency,
    predict_modes,
    predict_ms,
)


def fit(fixed: float, per_prompt: float, per_output: float) -> LatencyFit:
    return LatencyFit(fixed, per_prompt, per_output, r2=1.0, mean_abs_pct_error=0.0)


def samples_from(
    fixed: float, per_prompt: float, per_output: float, noise: float = 0.0, seed: int = 0
) -> list[LatencySample]:
    rng = random.Random(seed)
    out = []
    for prompt in (64, 300, 900, 2000):
        for output in (1, 16, 64, 256):
            ms = fixed + per_prompt * prompt + per_output * output
            out.append(LatencySample(prompt, output, ms * (1 + rng.gauss(0, noise))))
    return out


@pytest.mark.parametrize(
    ("fixed", "per_prompt", "per_output"),
    [(50.0, 0.2, 20.0), (5.0, 0.05, 8.0), (300.0, 1.5, 45.0)],
)
def test_fit_recovers_coefficients_through_noise(fixed: float, per_prompt: float, per_output: float) -> None:
    result = fit_latency(samples_from(fixed, per_prompt, per_output, noise=0.01))
    assert result.fixed_ms == pytest.approx(fixed, rel=0.25, abs=5.0)
    assert result.per_prompt_token_ms == pytest.approx(per_prompt, rel=0.05)
    assert result.per_output_token_ms == pytest.approx(per_output, rel=0.02)
    assert 0.99 < result.r2 <= 1.0
    assert 0.0 < result.mean_abs_pct_error < 3.0


def test_exact_samples_fit_exactly() -> None:
    result = fit_latency(samples_from(12.0, 0.5, 7.0))
    assert result.fixed_ms == pytest.approx(12.0)
    assert result.per_prompt_token_ms == pytest.approx(0.5)
    assert result.per_output_token_ms == pytest.approx(7.0)
    assert result.r2 == pytest.approx(1.0)
    assert result.mean_abs_pct_error == pytest.approx(0.0, abs=1e-9)


def lstsq(samples: list[LatencySample], columns: list[str]) -> np.ndarray:
    values = {
        "fixed": [1.0] * len(samples),
        "prompt": [s.prompt_tokens for s in samples],
        "output": [s.output_tokens for s in samples],
    }
    design = np.array([values[c] for c in columns], dtype=float).T
    return np.linalg.lstsq(design, np.array([s.ms for s in samples]), rcond=None)[0]


def test_negative_fixed_cost_is_clamped_and_the_rest_refit() -> None:
    # Timings that an unconstrained fit explains with a negative fixed cost.
    samples = samples_from(-40.0, 0.5, 10.0)
    assert np.linalg.lstsq(
        np.array([[1, s.prompt_tokens, s.output_tokens] for s in samples], dtype=float),
        np.array([s.ms for s in samples]),
        rcond=None,
    )[0][0] == pytest.approx(-40.0)
    result = fit_latency(samples)
    per_prompt, per_output = lstsq(samples, ["prompt", "output"])
    assert result.fixed_ms == 0.0
    assert result.per_prompt_token_ms == pytest.approx(per_prompt)
    assert result.per_output_token_ms == pytest.approx(per_output)
    assert result.r2 < 1.0


def test_negative_prompt_cost_is_clamped() -> None:
    samples = samples_from(100.0, -0.02, 5.0)
    result = fit_latency(samples)
    fixed, per_output = lstsq(samples, ["fixed", "output"])
    assert result.per_prompt_token_ms == 0.0
    assert result.fixed_ms == pytest.approx(fixed)
    assert result.per_output_token_ms == pytest.approx(per_output)


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([LatencySample(1, 1, 1.0), LatencySample(2, 3, 2.0)], "at least 3"),
        ([LatencySample(5, o, 1.0 + o) for o in (1, 2, 3)], "prompt token counts"),
        ([LatencySample(p, 4, 1.0 + p) for p in (1, 2, 3)], "output token counts"),
        ([LatencySample(n, 2 * n, 1.0 + n) for n in (1, 2, 3, 4)], "vary together"),
        ([LatencySample(1, 1, 1.0), LatencySample(2, 3, 0.0), LatencySample(3, 1, 2.0)], "positive"),
        ([LatencySample(1, 1, 1.0), LatencySample(2, 3, math.nan), LatencySample(3, 1, 2.0)], "finite"),
        ([LatencySample(-1, 1, 1.0), LatencySample(2, 3, 2.0), LatencySample(3, 1, 2.0)], "0 or more"),
    ],
)  # fmt: skip
def test_fit_rejects_underdetermined_samples(samples: list[LatencySample], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_latency(samples)


@pytest.mark.parametrize(
    ("prompt", "output", "expected"),
    [(0, 0, 10.0), (100, 0, 35.0), (0, 3, 16.0), (100, 200, 435.0)],
)
def test_predict_ms(prompt: int, output: int, expected: float) -> None:
    assert predict_ms(fit(10.0, 0.25, 2.0), prompt, output) == pytest.approx(expected)


SMALL = fit(10.0, 0.1, 2.0)
LARGE = fit(50.0, 0.5, 10.0)


@pytest.mark.parametrize(
    ("concurrent", "expected"),
    [
        # prompt 100, think 200, answer 2, transfer 50:
        # small = 10 + 10 + 2*202 = 424; large = 50 + 50 + 10*2 = 120;
        # large-think = 50 + 50 + 10*202 = 2120; transfer = 50*0.5 + 2*10 = 45.
        (
            True,
            {"small": 424, "large": 120, "large-think": 2120, "duo-agree": 424,
             "duo-transfer": 469, "duo-confident": 120},
        ),
        (
            False,
            {"small": 424, "large": 120, "large-think": 2120, "duo-agree": 544,
             "duo-transfer": 589, "duo-confident": 120},
        ),
    ],
)  # fmt: skip
def test_predict_modes(concurrent: bool, expected: dict[str, float]) -> None:
    modes = predict_modes(
        SMALL,
        LARGE,
        prompt_tokens=100,
        think_tokens=200,
        answer_tokens=2,
        transfer_tokens=50,
        concurrent=concurrent,
    )
    assert modes == pytest.approx(expected)


def test_predict_modes_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError, match="think_tokens"):
        predict_modes(SMALL, LARGE, prompt_tokens=1, think_tokens=-1, answer_tokens=1, transfer_tokens=0)


# With prompt 100: small(m) = 15 + 25 + 2m = 40 + 2m; large(n) = 50 + 50 + 10n = 100 + 10n.
CROSS_SMALL = fit(15.0, 0.25, 2.0)


@pytest.mark.parametrize(
    ("m", "small_ms", "max_n"),
    [
        (0, 40.0, None),  # slower even answering with no tokens
        (30, 100.0, None),  # equal is not faster
        (31, 102.0, 0),
        (80, 200.0, 9),  # 100 + 10*10 = 200 ties, so 9
        (83, 206.0, 10),
        (1000, 2040.0, 193),
    ],
)
def test_crossover_limits(m: int, small_ms: float, max_n: int | None) -> None:
    [row] = crossover(CROSS_SMALL, LARGE, prompt_tokens=100, small_tokens=[m], large_tokens=[])
    assert row.small_tokens == m
    assert row.small_ms == pytest.approx(small_ms)
    assert row.max_large_tokens == max_n


def test_crossover_ratio_grid() -> None:
    rows = crossover(CROSS_SMALL, LARGE, prompt_tokens=100, small_tokens=[80, 480], large_tokens=[0, 10, 100])
    assert rows == [
        CrossoverRow(80, 200.0, 9, {0: 0.5, 10: 1.0, 100: 5.5}),
        CrossoverRow(480, 1000.0, 89, {0: 0.1, 10: 0.2, 100: 1.1}),
    ]


def test_crossover_needs_a_decode_cost() -> None:
    with pytest.raises(ValueError, match="per-output-token"):
        crossover(SMALL, fit(1.0, 0.1, 0.0), prompt_tokens=1, small_tokens=[1], large_tokens=[1])
