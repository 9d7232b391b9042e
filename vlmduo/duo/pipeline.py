"""The ask pipeline: modes small, large, large-think and duo.

In ``duo`` the small agent reasons while the large agent answers short, both at
once; a policy then decides whether the large answer stands or the key part of
the small agent's reasoning is transferred into the large agent's response.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vlmduo.agents.base import AgentLike, AgentResult, Progress, Question, Sampling, ShortAnswer
from vlmduo.answers import formats
from vlmduo.answers.agree import answers_agree
from vlmduo.duo import selection, workers
from vlmduo.engine import threads
from vlmduo.errors import Cancelled, UsageError

if TYPE_CHECKING:
    from vlmduo.media.images import LoadedImage

T = TypeVar("T")
MODES = ("duo", "small", "large", "large-think")
# Room kept for the chat template, instructions and the question when the image
# cap is derived from the context; a longer question still gets the context error.
PROMPT_ALLOWANCE = 256
IMAGE_TOKENS_FLOOR = 64
POLICIES = ("verify", "confidence", "always")
# Reasoning tokens by default. Qwen, on its thinking budget: "We recommend ... setting it
# higher than 1024 for meaningful improvements across tasks" (QwenLM/Qwen3 docs,
# quickstart.md, "Thinking Budget"); the model cards ask for up to 40960. A thought the
# budget cuts ends with Qwen3's own hand-off and is reported (reasoning_truncated).
DEFAULT_THINK_BUDGET = 1024


@dataclass(frozen=True)
class AskOptions:
    """Everything ``vlmduo ask`` lets a user choose about one question."""

    mode: str = "duo"
    policy: str = "verify"
    fmt: str = "auto"
    max_answer_tokens: int = 16
    think_budget: int = DEFAULT_THINK_BUDGET
    transfer_budget: int = 64
    selector: str = "steps"
    sequential: bool = False
    seed: int = 0
    temperature: float | None = None  # None: each model card's, for reasoning
    confidence_threshold: float = 0.8
    # Reuse (and keep) each agent's image prefix: the state up to and including the
    # image, so a second question about an image costs only its own tokens.
    image_cache: bool = True

    def image_token_budget(self, n_ctx: int) -> int:
        """The most tokens an image may take so that either agent's prompt, image and
        budgets fit ``n_ctx`` (libmtmd downsizes larger images to this)."""
        small_needs = self.think_budget + self.max_answer_tokens + 16
        large_needs = self.transfer_budget + 8 + self.max_answer_tokens + 16
        return max(IMAGE_TOKENS_FLOOR, n_ctx - PROMPT_ALLOWANCE - max(small_needs, large_needs))

    def validate(self) -> None:
        """Reject impossible settings before any model work."""
        checks = [
            (self.mode in MODES, f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}"),
            (self.policy in POLICIES, f"unknown policy {self.policy!r}: choose from {', '.join(POLICIES)}"),
            (
                self.fmt == "auto" or self.fmt in formats.FORMATS,
                f"unknown format {self.fmt!r}: choose from auto, {', '.join(formats.FORMATS)}",
            ),
            (
                self.selector in selection.SELECTORS,
                f"unknown selector {self.selector!r}: choose from {', '.join(selection.SELECTORS)}",
            ),
            (self.max_answer_tokens >= 1, "--max-answer-tokens must be at least 1"),
            (self.think_budget >= 0, "--think-budget must not be negative"),
            (self.transfer_budget >= 0, "--transfer-budget must not be negative"),
            (0.0 <= self.confidence_threshold <= 1.0, "the confidence threshold must be in [0, 1]"),
            (self.temperature is None or self.temperature >= 0.0, "--temperature must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass
class AskResult:
    """One answered question: the ``--json`` object of DESIGN.md."""

    answer: str | None
    mode: str
    policy: str | None
    route: str | None
    format: str
    small: AgentResult | None
    large: AgentResult | None
    transferred: dict[str, Any] | None
    timings_ms: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The exact JSON contract (keys may be added, never renamed)."""
        return {
            "answer": self.answer if self.answer is not None else "",
            "mode": self.mode,
            "policy": self.policy,
            "route": self.route,
            "format": self.format,
            "small": self.small.to_json() if self.small else None,
            "large": self.large.to_json() if self.large else None,
            "transferred": self.transferred,
            "timings_ms": dict(self.timings_ms),
        }


def make_question(text: str, image: LoadedImage | None, fmt: str) -> Question:
    """Resolve ``auto`` and parse options once, for both agents. The models are sent the
    question without a harness's answer-style instructions (vlmduo's own replace them)."""
    if not text.strip():
        raise UsageError("the question is empty")
    parsed = formats.parse_question(text)
    resolved = formats.resolve_format(fmt, parsed)
    return Question(text=parsed.text, image=image, fmt=resolved, options=parsed.options)


def ask(
    question: Question,
    options: AskOptions,
    *,
    small: AgentLike | None = None,
    large: AgentLike | None = None,
    load_ms: dict[str, float] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> AskResult:
    """Answer ``question`` in ``options.mode`` with the agents it needs.

    The agents run on worker threads; this thread waits. Setting ``cancel``
    (or Ctrl-C here, or a failure of either agent) stops every agent at its
    next token, prefill batch or graph node, and the first error is raised.
    """
    options.validate()
    load_ms = load_ms or {}
    cancel = cancel or threading.Event()
    sampling = Sampling(options.temperature, options.seed, options.max_answer_tokens)
    start = time.perf_counter()
    if options.mode == "duo":
        if small is None or large is None:
            raise UsageError("duo mode needs both a small and a large model")
        return _Duo(question, options, small, large, sampling, load_ms, progress, cancel).run()
    agent = small if options.mode == "small" else large
    if agent is None:
        raise UsageError(
            f"{options.mode} mode needs the {'small' if options.mode == 'small' else 'large'} model"
        )
    load = load_ms.get(agent.name, 0.0)
    if options.mode == "large":
        work = workers.spawn(
            agent.answer_short,
            question,
            sampling,
            load_ms=load,
            cancel=cancel,
            progress=progress,
            image_cache=options.image_cache,
        )
        result = _wait(work, cancel).result
    else:
        work = workers.spawn(
            agent.reason,
            question,
            sampling,
            options.think_budget,
            load_ms=load,
            cancel=cancel,
            progress=progress,
            image_cache=options.image_cache,
        )
        result = _wait(work, cancel)
    wall = (time.perf_counter() - start) * 1000.0
    timings = {"total": round(wall + load, 3), "critical_path": round(wall, 3)}
    return AskResult(
        answer=result.answer,
        mode=options.mode,
        policy=None,
        route=None,
        format=question.fmt,
        small=result if options.mode == "small" else None,
        large=None if options.mode == "small" else result,
        transferred=None,
        timings_ms=timings,
    )


def _wait(work: Future[T], cancel: threading.Event) -> T:
    """The worker's result; on Ctrl-C or an error, cancel it first."""
    try:
        return work.result()
    except BaseException as exc:
        cancel.set()
        workers.settle([work], timeout=0.5 if isinstance(exc, KeyboardInterrupt) else None)
        raise


@dataclass
class _Duo:
    """One duo ask: both agents, the policy, and the transfer when it is needed."""

    question: Question
    options: AskOptions
    small: AgentLike
    large: AgentLike
    sampling: Sampling
    load_ms: dict[str, float]
    progress: Progress | None
    cancel: threading.Event
    # Set by a confident large answer: cancels the small agent only.
    confident: threading.Event = field(default_factory=threading.Event)

    @property
    def sequential(self) -> bool:
        """Whether stage 1 runs one agent after the other: when asked, or when the two
        agents would share one core (time slices of one core cannot make both faster).
        With two cores or more the agents split them and overlap, which measured as fast
        or faster than one after the other (benchmarks/busy_machine.py); an agent on a
        server uses none."""
        remote = any(getattr(agent, "is_remote", False) for agent in (self.small, self.large))
        return self.options.sequential or (not remote and threads.available_cores() < 2)

    def run(self) -> AskResult:
        start = time.perf_counter()
        # Stage 1 runs on one lane (sequential) or two; the transfer goes on the lane that
        # finished last, whose OpenMP team is the one still awake.
        with contextlib.ExitStack() as lanes:
            large_lane = lanes.enter_context(workers.Lane("vlmduo-large"))
            small_lane = large_lane if self.sequential else lanes.enter_context(workers.Lane("vlmduo-small"))
            with contextlib.ExitStack() as scoped:
                pairs = ((self.small, self.large), (self.large, self.small))
                for agent, other in pairs:  # restored on leaving, also after an error
                    # A local agent beside a remote one has the cores to itself.
                    alone = self.sequential or getattr(other, "is_remote", False)
                    scoped.enter_context(agent.stage1_threads(alone))
                short, small_result, last_lane = self._stage1(large_lane, small_lane)
            timings = {"stage1": round((time.perf_counter() - start) * 1000.0, 3)}
            route, answer, transferred = self._decide(short, small_result, timings, last_lane)
        wall = (time.perf_counter() - start) * 1000.0
        load = sum(self.load_ms.get(a.name, 0.0) for a in (self.small, self.large))
        timings["total"] = round(wall + load, 3)
        after = sum(timings.get(k, 0.0) for k in ("select", "transfer_prefill", "answer_decode"))
        if transferred and transferred.get("request_ms") is not None:
            # A remote transfer's wall time (network included) stands for its prefill and decode.
            after = timings.get("select", 0.0) + transferred["request_ms"]
        timings["critical_path"] = round(_critical_path(small_result, short.result, route) + after, 3)
        return AskResult(
            answer=answer,
            mode="duo",
            policy=self.options.policy,
            route=route,
            format=self.question.fmt,
            small=small_result,
            large=short.result,
            transferred=transferred,
            timings_ms=timings,
        )

    def _stage1(
        self, large_lane: workers.Lane, small_lane: workers.Lane
    ) -> tuple[ShortAnswer, AgentResult, workers.Lane]:
        """Both agents' first answers, and the lane that finished last. The first failure
        (or Ctrl-C) cancels the other agent and is raised once both have stopped; a
        confident large answer cancels the small agent (sequential: never starts it)."""
        futures: list[Future[Any]] = []
        try:
            # Sequential runs the large agent first: the confidence policy can then
            # skip the small one entirely, as it would cancel it when concurrent.
            large_future = large_lane.submit(self._run_large)
            futures.append(large_future)
            if self.sequential:
                workers.first_error(futures)
                if _confident(self.options, large_future.result()):
                    self.confident.set()
            small_future = small_lane.submit(self._run_small)
            futures.append(small_future)
            workers.first_error(futures, until=[large_future, small_future])
            if not self.sequential and not large_future.done():
                # The small agent is through stage 1 first (a heavy image, a short
                # thought): the large one goes on with all the cores, and the
                # transfer after it on its lane.
                self.large.solo()
                last_lane = large_lane
            else:
                last_lane = small_lane
            workers.first_error(futures, until=large_future)
            short = large_future.result()
            if _confident(self.options, short):
                self.confident.set()
            elif not self.sequential and not small_future.done():
                # The large agent's short answer is in and its cores are idle:
                # the small agent reasons on with all of them.
                self.small.solo()
            workers.first_error(futures)
            return short, small_future.result(), last_lane
        except BaseException as exc:
            self.cancel.set()
            # Both agents stop at their next token, batch or graph node; after
            # Ctrl-C wait only briefly: an image encode cannot be interrupted.
            workers.settle(futures, timeout=0.5 if isinstance(exc, KeyboardInterrupt) else None)
            raise

    def _run_small(self) -> AgentResult:
        load = self.load_ms.get(self.small.name, 0.0)
        try:
            if self.confident.is_set():
                raise Cancelled(f"{self.small.name}: not needed")
            return self.small.reason(
                self.question,
                self.sampling,
                self.options.think_budget,
                load_ms=load,
                cancel=workers.AnyOf(self.cancel, self.confident),
                progress=self.progress,
                reasoning_logprobs=self.options.selector == "surprisal",
                image_cache=self.options.image_cache,
            )
        except Cancelled:
            if self.cancel.is_set() or not self.confident.is_set():
                raise
            return _skipped(self.small.name, load)

    def _run_large(self) -> ShortAnswer:
        return self.large.answer_short(
            self.question,
            self.sampling,
            reserve=self.options.transfer_budget + 8,
            load_ms=self.load_ms.get(self.large.name, 0.0),
            cancel=self.cancel,
            progress=self.progress,
            image_cache=self.options.image_cache,
        )

    def _decide(
        self, short: ShortAnswer, small_result: AgentResult, timings: dict[str, float], lane: workers.Lane
    ) -> tuple[str, str | None, dict[str, Any] | None]:
        """The route, the final answer and what was transferred (None unless transferred)."""
        large_answer = short.result.answer
        if _confident(self.options, short):
            return "confident", large_answer, None
        agree = answers_agree(
            small_result.answer, large_answer, self.question.fmt, self.question.options or None
        )
        if self.options.policy != "always" and agree:
            return "agree", large_answer, None
        return "transfer", *self._transfer(short, small_result, timings, lane)

    def _transfer(
        self, short: ShortAnswer, small_result: AgentResult, timings: dict[str, float], lane: workers.Lane
    ) -> tuple[str | None, dict[str, Any]]:
        t0 = time.perf_counter()
        chosen = selection.select_key_reasoning(
            small_result.reasoning_pieces,
            small_result.reasoning_logprobs or None,
            self.question.text,
            self.options.selector,
            self.options.transfer_budget,
            count_tokens=self.large.count_tokens,
            truncated=bool(small_result.reasoning_truncated),
        )
        timings["select"] = round((time.perf_counter() - t0) * 1000.0, 3)
        work = lane.submit(
            self.large.transfer, short, self.question, chosen.text, self.sampling, progress=self.progress
        )
        done = _wait(work, self.cancel)
        timings["transfer_prefill"] = round(done.prefill_ms, 3)
        timings["answer_decode"] = round(done.decode_ms, 3)
        # tokens: the transferred text in the large model's tokens (<= budget);
        # prefill_tokens adds the closing cue, i.e. all the large model prefilled.
        return done.answer, {
            "selector": chosen.selector,
            "tokens": chosen.tokens,
            "text": chosen.text,
            "prefill_tokens": done.prefill_tokens,
            # the large model's answer after the transfer (its stage-1 answer is in "large")
            "answer_tokens": done.answer_tokens,
            "answer_probability": done.probability,
            **done.details,
        }


def _skipped(name: str, load: float) -> AgentResult:
    """The small agent's result when a confident large answer made it unnecessary."""
    return AgentResult(
        model=name,
        answer=None,
        reasoning=None,
        tokens={"prompt": 0, "image": 0, "generated": 0},
        timings_ms={"load": load},
        cancelled=True,
    )


def _chain_ms(result: AgentResult) -> float:
    t = result.timings_ms
    if "request" in t:  # a remote agent: its requests' wall time holds the server's stages
        return t.get("image", 0.0) + t["request"]
    return sum(t.get(stage, 0.0) for stage in ("image", "encode", "prefill", "decode"))


def _critical_path(small: AgentResult, large: AgentResult, route: str) -> float:
    """Stage-1 time with perfect overlap: the longer agent's chain (the large one's
    alone when it answered confidently and the small one was cancelled)."""
    if route == "confident":
        return _chain_ms(large)
    return max(_chain_ms(small), _chain_ms(large))


def _confident(options: AskOptions, short: ShortAnswer) -> bool:
    prob = short.result.answer_probability
    return options.policy == "confidence" and prob is not None and prob >= options.confidence_threshold
