"""Scoring, the results log and summaries of ``vlmduo eval`` (pure logic, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmduo.study.datasets import EvalItem
from vlmduo.study.evaluation import (
    ResultsLog,
    Score,
    TokenStats,
    answer_format,
    config_key,
    is_correct,
    summarize,
)


def item(answer: str, options: dict[str, str] | None = None, category: str | None = None) -> EvalItem:
    return EvalItem("1", "q", options or {}, answer, category, None, "https://x/a.png", None)


OPTIONS = {"A": "a red car", "B": "two dogs", "C": "Paris", "D": "1,000"}


@pytest.mark.parametrize(
    ("mode", "policy", "selector", "key"),
    [
        ("duo", "verify", "steps", "duo/verify/steps"),
        ("duo", "confidence", "tail", "duo/confidence/tail"),
        ("small", None, None, "small"),
        ("large", "verify", "steps", "large"),
        ("large-think", None, None, "large-think"),
    ],
)
def test_config_key(mode: str, policy: str | None, selector: str | None, key: str) -> None:
    assert config_key(mode, policy, selector) == key


@pytest.mark.parametrize(("mode", "policy"), [("medium", "verify"), ("duo", None)])
def test_config_key_rejects(mode: str, policy: str | None) -> None:
    with pytest.raises(ValueError):
        config_key(mode, policy, "steps")


@pytest.mark.parametrize(
    ("prediction", "answer", "options", "expected"),
    [
        # multiple choice: letters, in any dress, or the option's text
        ("B", "B", OPTIONS, True),
        ("b", "B", OPTIONS, True),
        ("(B)", "B", OPTIONS, True),
        ("B. two dogs", "B", OPTIONS, True),
        ("Two dogs.", "B", OPTIONS, True),
        ("paris", "C", OPTIONS, True),
        ("A red car", "A", OPTIONS, True),
        ("A", "B", OPTIONS, False),
        ("E", "B", OPTIONS, False),
        ("a blue car", "A", OPTIONS, False),
        # numbers, with tolerance and thousands separators
        ("1234", "1,234", None, True),
        ("1,234", "1234", None, True),
        ("3.0", "3", None, True),
        ("3.0000001", "3", None, True),
        ("3.001", "3", None, False),
        ("0", "0", None, True),
        ("three", "3", None, True),
        ("4", "3", None, False),
        # yes / no
        ("Yes.", "yes", None, True),
        ("no", "Yes", None, False),
        # text: case, punctuation and articles do not matter; the words do
        ("The Eiffel Tower!", "eiffel tower", None, True),
        ("an apple", "Apple", None, True),
        ("apples", "apple", None, False),
        ("3 cats", "3 cats", None, True),
        # nothing predicted is never right
        (None, "A", OPTIONS, False),
        ("", "yes", None, False),
        ("   ", "cat", None, False),
    ],
)
def test_is_correct(
    prediction: str | None, answer: str, options: dict[str, str] | None, expected: bool
) -> None:
    assert is_correct(prediction, item(answer, options)) is expected


@pytest.mark.parametrize(
    ("answer", "options", "fmt"),
    [
        ("A", OPTIONS, "choice"),
        ("Yes", None, "yesno"),
        ("1,234", None, "number"),
        ("-2.5", None, "number"),
        ("seven", None, "number"),
        ("3 cats", None, "short"),
        ("3:00", None, "short"),
        ("red", None, "short"),
    ],
)
def test_answer_format(answer: str, options: dict[str, str] | None, fmt: str) -> None:
    assert answer_format(item(answer, options)) == fmt


# An MMBench-style fixture: 10 items, known predictions, 7 correct.
# (answer, category, prediction): color 3/4, size 2/3, count 2/3.
FIXTURE = [
    ("A", "color", "A"),
    ("B", "color", "two dogs"),
    ("C", "color", "(C)"),
    ("D", "color", "A"),
    ("A", "size", "a red car"),
    ("B", "size", "B."),
    ("C", "size", None),
    ("D", "count", "1,000"),
    ("A", "count", "A"),
    ("B", "count", "C"),
]


def fixture_records(config: str = "large") -> list[dict[str, object]]:
    records = []
    for number, (answer, category, prediction) in enumerate(FIXTURE):
        it = EvalItem(str(number), "q", OPTIONS, answer, category, None, None, b"")
        records.append(
            {
                "item_id": it.id,
                "config": config,
                "prediction": prediction,
                "correct": is_correct(prediction, it),
                "category": category,
                "total_ms": 100.0 * (number + 1),
                "small_tokens": None,
                "large_tokens": number + 1,
                "route": None,
                "transferred_tokens": None,
            }
        )
    return records


def test_fixture_scores_exactly() -> None:
    [summary] = summarize(fixture_records())
    assert (summary.config, summary.n, summary.n_correct) == ("large", 10, 7)
    assert summary.accuracy == pytest.approx(0.7)
    assert summary.categories == {
        "color": Score(n=4, n_correct=3, accuracy=0.75),
        "count": Score(n=3, n_correct=2, accuracy=pytest.approx(2 / 3)),
        "size": Score(n=3, n_correct=2, accuracy=pytest.approx(2 / 3)),
    }
    assert summary.small_tokens is None
    assert summary.large_tokens == TokenStats(n=10, mean=5.5, median=5.5)
    # numpy's linear interpolation over 100, 200, ..., 1000 ms
    assert summary.latency_p50_ms == pytest.approx(550.0)
    assert summary.latency_p90_ms == pytest.approx(910.0)
    assert summary.routes == {}
    assert summary.mean_transferred_tokens is None
    assert summary.n_errors == 0
    json.dumps(summary.to_dict())  # JSON-ready


def duo_record(item_id: str, route: str | None, **extra: object) -> dict[str, object]:
    record: dict[str, object] = {
        "item_id": item_id,
        "config": "duo/verify/steps",
        "prediction": "A",
        "correct": True,
        "category": "c",
        "total_ms": 10.0,
        "small_tokens": 100,
        "large_tokens": 2,
        "route": route,
        "transferred_tokens": 0 if route == "agree" else 40,
    }
    record.update(extra)
    return record


def test_duo_routes_tokens_errors_and_retries() -> None:
    records = [
        duo_record("1", "agree", small_tokens=100, total_ms=10.0),
        duo_record("2", "transfer", small_tokens=300, total_ms=30.0, transferred_tokens=40),
        duo_record("3", "transfer", small_tokens=200, total_ms=20.0, transferred_tokens=60),
        duo_record("4", "confident", small_tokens=None, total_ms=5.0, correct=False),
        duo_record("5", None, error="image unreadable", correct=None, total_ms=None),
        # a failed item retried on resume: the later record counts
        duo_record("6", None, error="out of memory", correct=None),
        duo_record("6", "agree", small_tokens=400, total_ms=40.0),
        *fixture_records("small"),
    ]
    duo, small = summarize(records)
    assert (duo.config, small.config) == ("duo/verify/steps", "small")
    assert (duo.n, duo.n_correct, duo.n_errors) == (6, 4, 1)
    assert duo.accuracy == pytest.approx(4 / 6)
    assert duo.categories == {"c": Score(n=6, n_correct=4, accuracy=pytest.approx(4 / 6))}
    assert duo.routes == {"agree": 2, "confident": 1, "transfer": 2}
    assert duo.mean_transferred_tokens == pytest.approx(50.0)
    assert duo.small_tokens == TokenStats(n=4, mean=250.0, median=250.0)
    assert duo.large_tokens == TokenStats(n=5, mean=2.0, median=2.0)
    assert duo.latency_p50_ms == pytest.approx(20.0)  # of 5, 10, 20, 30, 40
    assert duo.latency_p90_ms == pytest.approx(36.0)
    assert small.n_correct == 7


def test_results_log_appends_and_resumes(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path / "runs" / "results.jsonl")
    assert log.done_keys() == set()
    assert list(log.records()) == []
    log.append({"item_id": "1", "config": "large", "correct": True, "prediction": "Ä"})
    log.append({"item_id": "2", "config": "large", "error": "boom"})
    log.append({"item_id": "1", "config": "duo/verify/steps", "correct": False})
    lines = log.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert log.done_keys() == {("large", "1"), ("large", "2"), ("duo/verify/steps", "1")}
    assert log.done_keys(include_errors=False) == {("large", "1"), ("duo/verify/steps", "1")}
    # a fresh log object (a new run with --resume) sees the same keys
    assert ResultsLog(log.path).done_keys() == log.done_keys()
    with pytest.raises(ValueError):
        log.append({"item_id": "3"})


def test_results_log_survives_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    whole = json.dumps({"item_id": "1", "config": "small", "correct": True})
    cut = json.dumps({"item_id": "2", "config": "small", "correct": False})[:20]
    path.write_text(whole + "\n" + cut, encoding="utf-8")
    log = ResultsLog(path)
    assert log.done_keys() == {("small", "1")}
    # The next append starts a new line instead of gluing onto the fragment.
    log.append({"item_id": "2", "config": "small", "correct": True})
    assert log.done_keys() == {("small", "1"), ("small", "2")}
    assert [s.n for s in summarize(log.records())] == [2]
    assert path.read_text(encoding="utf-8").splitlines()[1] == cut


def test_results_log_skips_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    lines = ["", "[1, 2]", '{"config": "small"}', '{"config": "small", "item_id": 5}', "{nope"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert ResultsLog(path).done_keys() == {("small", "5")}
