"""Run ``vlmduo eval``: configurations over dataset items, one record per (config, item).

Models are loaded once by the caller and passed in. Each answered item is appended
to a :class:`~vlmduo.study.evaluation.ResultsLog` at once, so an interrupted run loses at
most the item in flight and ``resume`` continues after the last one written. An
item whose image does not decode, or whose run fails in the engine, becomes an
error record (counted as wrong) and the run goes on. With remote agents (models on
servers) ``concurrency`` items are sent at a time, so throughput grows with the server.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from vlmduo.agents.base import AgentLike, Question
from vlmduo.duo import workers
from vlmduo.duo.pipeline import POLICIES, AskOptions, AskResult, ask
from vlmduo.duo.selection import SELECTORS
from vlmduo.errors import ImageError, UsageError, VlmduoError
from vlmduo.media.images import LoadedImage, load_image
from vlmduo.study.datasets import BadItem, Dataset, EvalItem, build_question, rotations
from vlmduo.study.evaluation import (
    MODES,
    ConfigSummary,
    EvalRecord,
    ResultsLog,
    answer_format,
    config_key,
    is_correct,
    summarize,
)


@dataclass(frozen=True)
class EvalConfig:
    """One configuration to evaluate: a mode, and for duo a policy and a selector."""

    mode: str
    policy: str | None = None
    selector: str | None = None

    @property
    def key(self) -> str:
        """The configuration key of the results log (``duo/verify/steps``, ``small``...)."""
        return config_key(self.mode, self.policy, self.selector)

    @property
    def roles(self) -> tuple[str, ...]:
        """The agents this configuration needs."""
        return {"duo": ("small", "large"), "small": ("small",)}.get(self.mode, ("large",))


def expand_configs(
    modes: Sequence[str], policies: Sequence[str], selectors: Sequence[str]
) -> list[EvalConfig]:
    """Every mode, with duo expanded over each policy and selector; unknown names are usage errors."""
    for names, known, what in (
        (modes, MODES, "mode"),
        (policies, POLICIES, "policy"),
        (selectors, SELECTORS, "selector"),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"unknown {what} {unknown[0]!r}: choose from {', '.join(known)}")
    if not modes:
        raise UsageError("give at least one mode")
    if "duo" in modes and not (policies and selectors):
        raise UsageError("the duo mode needs at least one policy and one selector")
    configs: list[EvalConfig] = []
    for mode in dict.fromkeys(modes):
        if mode == "duo":
            configs += [
                EvalConfig("duo", p, s) for p in dict.fromkeys(policies) for s in dict.fromkeys(selectors)
            ]
        else:
            configs.append(EvalConfig(mode))
    return configs


def required_roles(configs: Sequence[EvalConfig]) -> list[str]:
    """The agents (small, large) the configurations need, to load nothing more."""
    needed = {role for c in configs for role in c.roles}
    return [role for role in ("small", "large") if role in needed]


@dataclass
class EvalProgress:
    """Where a run stands, for a progress bar with running accuracy."""

    done: int
    total: int
    config: str
    item_id: str
    correct: dict[str, int] = field(default_factory=dict)  # per config key, this run
    answered: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def accuracy(self) -> float | None:
        """Running accuracy over every item answered in this run, all configurations."""
        n = sum(self.answered.values())
        return sum(self.correct.values()) / n if n else None


@dataclass
class EvalOutcome:
    """What a run did and the summary of every record of its configurations and items."""

    dataset: str
    results_path: str
    configs: list[str]
    n_items: int
    bad_items: list[BadItem]
    n_run: int
    n_skipped: int
    n_errors: int
    interrupted: bool
    summaries: list[ConfigSummary]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``vlmduo eval``."""
        data = dataclasses.asdict(self)
        data["n_bad"] = len(self.bad_items)
        return data


def run_eval(
    dataset: Dataset,
    configs: Sequence[EvalConfig],
    log: ResultsLog,
    *,
    small: AgentLike | None,
    large: AgentLike | None,
    options: AskOptions | None = None,
    resume: bool = False,
    progress: Callable[[EvalProgress], None] | None = None,
    concurrency: int = 1,
    circular: bool = False,
) -> EvalOutcome:
    """Answer every item in every configuration, appending one record per pair to ``log``.

    ``options`` supplies budgets, seed and temperature; mode, policy, selector and
    format come from each configuration and item. With ``resume`` the pairs already
    in the log (failed ones excepted) are skipped. KeyboardInterrupt ends the run
    early and is reported as ``interrupted``. ``concurrency`` above 1 (remote agents
    only: a local model answers one question at a time) keeps that many in flight.
    ``circular`` asks each multiple-choice item once per rotation of its options
    (MMBench's CircularEval), one after the other: the image's prefix is reused, so a
    pass costs only its question's tokens.
    """
    agents = {"small": small, "large": large}
    missing = [role for role in required_roles(configs) if agents[role] is None]
    if missing:
        raise UsageError(f"these modes need the {missing[0]} model")
    _check_concurrency(concurrency, [agents[role] for role in required_roles(configs)])
    base = options or AskOptions()
    done = log.done_keys(include_errors=False) if resume else set()
    passes = {item.id: rotations(item) if circular else [item] for item in dataset.items}
    state = EvalProgress(0, len(configs) * sum(len(p) for p in passes.values()), "", "")
    skipped = [0]
    n_run = 0
    interrupted = False
    in_flight: set[threading.Event] = set()  # one cancel per ask: a failed item stops only itself

    def record(job: _Job) -> EvalRecord:
        cancel = threading.Event()
        in_flight.add(cancel)
        try:
            return _evaluate(*job, base, small, large, cancel)
        finally:
            in_flight.discard(cancel)

    def keep(job: _Job, result: EvalRecord) -> None:
        nonlocal n_run
        log.append(result)
        n_run += 1
        _advance(state, job[3].key, job[0].id, result)
        if progress is not None:
            progress(state)

    try:
        jobs = _jobs(dataset, passes, configs, done, state, skipped)
        if concurrency == 1:
            for job in jobs:
                keep(job, record(job))
        else:
            _run_concurrently(jobs, record, keep, concurrency)
    except KeyboardInterrupt:
        for cancel in list(in_flight):
            cancel.set()
        interrupted = True
    return EvalOutcome(
        dataset=dataset.name,
        results_path=str(log.path),
        configs=[c.key for c in configs],
        n_items=len(dataset.items),
        bad_items=list(dataset.bad),
        n_run=n_run,
        n_skipped=skipped[0],
        n_errors=state.errors,
        interrupted=interrupted,
        summaries=summarize_log(log, configs, [p for item in dataset.items for p in passes[item.id]]),
    )


# (the item or pass to ask, its image, the image's error, the config, and for a
# CircularEval pass the record's fields that say which: circular_of, rotation, rotations)
_Job = tuple[EvalItem, LoadedImage | None, str | None, EvalConfig, dict[str, Any]]


def _check_concurrency(concurrency: int, agents: Sequence[AgentLike | None]) -> None:
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    local = [a.name for a in agents if a is not None and not getattr(a, "is_remote", False)]
    if concurrency > 1 and local:
        raise UsageError(
            f"--concurrency {concurrency} needs remote agents: {local[0]} runs in this process",
            hint="serve it (vLLM, SGLang, llama-server) and pass --small/--large URL#MODEL",
        )


def _jobs(
    dataset: Dataset,
    passes: dict[str, list[EvalItem]],
    configs: Sequence[EvalConfig],
    done: set,
    state: EvalProgress,
    skipped: list[int],
) -> Iterator[_Job]:
    """A job for every (pass, config) still to run; each image decoded once, and the
    questions about one image asked one after the other (its prefix stays cached)."""
    for item in dataset.items:
        mine = passes[item.id]
        todo = [(k, c) for c in configs for k, p in enumerate(mine) if (c.key, p.id) not in done]
        n = len(configs) * len(mine)
        skipped[0] += n - len(todo)
        state.done += n - len(todo)
        image, image_error = _item_image(item) if todo else (None, None)
        for k, config in todo:
            circular = {"circular_of": item.id, "rotation": k, "rotations": len(mine)}
            yield mine[k], image, image_error, config, circular if len(mine) > 1 else {}


def _run_concurrently(
    jobs: Iterator[_Job],
    record: Callable[[_Job], EvalRecord],
    keep: Callable[[_Job, EvalRecord], None],
    concurrency: int,
) -> None:
    """Keep ``concurrency`` jobs in flight on worker threads; records are kept as they finish."""
    pending: dict[Future[EvalRecord], _Job] = {}
    exhausted = False
    while True:
        while not exhausted and len(pending) < concurrency:
            job = next(jobs, None)
            if job is None:
                exhausted = True
            else:
                pending[workers.spawn(record, job, name="vlmduo-eval")] = job
        if not pending:
            return
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in finished:
            keep(pending.pop(future), future.result())


def summarize_log(
    log: ResultsLog, configs: Sequence[EvalConfig], items: Sequence[EvalItem]
) -> list[ConfigSummary]:
    """Summaries of the log's records for these configurations and items, in config order.

    Records of other configurations or items (an earlier run with a larger
    ``--limit``) share the file but are left out.
    """
    keys = [c.key for c in configs]
    ids = {item.id for item in items}
    wanted = (r for r in log.records() if r["config"] in keys and r["item_id"] in ids)
    by_key = {s.config: s for s in summarize(wanted)}
    return [by_key[k] for k in keys if k in by_key]


def _advance(state: EvalProgress, key: str, item_id: str, record: EvalRecord) -> None:
    state.done += 1
    state.config, state.item_id = key, item_id
    if "error" in record:
        state.errors += 1
    state.answered[key] = state.answered.get(key, 0) + 1
    state.correct[key] = state.correct.get(key, 0) + int(bool(record.get("correct")))


def _item_image(item: EvalItem) -> tuple[LoadedImage | None, str | None]:
    """Decode the item's image once for all configurations; a failure becomes a message."""
    try:
        if item.image_bytes is not None:
            return load_image("-", stdin=io.BytesIO(item.image_bytes)), None
        assert item.image_path is not None  # datasets sets exactly one of the two
        return load_image(item.image_path), None
    except ImageError as exc:
        # Embedded bytes go through the loader's stdin path; name the source properly.
        message = exc.message
        if item.image_bytes is not None:
            message = message.replace("stdin", "the embedded image")
        return None, message


def _evaluate(
    item: EvalItem,
    image: LoadedImage | None,
    image_error: str | None,
    config: EvalConfig,
    circular: dict[str, Any],
    base: AskOptions,
    small: AgentLike | None,
    large: AgentLike | None,
    cancel: threading.Event | None = None,
) -> EvalRecord:
    """One (configuration, item) record; any failure is recorded, never raised."""
    record: EvalRecord = {"item_id": item.id, "config": config.key, "category": item.category}
    record.update(circular)  # type: ignore[typeddict-item]
    if image_error is not None:
        return {**record, "prediction": None, "correct": False, "error": image_error}
    fmt = answer_format(item)
    options = dataclasses.replace(
        base,
        mode=config.mode,
        policy=config.policy or base.policy,
        selector=config.selector or base.selector,
        fmt=fmt,
    )
    question = Question(text=build_question(item), image=image, fmt=fmt, options=dict(item.options))
    try:
        result = ask(question, options, small=small, large=large, cancel=cancel)
    except VlmduoError as exc:
        return {**record, "prediction": None, "correct": False, "error": exc.message}
    except Exception as exc:  # noqa: BLE001 - one broken item must not end a long run
        return {
            **record,
            "prediction": None,
            "correct": False,
            "error": f"unexpected {type(exc).__name__}: {exc}",
        }
    return {**record, **_result_fields(result, item)}


def _result_fields(result: AskResult, item: EvalItem) -> dict[str, Any]:
    transferred = result.transferred or {}
    return {
        "prediction": result.answer,
        "correct": is_correct(result.answer, item),
        "answer": item.answer,
        "format": result.format,
        "total_ms": result.timings_ms.get("total"),
        "critical_path_ms": result.timings_ms.get("critical_path"),
        "small_tokens": result.small.tokens["generated"] if result.small else None,
        "large_tokens": result.large.tokens["generated"] if result.large else None,
        "route": result.route,
        "transferred_tokens": transferred.get("tokens") if result.transferred else None,
    }
