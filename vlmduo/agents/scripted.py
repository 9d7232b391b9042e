"""A scripted agent, for tests of the pipeline without a model.

Like ``llm``'s ``MockModel``: queue what the agent should do, then ask. Routes,
answer probabilities, slow stages and failures are forced deterministically;
the real engine is tested on its own (tests/test_engine.py, test_families.py).

    small = ScriptedAgent("small").enqueue(answer="A", reasoning="one two three")
    large = ScriptedAgent("large").enqueue(answer="B", probability=0.4, transfer_answer="A")
    result = pipeline.ask(question, AskOptions(), small=small, large=large)
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vlmduo.agents.base import AgentResult, Question, Sampling, ShortAnswer, Transfer
from vlmduo.errors import Cancelled

# Seconds between two scripted "tokens": how often a slow stage checks for cancel.
TICK_S = 0.005


@dataclass
class Script:
    """One ask's behaviour. ``delays`` and ``errors`` are keyed by stage:
    ``reason``, ``answer`` (the short answer) and ``transfer``."""

    answer: str | None = "A"
    probability: float | None = 0.5
    reasoning: str = "The image shows a cat. So the answer is A."
    transfer_answer: str | None = None  # default: ``answer``
    delays: dict[str, float] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)


class ScriptedAgent:
    """An ``AgentLike`` that plays queued ``Script``s, one per ask (the last repeats).

    ``calls`` records the stages it ran; ``cancelled`` the stages that saw a cancel.
    """

    def __init__(self, name: str, *, thinking: bool = False) -> None:
        self.name = name
        self.thinking = thinking
        self.scripts: deque[Script] = deque()
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.threads_entered = 0
        self._current: Script | None = None

    def enqueue(self, **script: Any) -> ScriptedAgent:
        """Add one ask's script (``Script``'s fields as keywords); returns self to chain."""
        self.scripts.append(Script(**script))
        return self

    # -- AgentLike ------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """One token a word."""
        return len(text.split())

    @contextlib.contextmanager
    def stage1_threads(self, sequential: bool) -> Any:
        """Counts entries, so tests can see the pipeline restore what it changed."""
        self.threads_entered += 1
        try:
            yield
        finally:
            self.threads_entered -= 1

    def solo(self) -> None:
        """Recorded, so tests can see when the pipeline handed this agent every core."""
        self.calls.append("solo")

    def reason(self, question: Question, sampling: Sampling, think_budget: int, **kwargs: Any) -> AgentResult:
        """Stream the script's reasoning, a word a tick, then answer."""
        script = self._next()
        words = script.reasoning.split()[:think_budget]
        pieces = [(" " if i else "") + w for i, w in enumerate(words)]
        done = self._run("reason", script, kwargs.get("cancel"), ticks=len(pieces))
        if done < len(pieces):  # cancelled mid-reasoning: partial, as the engine reports it
            result = self._result(None, "".join(pieces[:done]), done, kwargs)
            result.cancelled = True
            return result
        result = self._result(script.answer, "".join(pieces), len(pieces), kwargs)
        result.answer_probability = script.probability
        result.reasoning_truncated = len(script.reasoning.split()) > think_budget
        result.reasoning_pieces = pieces
        result.reasoning_logprobs = [-1.0] * len(pieces)
        return result

    def answer_short(self, question: Question, sampling: Sampling, **kwargs: Any) -> ShortAnswer:
        """The script's short answer and probability."""
        script = self._next()
        self._run("answer", script, kwargs.get("cancel"), ticks=0)
        result = self._result(script.answer, None, 1, kwargs)
        result.answer_probability = script.probability
        return ShortAnswer(result=result)

    def transfer(
        self, short: ShortAnswer, question: Question, text: str, sampling: Sampling, **kwargs: Any
    ) -> Transfer:
        """The script's answer after a transfer."""
        script = self._current or Script()
        self._run("transfer", script, kwargs.get("cancel"), ticks=0)
        answer = script.transfer_answer if script.transfer_answer is not None else script.answer
        return Transfer(answer, 0.1, 0.1, self.count_tokens(text) + 1, 1, script.probability)

    # -- scripting ------------------------------------------------------------
    def _next(self) -> Script:
        if self.scripts:
            self._current = self.scripts.popleft()
        if self._current is None:
            raise RuntimeError(f"scripted agent {self.name!r} has no script queued")
        return self._current

    def _run(self, stage: str, script: Script, cancel: Any, ticks: int) -> int:
        """Play a stage: its delay (checking cancel each tick), its error; returns the
        ticks done before a cancel (all when none)."""
        self.calls.append(stage)
        delay = script.delays.get(stage, 0.0)
        n_ticks = max(ticks, int(delay / TICK_S))
        per_tick = delay / n_ticks if n_ticks else 0.0
        for i in range(n_ticks):
            if cancel is not None and cancel.is_set():
                self.cancelled.append(stage)
                if stage != "reason":
                    raise Cancelled(f"{self.name}: cancelled")
                return min(i, ticks)
            time.sleep(per_tick)
        if stage in script.errors:
            raise script.errors[stage]
        return ticks

    def _result(self, answer: str | None, reasoning: str | None, generated: int, kwargs: Any) -> AgentResult:
        return AgentResult(
            model=self.name,
            answer=answer,
            reasoning=reasoning,
            tokens={"prompt": 10, "image": 0, "generated": generated, "cached": 0},
            timings_ms={"load": kwargs.get("load_ms", 0.0), "decode": 1.0},
        )
