"""``vlmduo bench``: latency measurement, fit and crossover on the synthetic models.

Tiny sizes and one or two repetitions keep this quick; nothing here asserts on
speed, only on structure, counts and that fitted numbers are finite and sane.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field

import pytest
from conftest import run_cli

from vlmduo.agents.base import AgentResult
from vlmduo.agents.local import Agent
from vlmduo.duo.pipeline import AskResult
from vlmduo.engine.session import TokenEvent
from vlmduo.errors import UsageError
from vlmduo.study import latency_model as lm
from vlmduo.study.ask_timing import predict_result, stage_ms
from vlmduo.study.bench import (
    CHECK_MODES,
    BenchConfig,
    Stat,
    filler_text,
    fit_warnings,
    forced_decode,
    run_bench,
    steady_steps,
)
from vlmduo.study.sweep import ROUTES, Environment, StudyConfig, run_study, watch_other_cpu

TINY = BenchConfig(
    reps=2,
    image_sizes=(32, 64),
    prompt_lengths=(8, 48),
    decode_lengths=(2, 12),
    think_tokens=6,
    answer_tokens=2,
    transfer_tokens=6,
    small_tokens=(16, 256, 4096),
    large_tokens=(1, 8, 64),
)


@pytest.fixture(scope="module")
def agents(small_model, large_model) -> tuple[Agent, Agent]:
    return Agent(small_model, thinking=True), Agent(large_model)


@pytest.fixture(scope="module")
def report(agents):
    return run_bench(*agents, TINY)


def _finite_fit(fit) -> None:
    for value in dataclasses.astuple(fit)[:-1]:
        assert math.isfinite(value) and value >= 0
    # decoding ten more tokens always costs something
    assert fit.decode_ms_per_token + fit.decode_ms_per_token_per_cell > 0
    assert set(fit.quality) == {"image", "prefill", "decode", "total"}
    for quality in fit.quality.values():
        assert math.isfinite(quality.r2) and math.isfinite(quality.mean_abs_pct_error)


def test_report_structure_and_counts(report) -> None:
    assert not report.interrupted
    assert set(report.models) == {"small", "large"}
    for role, bench in report.models.items():
        assert bench.load_ms is not None and bench.load_ms > 0
        assert [p.size for p in bench.image] == [32, 64]
        for point in bench.image:
            assert point.image_tokens > 0
            assert point.total.n == 2 and point.total.low <= point.total.median <= point.total.high
        assert [p.requested for p in bench.prefill] == [8, 48]
        assert all(0 < p.tokens <= p.requested for p in bench.prefill)
        assert [d.tokens for d in bench.decode] == [12, 12]
        assert bench.decode[0].context < bench.decode[1].context
        assert len(bench.runs) == 2 * 2  # prompt lengths x decode lengths
        assert {r.output_tokens for r in bench.runs} == {2, 12}
        assert all(r.ms > 0 for r in bench.runs)
        stages = [s.stage for s in bench.stage_samples]
        # image: one per size; prefill: image prompts + filler prompts; decode: prompts x lengths
        assert (stages.count("image"), stages.count("prefill"), stages.count("decode")) == (2, 4, 4)
        assert bench.prefix_tokens > bench.prefix_image_tokens > 0
        _finite_fit(bench.fit)
        for part in ("load", "image", "prefill", "decode", "fit"):
            assert f"{role}:{part}" in report.complete


def test_crossover_predictions_and_checks(report) -> None:
    assert [row.small_tokens for row in report.crossover] == [16, 256, 4096]
    for row in report.crossover:
        assert set(row.ratios) == {1, 8, 64}
        assert all(r > 0 and math.isfinite(r) for r in row.ratios.values())
        assert row.max_large_tokens is None or row.max_large_tokens >= 0
    assert all(p.tokens > p.image_tokens > 0 for p in report.prompts.values())
    assert set(report.predicted_modes) == {
        "small", "large", "large-think", "duo-agree", "duo-transfer", "duo-confident"
    }  # fmt: skip
    assert all(ms > 0 and math.isfinite(ms) for ms in report.predicted_modes.values())
    assert [c.mode for c in report.checks] == list(CHECK_MODES)
    for check in report.checks:
        assert 0 < check.stages_ms <= check.measured_ms  # llama.cpp's stages are part of the ask
        assert check.outside_ms == pytest.approx(check.measured_ms - check.stages_ms)
        assert check.predicted_ms is not None and check.predicted_ms > 0
        assert math.isfinite(check.error_pct)
    assert report.checks[-1].route in ("agree", "transfer")
    for part in ("crossover", "predict", "check:duo"):
        assert part in report.complete


def test_report_json_is_strict_json(report) -> None:
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["models"]["large"]["fit"]["decode_ms_per_token"] >= 0
    assert data["models"]["large"]["fit"]["quality"]["total"]["mean_abs_pct_error"] >= 0
    assert data["models"]["small"]["fit"]["fit_error_pct"] >= 0
    assert data["prompts"]["large"]["tokens"] > 0
    assert isinstance(data["warnings"], list)
    assert set(data["crossover"][0]["ratios"]) == {"1", "8", "64"}
    assert data["checks"][0]["error_pct"] is not None
    assert data["checks"][0]["outside_ms"] >= 0
    assert data["interrupted"] is False


def test_interrupt_keeps_results_so_far(agents) -> None:
    config = BenchConfig(
        reps=1,
        image_sizes=(32,),
        prompt_lengths=(8, 16),
        decode_lengths=(1, 3),
        think_tokens=4,
        answer_tokens=1,
    )
    steps = []

    def progress(description: str, done: int, total: int) -> None:
        steps.append(description)
        if description.startswith(agents[1].name):  # the large model has started
            raise KeyboardInterrupt

    report = run_bench(*agents, config, progress=progress)
    assert report.interrupted
    assert "small:decode" in report.complete and "small:fit" in report.complete
    assert "large:fit" not in report.complete and not report.checks and not report.crossover
    assert report.models["small"].fit is not None
    json.dumps(report.to_json(), allow_nan=False)


@pytest.mark.parametrize(
    "changes",
    [
        {"reps": 0},
        {"prompt_lengths": (8,)},
        {"decode_lengths": (4, 4)},
        {"image_sizes": ()},
        {"answer_tokens": 0},
    ],
)
def test_config_validation(changes: dict) -> None:
    with pytest.raises(UsageError):
        BenchConfig(**changes).validate()


def test_stat_median_and_spread() -> None:
    assert Stat.of([3.0, 1.0, 2.0]) == Stat(2.0, 1.0, 3.0, 3)


@pytest.mark.parametrize("n", [1, 8, 64, 300])
def test_filler_text_fits_the_token_count(small_model, n: int) -> None:
    count = small_model.count_tokens(filler_text(small_model, n))
    assert n - 3 <= count <= n


@dataclass
class _Last:
    stop_reason: str = "length"


@dataclass
class _FakeSession:
    """Stops with an end-of-generation token once, like a model that finishes early."""

    eog_after: int
    appended: list[str] = field(default_factory=list)
    last: _Last = field(default_factory=_Last)

    def stream(self, max_tokens: int):
        n = min(max_tokens, self.eog_after) if not self.appended else max_tokens
        self.last = _Last("eog" if n < max_tokens else "length")
        for i in range(n):
            yield TokenEvent(1, "x", None, 2.0 * (i + 1))

    def append(self, text: str, **_: object) -> int:
        self.appended.append(text)
        return 1


def test_forced_decode_goes_past_end_of_generation() -> None:
    session = _FakeSession(eog_after=3)
    deltas, restarts = forced_decode(session, 10)  # type: ignore[arg-type]
    assert len(deltas) == 10 and restarts == 1 and len(session.appended) == 1
    assert deltas == [2.0] * 10


def _model_args(small_files, large_files) -> list[str]:
    return [
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
        "--threads", "1", "--reps", "1", "--image-sizes", "32", "--prompt-lengths", "8,24",
        "--decode-lengths", "1,6", "--think-budget", "4", "--max-answer-tokens", "2",
        "--transfer-budget", "4",
    ]  # fmt: skip


def test_cli_json_is_one_object(small_files, large_files, isolated_env) -> None:
    proc = run_cli(["bench", *_model_args(small_files, large_files), "--json"], isolated_env)
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert set(data["models"]) == {"small", "large"}
    assert len(data["crossover"]) == len(BenchConfig().small_tokens)
    assert [c["mode"] for c in data["checks"]] == list(CHECK_MODES)
    assert data["interrupted"] is False


def test_cli_tables_on_stderr(small_files, large_files, isolated_env) -> None:
    proc = run_cli(["bench", *_model_args(small_files, large_files), "--no-check"], isolated_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    err = proc.stderr.decode()
    for heading in ("Measured", "Latency model", "Crossover", "Predicted latency per mode"):
        assert heading in err
    assert "synthetic tiny models" not in err  # files given by path: not called synthetic
    assert "the given model files" in err and "answers not reported" in err
    assert "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_cli_plot_without_matplotlib_fails_with_a_hint(tmp_path, isolated_env) -> None:
    proc = run_cli(
        ["bench", "--small", "x.gguf", "--large", "y.gguf", "--plot", str(tmp_path / "p.png")], isolated_env
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "Error: --plot needs matplotlib" in err
    assert "pip install 'vlmduo[plot]'" in err
    assert "Traceback" not in err and proc.stdout == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads 0"),
        (["--simulate", "qwen3-vl-2b-thinking"], "--simulate takes two names"),
        (["--simulate", "synthetic-small,qwen3-vl-8b-instruct"], "no real shape for 'synthetic-small'"),
        (["--study", "--agreement", "1.5"], "between 0 and 1"),
        (["--study", "--measure-lengths", "99"], "not among --reasoning-lengths"),
    ],
)
def test_cli_refuses_before_any_work(args: list[str], message: str, isolated_env) -> None:
    proc = run_cli(["bench", "--small", "x.gguf", "--large", "y.gguf", *args], isolated_env)
    assert proc.returncode == 2, proc.stderr.decode()
    assert message in proc.stderr.decode() and proc.stdout == b""


def test_cli_usage_error(isolated_env) -> None:
    proc = run_cli(["bench", "--small", "x.gguf", "--large", "y.gguf", "--prompt-lengths", "8"], isolated_env)
    assert proc.returncode == 2
    assert "at least 2 different --prompt-lengths" in proc.stderr.decode()


def _agent(prompt: int, image: int, generated: int) -> AgentResult:
    tokens = {"prompt": prompt, "image": image, "generated": generated}
    return AgentResult(model="m", answer="A", reasoning=None, tokens=tokens, timings_ms={})


def _result(mode: str, route: str | None, small, large, transferred=None, timings=None) -> AskResult:
    timings = {"total": 1.0, **(timings or {})}
    return AskResult("A", mode, None, route, "choice", small, large, transferred, timings)


def _timed(ms: float) -> AgentResult:
    stages = {"load": 999.0, "image": ms, "encode": ms, "prefill": ms, "decode": ms}
    return AgentResult(model="m", answer="A", reasoning=None, tokens={}, timings_ms=stages)


@pytest.mark.parametrize(
    ("result", "concurrent", "expected"),
    [
        (_result("small", None, _timed(1.0), None), False, 4.0),  # load is not a stage of the ask
        (_result("large-think", None, None, _timed(2.0)), False, 8.0),
        (_result("duo", "agree", _timed(1.0), _timed(2.0)), False, 12.0),
        (_result("duo", "agree", _timed(1.0), _timed(2.0)), True, 8.0),
        (
            _result(
                "duo",
                "transfer",
                _timed(1.0),
                _timed(2.0),
                {},
                {"transfer_prefill": 3.0, "answer_decode": 5.0},
            ),
            False,
            20.0,
        ),
    ],
)
def test_stage_ms_of_an_ask(result: AskResult, concurrent: bool, expected: float) -> None:
    assert stage_ms(result, concurrent=concurrent) == pytest.approx(expected)


def test_other_cpu_is_measured_and_labelled() -> None:
    env = Environment("w", "cpu, 2 cores", "CPU", 2, 0, "0.3", cores=2)
    with watch_other_cpu(env):
        sum(i * i for i in range(200_000))  # our own work is not "other"
    if sys.platform.startswith("linux"):
        assert env.other_cores is not None and env.other_cores >= 0
    env.other_cores = 1.5
    assert env.busy and "others used 1.5 cores" in env.short() and "answers not reported" in env.line()
    env.other_cores = 0.1
    assert not env.busy and "others" not in env.short()


FLAT_SMALL = lm.LatencyModel(prefill_ms_per_token=0.1, decode_ms_per_token=1.0)
FLAT_LARGE = lm.LatencyModel(prefill_ms_per_token=1.0, decode_ms_per_token=10.0)


@pytest.mark.parametrize(
    ("result", "concurrent", "expected"),
    [
        # small: prompt 20+80 -> 10 ms prefill, 50 tokens -> 50 ms
        (_result("small", None, _agent(20, 80, 50), None), False, 60.0),
        # large: 100 ms prefill, 2 tokens -> 20 ms
        (_result("large", None, None, _agent(20, 80, 2)), False, 120.0),
        (_result("duo", "agree", _agent(20, 80, 50), _agent(20, 80, 2)), False, 180.0),
        (_result("duo", "agree", _agent(20, 80, 50), _agent(20, 80, 2)), True, 120.0),
        # a sequential duo that ended confident never started the small agent
        (_result("duo", "confident", _agent(0, 0, 0), _agent(20, 80, 2)), False, 120.0),
        # transfer: 30 tokens prefilled (30 ms) and a 3-token answer (30 ms) after stage 1
        (
            _result(
                "duo",
                "transfer",
                _agent(20, 80, 50),
                _agent(20, 80, 2),
                {"prefill_tokens": 30, "answer_tokens": 3},
            ),
            False,
            240.0,
        ),
    ],
)
def test_predict_result_from_actual_tokens(result: AskResult, concurrent: bool, expected: float) -> None:
    assert predict_result(FLAT_SMALL, FLAT_LARGE, result, concurrent=concurrent) == pytest.approx(expected)


@pytest.mark.parametrize(("error", "warned"), [(5.0, False), (15.0, False), (15.1, True), (60.0, True)])
def test_fit_warnings_over_15_percent(error: float, warned: bool) -> None:
    quality = lm.FitQuality(n=4, r2=0.9, mean_abs_pct_error=error, max_abs_pct_error=2 * error)
    fit = lm.LatencyModel(decode_ms_per_token=1.0, quality={"decode": quality, "total": quality})
    warnings = fit_warnings("model-x", fit)
    assert bool(warnings) is warned
    if warned:
        assert len(warnings) == 2 and all(w.startswith("model-x:") for w in warnings)
        assert "whole runs" in warnings[1] and f"{error:.0f}%" in warnings[1]


def test_study_predicts_and_measures_every_route(agents, report) -> None:
    config = StudyConfig(reasoning_lengths=(4, 12), agreement=("0.5", "3736/4329"), answer_cap=2)
    study = run_study(*agents, report, config)
    assert not study.interrupted and study.complete == ["m=4", "m=12"]
    for point in study.points:
        for times in (point.predicted, point.measured):
            assert set(times) == set(ROUTES) and all(v > 0 for v in times.values())
        assert set(point.predicted_actual) == {"large-think", "duo-transfer"}
        assert 0 < point.tokens["large-think"] <= point.reasoning_tokens + 2
    # longer reasoning costs large-think more
    assert study.points[1].predicted["large-think"] > study.points[0].predicted["large-think"]
    labels = [label for label, _ in config.mixes()]
    assert labels[2] == "always" and len(labels) == 5
    for which in ("predicted", "measured"):
        for label, values in study.speedups(which):
            mix = dict(config.mixes())[label]
            for point, value in zip(study.points, values, strict=True):
                times = getattr(point, which)
                assert value == pytest.approx(times["large-think"] / mix.expected_ms(times))
    data = json.loads(json.dumps(study.to_json(), allow_nan=False))
    assert set(data["speedup"]["measured"]) == set(labels)


def test_study_without_measuring_only_predicts(agents, report) -> None:
    study = run_study(*agents, report, StudyConfig(reasoning_lengths=(8,), measure=False))
    assert [p.measured for p in study.points] == [{}]
    assert all(v is None for _, values in study.speedups("measured") for v in values)


def test_cli_tables_fit_80_columns_with_names_whole(isolated_env) -> None:
    env = {**isolated_env, "COLUMNS": "80"}
    args = ["bench", "--pair", "synthetic", "--threads", "1", "--reps", "1", "--image-sizes", "32"]
    args += ["--prompt-lengths", "8,24", "--decode-lengths", "1,6", "--think-budget", "4"]
    args += ["--max-answer-tokens", "2", "--transfer-budget", "4", "--study", "--reasoning-lengths", "4,8"]
    proc = run_cli(args, env)
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert "…" not in err
    assert max(len(line) for line in err.splitlines()) <= 80
    for name in ("synthetic-small", "synthetic-large", "duo-transfer", "large-think"):
        assert name in err
    assert "synthetic tiny models (random weights)" in err and "answers not reported" in err
    assert "Duo speedup over large-think" in err


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([[5.0, 1.0, 1.0, 1.0]], [5.0, 1.0, 1.0, 1.0]),  # the first step is kept
        ([[2.0, 1.0, 9.0, 1.0, 1.0]], [2.0, 1.0, 1.0, 1.0, 1.0]),  # a preempted step is an outlier
        ([[1.0] + [1.0, 1.0, 1.0, 1.0, 30.0, 31.0, 1.0, 1.0, 1.0, 1.0, 1.0]], [1.0] * 12),  # two in a row
        ([[1.0, 4.0, 1.0], [3.0, 1.0, 9.0]], [1.0, 1.0, 1.0]),  # the fastest repetition of each step
        ([[1.0, 1.0, 2.0, 3.0, 4.0]], [1.0, 1.0, 2.0, 3.0, 4.0]),  # a steady growth stays
        ([[1.0, 2.0], [1.0]], [1.0]),
        ([], []),
    ],
)
def test_steady_steps(runs: list[list[float]], expected: list[float]) -> None:
    assert steady_steps(runs) == pytest.approx(expected)
