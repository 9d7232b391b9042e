"""The latency model behind ``vlmduo bench``: NNLS, stage fits, predictions, crossover (pure logic)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from vlmduo.study.latency_model import (
    CrossoverRow,
    FitQuality,
    LatencyModel,
    Prompt,
    RouteMix,
    RunSample,
    StageSample,
    crossover,
    fit_model,
    nnls,
    parse_rate,
    policy_mix,
    predict_modes,
    prefill_calls,
)

TRUE = LatencyModel(
    image_fixed_ms=3.0,
    encode_ms_per_token=0.4,
    encode_ms_per_token_squared=0.0002,
    prefill_ms_per_call=2.0,
    prefill_ms_per_token=0.05,
    decode_fixed_ms=1.0,
    decode_ms_per_token=2.0,
    decode_ms_per_token_per_cell=0.004,
)


def exhaustive_nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact non-negative optimum by trying every set of free coefficients."""
    n = a.shape[1]
    best, best_res = np.zeros(n), float(np.sum(b**2))
    for size in range(1, n + 1):
        for free in itertools.combinations(range(n), size):
            sub = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if np.any(sub < 0):
                continue
            x = np.zeros(n)
            x[list(free)] = sub
            res = float(np.sum((a @ x - b) ** 2))
            if res < best_res:
                best, best_res = x, res
    return best


@pytest.mark.parametrize("seed", range(12))
def test_nnls_finds_the_constrained_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((20, 4)) * rng.uniform(0.01, 100, size=4)  # badly scaled columns
    b = rng.standard_normal(20)
    x = nnls(a, b)
    assert np.all(x >= 0)
    expected = exhaustive_nnls(a, b)
    assert np.sum((a @ x - b) ** 2) == pytest.approx(np.sum((a @ expected - b) ** 2), rel=1e-9, abs=1e-12)


def test_nnls_equals_least_squares_when_that_is_positive() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = a @ np.array([2.0, 0.5])
    assert nnls(a, b) == pytest.approx([2.0, 0.5])


def test_nnls_clamps_a_negative_coefficient_and_refits() -> None:
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = a @ np.array([-1.0, 2.0])  # least squares wants a negative intercept
    x = nnls(a, b)
    assert x[0] == 0.0
    assert x[1] == pytest.approx(np.linalg.lstsq(a[:, 1:], b, rcond=None)[0][0])


def test_nnls_zero_column_gets_zero() -> None:
    a = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert nnls(a, np.array([1.0, 2.0, 3.0])) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    ("tokens", "context", "expected"),
    [
        (0, 500, 0.0),
        (1, 0, 1.0 + 2.0),
        (1, 500, 1.0 + 2.0 + 0.004 * 500),
        # steps read 100, 101, 102 cells: 3*2 + 0.004*303 + fixed 1
        (3, 100, 1.0 + 6.0 + 0.004 * 303),
    ],
)
def test_decode_cost_grows_with_the_context(tokens: int, context: int, expected: float) -> None:
    assert TRUE.decode_ms(tokens, context) == pytest.approx(expected)


def test_run_is_the_sum_of_its_stages() -> None:
    prompt = Prompt(tokens=300, image_tokens=196)
    # text, the image in one batch, text: 3 calls
    expected = (3.0 + 0.4 * 196 + 0.0002 * 196**2) + (3 * 2.0 + 0.05 * 300) + TRUE.decode_ms(50, 300)
    assert TRUE.run_ms(prompt, 50) == pytest.approx(expected)
    assert TRUE.run_ms(Prompt(40), 0) == pytest.approx(2.0 + 0.05 * 40)  # no image, no output
    assert TRUE.token_ms(1000) == pytest.approx(6.0)


def measured(
    model: LatencyModel, noise: float = 0.0, seed: int = 0
) -> tuple[list[StageSample], list[RunSample]]:
    """Stage and run samples as the bench takes them, from a known model."""
    rng = np.random.default_rng(seed)

    def jitter(ms: float) -> float:
        return ms * (1 + rng.normal(0, noise))

    samples = [StageSample("image", i, jitter(model.image_ms(i))) for i in (49, 196, 784)]
    samples += [
        StageSample("prefill", p, jitter(model.prefill_ms(p)), calls=prefill_calls(p, 512))
        for p in (64, 256, 1024)
    ]
    samples.append(StageSample("prefill", 225, jitter(model.prefill_ms(225, calls=3)), calls=3))
    runs = []
    for context in (300, 500, 1300):
        for n in (16, 64, 256):
            samples.append(StageSample("decode", n, jitter(model.decode_ms(n, context)), context=context))
            runs.append(RunSample(196, context, n, jitter(model.run_ms(Prompt(context, 196), n))))
    return samples, runs


@pytest.mark.parametrize(
    ("prompt", "calls"),
    [(Prompt(0), 0), (Prompt(40), 1), (Prompt(512), 1), (Prompt(513), 2), (Prompt(300, 196), 3),
     (Prompt(900, 784), 4), (Prompt(196, 196), 1)],
)  # fmt: skip
def test_prefill_calls(prompt: Prompt, calls: int) -> None:
    assert prompt.prefill_calls(512) == calls


def test_fit_recovers_every_cost() -> None:
    fit = fit_model(*measured(TRUE))
    for name in (
        "image_fixed_ms",
        "encode_ms_per_token",
        "encode_ms_per_token_squared",
        "prefill_ms_per_call",
        "prefill_ms_per_token",
        "decode_fixed_ms",
        "decode_ms_per_token",
        "decode_ms_per_token_per_cell",
    ):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-6, abs=1e-9), name
    assert set(fit.quality) == {"image", "prefill", "decode", "total"}
    assert fit.fit_error_pct == pytest.approx(0.0, abs=1e-6)


def test_fit_through_noise_stays_close() -> None:
    fit = fit_model(*measured(TRUE, noise=0.02, seed=3))
    assert fit.decode_ms_per_token == pytest.approx(2.0, rel=0.1)
    assert fit.decode_ms_per_token_per_cell == pytest.approx(0.004, rel=0.2)
    assert 0.0 < fit.quality["total"].mean_abs_pct_error < 5.0


def test_without_the_context_term_decode_does_not_fit() -> None:
    """Negative control: the context term is what makes a slowing decode fit."""
    steep = LatencyModel(decode_ms_per_token=0.4, decode_ms_per_token_per_cell=0.0006)  # 0.4 -> 1.2 ms/token
    samples = [s for s in measured(steep)[0] if s.stage == "decode"]
    assert fit_model(samples).quality["decode"].mean_abs_pct_error < 1e-6
    flat = [StageSample("decode", s.tokens, s.ms, context=0) for s in samples]  # context hidden
    assert fit_model(flat).quality["decode"].mean_abs_pct_error > 15.0


def test_one_token_count_folds_the_fixed_cost_into_the_per_token_one() -> None:
    samples = [StageSample("image", 256, 100.0), StageSample("image", 256, 110.0)]
    samples += [StageSample("decode", n, 2.0 * n, context=10) for n in (4, 8, 16)]
    fit = fit_model(samples)
    assert fit.image_fixed_ms == 0.0 and fit.encode_ms_per_token_squared == 0.0
    assert fit.image_ms(256) == pytest.approx(105.0, rel=0.05)
    assert fit.quality["image"].params == 1 and not fit.quality["image"].exact


def test_two_image_sizes_fit_a_fixed_and_a_per_token_cost_exactly() -> None:
    samples = [StageSample("image", 49, 10.0 + 49), StageSample("image", 196, 10.0 + 196)]
    samples += [StageSample("decode", n, 2.0 * n, context=10) for n in (4, 8, 16)]
    fit = fit_model(samples)
    assert (fit.image_fixed_ms, fit.encode_ms_per_token) == pytest.approx((10.0, 1.0))
    assert fit.encode_ms_per_token_squared == 0.0
    assert fit.quality["image"].exact  # two samples, two costs: the error says nothing


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([StageSample("image", 1, 1.0)], "decode samples"),
        ([StageSample("encode", 1, 1.0)], "unknown stage"),
        ([StageSample("decode", -1, 1.0)], "0 or more"),
        ([StageSample("decode", 1, 0.0)], "positive"),
        ([StageSample("decode", 1, math.nan)], "finite"),
    ],
)
def test_fit_rejects_unusable_samples(samples: list[StageSample], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_model(samples)


def test_fit_quality() -> None:
    quality = FitQuality.of([100.0, 200.0], [110.0, 180.0])
    assert quality.n == 2
    assert quality.mean_abs_pct_error == pytest.approx(10.0)
    assert quality.max_abs_pct_error == pytest.approx(10.0)
    assert FitQuality.of([5.0, 5.0], [5.0, 5.0]).r2 == 1.0


# Linear models (no context term) keep the arithmetic of the tables readable.
SMALL = LatencyModel(prefill_ms_per_token=0.1, decode_ms_per_token=2.0, image_fixed_ms=10.0)
LARGE = LatencyModel(prefill_ms_per_token=0.5, decode_ms_per_token=10.0, image_fixed_ms=50.0)
P = Prompt(100, image_tokens=64)


@pytest.mark.parametrize(
    ("concurrent", "expected"),
    [
        # think 200, answer 2, transfer 50, prompt 100 with an image:
        # small = 10 + 10 + 2*202 = 424; large = 50 + 50 + 10*2 = 120;
        # large-think = 100 + 10*202 = 2120; transfer = 50*0.5 + 2*10 = 45.
        (True, {"small": 424, "large": 120, "large-think": 2120, "duo-agree": 424,
                "duo-transfer": 469, "duo-confident": 120}),
        (False, {"small": 424, "large": 120, "large-think": 2120, "duo-agree": 544,
                 "duo-transfer": 589, "duo-confident": 120}),
    ],
)  # fmt: skip
def test_predict_modes(concurrent: bool, expected: dict[str, float]) -> None:
    modes = predict_modes(
        SMALL,
        LARGE,
        small_prompt=P,
        large_prompt=P,
        think_tokens=200,
        answer_tokens=2,
        transfer_tokens=50,
        concurrent=concurrent,
    )
    assert modes == pytest.approx(expected)


def test_transfer_decodes_after_the_whole_context() -> None:
    large = LatencyModel(decode_ms_per_token=1.0, decode_ms_per_token_per_cell=0.01)
    modes = predict_modes(
        large, large, small_prompt=P, large_prompt=P, think_tokens=0, answer_tokens=1, transfer_tokens=20
    )
    # the final answer token reads prompt 100 + first answer 1 + transfer 20 cells
    assert modes["duo-transfer"] - modes["duo-agree"] == pytest.approx(1.0 + 0.01 * 121)


def test_predict_modes_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError, match="think_tokens"):
        predict_modes(
            SMALL, LARGE, small_prompt=P, large_prompt=P, think_tokens=-1, answer_tokens=1, transfer_tokens=0
        )


# small(m) = 15 + 2m (no image); large(n) = 100 + 10n.
CROSS_SMALL = LatencyModel(prefill_ms_per_call=5.0, prefill_ms_per_token=0.1, decode_ms_per_token=2.0)
CROSS_LARGE = LatencyModel(prefill_ms_per_token=1.0, decode_ms_per_token=10.0)
Q = Prompt(100)


@pytest.mark.parametrize(
    ("m", "small_ms", "max_n"),
    [
        (0, 15.0, None),  # slower even answering with no tokens
        (42, 99.0, None),
        (43, 101.0, 0),
        (92, 199.0, 9),
        (93, 201.0, 10),
        (1000, 2015.0, 191),
    ],
)
def test_crossover_limits(m: int, small_ms: float, max_n: int | None) -> None:
    [row] = crossover(
        CROSS_SMALL, CROSS_LARGE, small_prompt=Q, large_prompt=Q, small_tokens=[m], large_tokens=[]
    )
    assert row.small_tokens == m
    assert row.small_ms == pytest.approx(small_ms)
    assert row.max_large_tokens == max_n


def test_crossover_with_a_context_term_matches_brute_force() -> None:
    large = LatencyModel(decode_ms_per_token=1.0, decode_ms_per_token_per_cell=0.01)
    [row] = crossover(SMALL, large, small_prompt=Q, large_prompt=Q, small_tokens=[300], large_tokens=[])
    brute = max(n for n in range(10_000) if large.run_ms(Q, n) < row.small_ms)
    assert row.max_large_tokens == brute


def test_crossover_ratio_grid() -> None:
    rows = crossover(
        CROSS_SMALL,
        CROSS_LARGE,
        small_prompt=Q,
        large_prompt=Q,
        small_tokens=[92, 492],
        large_tokens=[0, 10, 100],
    )
    assert rows == [
        CrossoverRow(92, 199.0, 9, pytest.approx({0: 100 / 199, 10: 200 / 199, 100: 1100 / 199})),
        CrossoverRow(492, 999.0, 89, pytest.approx({0: 100 / 999, 10: 200 / 999, 100: 1100 / 999})),
    ]


def test_crossover_needs_a_decode_cost() -> None:
    with pytest.raises(ValueError, match="per-output-token"):
        crossover(SMALL, LatencyModel(), small_prompt=Q, large_prompt=Q, small_tokens=[1], large_tokens=[1])


@pytest.mark.parametrize(
    ("policy", "agreement", "confident", "expected"),
    [
        ("verify", 0.8, 0.0, RouteMix(agree=0.8, transfer=0.2)),
        ("always", 0.8, 0.5, RouteMix(transfer=1.0)),
        ("confidence", 0.8, 0.5, RouteMix(agree=0.4, transfer=0.1, confident=0.5)),
    ],
)
def test_policy_mix(policy: str, agreement: float, confident: float, expected: RouteMix) -> None:
    mix = policy_mix(policy, agreement, confident)
    assert dataclasses.astuple(mix) == pytest.approx(dataclasses.astuple(expected))
    assert mix.agree + mix.transfer + mix.confident == pytest.approx(1.0)


def test_policy_mix_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        policy_mix("sometimes", 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        policy_mix("verify", 1.5)


def test_expected_time_of_a_mix() -> None:
    routes = {"duo-agree": 100.0, "duo-transfer": 200.0, "duo-confident": 10.0}
    assert RouteMix(agree=0.5, transfer=0.25, confident=0.25).expected_ms(routes) == pytest.approx(102.5)


@pytest.mark.parametrize(
    ("text", "value"), [("0.5", 0.5), ("86%", 0.86), ("3736/4329", 3736 / 4329), (" 1 ", 1.0), ("0", 0.0)]
)
def test_parse_rate(text: str, value: float) -> None:
    assert parse_rate(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1.2", "-0.1", "half", "1/0", "5/4"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)
