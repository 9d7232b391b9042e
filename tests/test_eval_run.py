"""``vlmduo eval``: configurations over an MMBench-format TSV made here, on the synthetic models."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from vlmduo.agents.local import Agent
from vlmduo.duo.pipeline import AskOptions
from vlmduo.errors import EngineError, UsageError
from vlmduo.media.images import synthetic_image
from vlmduo.study.datasets import load_dataset
from vlmduo.study.eval_run import EvalConfig, expand_configs, required_roles, run_eval, summarize_log
from vlmduo.study.evaluation import ResultsLog, is_correct

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
TINY = AskOptions(think_budget=4, max_answer_tokens=2, transfer_budget=4)


def png_b64(seed: int, size: int = 40, truncate: bool = False) -> str:
    image = synthetic_image(size, size, seed=seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (image.width, image.height), image.rgb).save(buf, format="PNG")
    data = buf.getvalue()
    # Cut inside the pixel data: the header still reads, decoding the pixels fails.
    return base64.b64encode(data[: len(data) // 2] if truncate else data).decode("ascii")


def write_mmbench(path: Path) -> Path:
    rows = [
        ["10", "Which colour is strongest?", "", "red", "green", "blue", "grey", "A", "colour", png_b64(1)],
        ["11", "Which corner is brightest?", "Look.", "top", "bottom", "", "", "B", "position", png_b64(2)],
        ["12", "How many shapes?", "", "one", "two", "three", "", "C", "count", png_b64(3)],
        ["13", "Truncated picture?", "", "yes", "no", "", "", "A", "colour", png_b64(4, truncate=True)],
        ["14", "Not base64 at all", "", "yes", "no", "", "", "A", "colour", "!!!not base64!!!"],
    ]  # fmt: skip
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def agents(small_model, large_model) -> tuple[Agent, Agent]:
    return Agent(small_model, thinking=True), Agent(large_model)


@pytest.fixture
def dataset(tmp_path: Path):
    return load_dataset(write_mmbench(tmp_path / "mmbench_tiny.tsv"))


@pytest.mark.parametrize(
    ("modes", "policies", "selectors", "keys", "roles"),
    [
        (["small"], [], [], ["small"], ["small"]),
        (["large", "large-think"], ["verify"], ["steps"], ["large", "large-think"], ["large"]),
        (["duo"], ["verify", "always"], ["steps", "tail"],
         ["duo/verify/steps", "duo/verify/tail", "duo/always/steps", "duo/always/tail"], ["small", "large"]),
        (["small", "small", "duo"], ["verify"], ["steps"], ["small", "duo/verify/steps"], ["small", "large"]),
    ],
)  # fmt: skip
def test_expand_configs(modes, policies, selectors, keys, roles) -> None:
    configs = expand_configs(modes, policies, selectors)
    assert [c.key for c in configs] == keys
    assert required_roles(configs) == roles


@pytest.mark.parametrize(
    ("modes", "policies", "selectors", "message"),
    [
        (["medium"], ["verify"], ["steps"], "unknown mode 'medium'"),
        (["duo"], ["sometimes"], ["steps"], "unknown policy"),
        (["duo"], ["verify"], [], "needs at least one policy and one selector"),
        ([], ["verify"], ["steps"], "at least one mode"),
    ],
)
def test_expand_configs_rejects(modes, policies, selectors, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        expand_configs(modes, policies, selectors)


def test_run_records_scores_and_counts_bad_items(agents, dataset, tmp_path: Path) -> None:
    configs = expand_configs(["small", "large", "duo"], ["verify"], ["steps"])
    log = ResultsLog(tmp_path / "results.jsonl")
    seen = []
    outcome = run_eval(
        dataset, configs, log, small=agents[0], large=agents[1], options=TINY, progress=seen.append
    )
    assert [b.id for b in outcome.bad_items] == ["14"]  # not base64: counted, not fatal
    assert outcome.n_items == 4 and outcome.n_run == 12 and outcome.n_skipped == 0
    assert outcome.n_errors == 3  # the truncated image, once per configuration
    assert seen[-1].done == seen[-1].total == 12
    records = list(log.records())
    assert len(records) == 12
    items = {item.id: item for item in dataset.items}
    for record in records:
        if record["item_id"] == "13":
            assert "truncated" in record["error"] and "embedded image" in record["error"]
            assert record["correct"] is False
            continue
        assert "error" not in record
        assert record["correct"] == is_correct(record["prediction"], items[record["item_id"]])
        assert record["category"] == items[record["item_id"]].category
        assert record["total_ms"] > 0
    duo = [r for r in records if r["config"] == "duo/verify/steps" and "error" not in r]
    assert all(r["route"] in ("agree", "transfer") for r in duo)
    by_config = {s.config: s for s in outcome.summaries}
    assert list(by_config) == ["small", "large", "duo/verify/steps"]
    for key, summary in by_config.items():
        mine = [r for r in records if r["config"] == key]
        assert summary.n == 4 and summary.n_errors == 1
        assert summary.n_correct == sum(bool(r["correct"]) for r in mine)
    assert by_config["small"].large_tokens is None and by_config["small"].small_tokens.n == 3


def test_known_predictions_are_scored(dataset, tmp_path: Path) -> None:
    """Records with known predictions, as a run writes them, give the expected accuracy."""
    log = ResultsLog(tmp_path / "known.jsonl")
    items = {item.id: item for item in dataset.items}
    predictions = {"10": "A", "11": "bottom", "12": "(A)", "13": None}  # right, right (text), wrong, none
    for item_id, prediction in predictions.items():
        item = items[item_id]
        log.append(
            {
                "item_id": item_id,
                "config": "large",
                "prediction": prediction,
                "correct": is_correct(prediction, item),
                "category": item.category,
            }
        )
    log.append({"item_id": "10", "config": "small", "prediction": "B", "correct": False})  # another config
    log.append({"item_id": "99", "config": "large", "prediction": "A", "correct": True})  # not in the dataset
    [summary] = summarize_log(log, [EvalConfig("large")], dataset.items)
    assert (summary.n, summary.n_correct, summary.accuracy) == (4, 2, 0.5)
    assert summary.categories["position"].accuracy == 1.0
    assert summary.categories["count"].accuracy == 0.0


def test_resume_skips_done_items_and_retries_errors(agents, dataset, tmp_path: Path) -> None:
    log = ResultsLog(tmp_path / "resume.jsonl")
    configs = [EvalConfig("large")]
    first = load_dataset(write_mmbench(tmp_path / "again.tsv"), limit=2)
    run_eval(first, configs, log, small=None, large=agents[1], options=TINY)
    assert len(list(log.records())) == 2
    outcome = run_eval(dataset, configs, log, small=None, large=agents[1], options=TINY, resume=True)
    assert (outcome.n_skipped, outcome.n_run) == (2, 2)
    assert sorted(r["item_id"] for r in log.records()) == ["10", "11", "12", "13"]
    again = run_eval(dataset, configs, log, small=None, large=agents[1], options=TINY, resume=True)
    assert (again.n_skipped, again.n_run) == (3, 1)  # only the failed item runs again
    assert again.summaries[0].n == 4


def test_engine_error_is_a_record_not_a_crash(agents, dataset, tmp_path: Path, monkeypatch) -> None:
    import vlmduo.study.eval_run as eval_run

    real_ask = eval_run.ask

    def flaky(question, options, **kwargs):
        if "corner" in question.text:
            raise EngineError("llama_decode failed (code 1)")
        return real_ask(question, options, **kwargs)

    monkeypatch.setattr(eval_run, "ask", flaky)
    log = ResultsLog(tmp_path / "flaky.jsonl")
    outcome = run_eval(dataset, [EvalConfig("large")], log, small=None, large=agents[1], options=TINY)
    errors = {r["item_id"]: r["error"] for r in log.records() if "error" in r}
    assert errors["11"] == "llama_decode failed (code 1)"
    assert outcome.n_errors == 2 and outcome.n_run == 4


def test_interrupt_keeps_written_records(agents, dataset, tmp_path: Path) -> None:
    def stop(state) -> None:
        raise KeyboardInterrupt

    log = ResultsLog(tmp_path / "stopped.jsonl")
    outcome = run_eval(
        dataset, [EvalConfig("large")], log, small=None, large=agents[1], options=TINY, progress=stop
    )
    assert outcome.interrupted and outcome.n_run == 1
    assert len(list(log.records())) == 1


def test_missing_model_is_a_usage_error(dataset, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="small model"):
        run_eval(dataset, [EvalConfig("small")], ResultsLog(tmp_path / "x.jsonl"), small=None, large=None)


def _cli_args(tsv: Path, results: Path, small_files, large_files) -> list[str]:
    return [
        "eval", str(tsv), "--modes", "large,duo", "--results", str(results),
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
        "--threads", "1", "--think-budget", "4", "--max-answer-tokens", "2", "--transfer-budget", "4",
    ]  # fmt: skip


def test_cli_json_resume_and_existing_results(small_files, large_files, isolated_env, tmp_path: Path) -> None:
    tsv = write_mmbench(tmp_path / "mmbench_tiny.tsv")
    results = tmp_path / "out" / "results.jsonl"
    args = _cli_args(tsv, results, small_files, large_files)
    proc = run_cli([*args, "--json"], isolated_env)
    assert proc.returncode == 0, proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["configs"] == ["large", "duo/verify/steps"]
    assert (data["n_items"], data["n_bad"], data["n_run"], data["n_errors"]) == (4, 1, 8, 2)
    assert [s["n"] for s in data["summaries"]] == [4, 4]
    assert len(results.read_text().splitlines()) == 8

    proc = run_cli(args, isolated_env)  # the file exists and --resume was not given
    assert proc.returncode == 2
    assert "already exists" in proc.stderr.decode() and "--resume" in proc.stderr.decode()

    proc = run_cli([*args, "--resume", "--limit", "2"], isolated_env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert "0 run, 4 already done" in err and "duo/verify/steps" in err and "Accuracy" in err
    assert "1 bad item(s) skipped" in err
