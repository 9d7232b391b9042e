"""``vlmduo bench``: latency measurement, fit and crossover on the synthetic models.

Tiny sizes and one or two repetitions keep this quick; nothing here asserts on
speed, only on structure, counts and that fitted numbers are finite and sane.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field

import pytest
from conftest import run_cli

from vlmduo.agents import Agent
from vlmduo.bench import CHECK_MODES, BenchConfig, Stat, filler_text, forced_decode, run_bench
from vlmduo.engine import TokenEvent
from vlmduo.errors import UsageError

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
    for value in (fit.fixed_ms, fit.per_prompt_token_ms, fit.per_output_token_ms):
        assert math.isfinite(value) and value >= 0
    assert fit.per_output_token_ms > 0  # decoding ten more tokens always costs something
    assert math.isfinite(fit.r2) and math.isfinite(fit.mean_abs_pct_error)


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
        assert len(bench.samples) == 2 * 2  # prompt lengths x decode lengths
        assert {s.output_tokens for s in bench.samples} == {2, 12}
        assert all(s.ms > 0 for s in bench.samples)
        _finite_fit(bench.fit)
        for part in ("load", "image", "prefill", "decode", "fit"):
            assert f"{role}:{part}" in report.complete


def test_crossover_predictions_and_checks(report) -> None:
    assert [row.small_tokens for row in report.crossover] == [16, 256, 4096]
    for row in report.crossover:
        assert set(row.ratios) == {1, 8, 64}
        assert all(r > 0 and math.isfinite(r) for r in row.ratios.values())
        assert row.max_large_tokens is None or row.max_large_tokens >= 0
    assert report.crossover_prompt_tokens > 0
    assert set(report.predicted_modes) == {
        "small", "large", "large-think", "duo-agree", "duo-transfer", "duo-confident"
    }  # fmt: skip
    assert all(ms > 0 and math.isfinite(ms) for ms in report.predicted_modes.values())
    assert [c.mode for c in report.checks] == list(CHECK_MODES)
    for check in report.checks:
        assert check.measured_ms > 0
        assert check.predicted_ms is not None and check.predicted_ms > 0
        assert math.isfinite(check.error_pct)
    assert report.checks[-1].route in ("agree", "transfer")
    for part in ("crossover", "predict", "check:duo"):
        assert part in report.complete


def test_report_json_is_strict_json(report) -> None:
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["models"]["large"]["fit"]["per_output_token_ms"] > 0
    assert set(data["crossover"][0]["ratios"]) == {"1", "8", "64"}
    assert data["checks"][0]["error_pct"] is not None
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


def test_cli_usage_error(isolated_env) -> None:
    proc = run_cli(["bench", "--small", "x.gguf", "--large", "y.gguf", "--prompt-lengths", "8"], isolated_env)
    assert proc.returncode == 2
    assert "at least 2 different --prompt-lengths" in proc.stderr.decode()
