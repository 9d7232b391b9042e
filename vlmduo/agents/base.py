"""What the pipeline sees of an agent, and what agents return.

``AgentLike`` is the interface: ``reason``, ``answer_short``, ``transfer``,
``count_tokens``, ``stage1_threads`` and ``solo``. Local (``agents.local``),
remote (``agents.remote``) and scripted (``agents.scripted``) agents implement it;
``Question``, ``Sampling`` and the result types travel between them and the pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vlmduo.answers import grammars
from vlmduo.engine.sampling import GREEDY, SamplerSettings

if TYPE_CHECKING:
    from vlmduo.engine.session import Session
    from vlmduo.media.images import LoadedImage


# Called as progress(agent_name, phase, tokens_so_far) while tokens stream. A progress
# object that also has ``on_text(agent_name, phase, text)`` gets each token's text too
# (the server streams answers and reasoning with it).
Progress = Callable[[str, str, int], None]


class AgentLike(Protocol):
    """What the pipeline needs of an agent (local, scripted, or later remote)."""

    name: str
    thinking: bool

    def count_tokens(self, text: str) -> int: ...

    def stage1_threads(self, sequential: bool) -> contextlib.AbstractContextManager[None]: ...

    def solo(self) -> None: ...

    def reason(
        self, question: Question, sampling: Sampling, think_budget: int, **kwargs: Any
    ) -> AgentResult: ...

    def answer_short(self, question: Question, sampling: Sampling, **kwargs: Any) -> ShortAnswer: ...

    def transfer(
        self, short: ShortAnswer, question: Question, text: str, sampling: Sampling, **kwargs: Any
    ) -> Transfer: ...


@dataclass(frozen=True)
class Question:
    """A question about an image, with its resolved answer format."""

    text: str
    image: LoadedImage | None
    fmt: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def grammar(self) -> str | None:
        """The GBNF grammar that constrains a short answer (None for free text)."""
        return grammars.grammar_for(self.fmt, self.options or None)


@dataclass(frozen=True)
class Sampling:
    """The ask's decoding settings, shared by both agents.

    ``temperature``, when given (``--temperature``), replaces the model cards'
    temperature for reasoning; constrained answers are always greedy.
    """

    temperature: float | None = None
    seed: int = 0
    max_answer_tokens: int = 16


def reasoning_sampler(card: Iterable[tuple[str, float]], sampling: Sampling) -> SamplerSettings:
    """The sampler an agent reasons with: its model card's settings (llama.cpp's defaults
    for what a card leaves out), the user's temperature over them, the ask's seed."""
    values: dict[str, Any] = dict(card)
    if sampling.temperature is not None:
        values["temperature"] = sampling.temperature
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    return SamplerSettings(**values, seed=sampling.seed)


@dataclass
class AgentResult:
    """What one agent produced, with its timings; the JSON shape of DESIGN.md."""

    model: str
    answer: str | None
    reasoning: str | None
    tokens: dict[str, int]
    timings_ms: dict[str, float]
    answer_probability: float | None = None
    cancelled: bool = False
    # True when the think budget cut the reasoning (None: this agent did not reason).
    reasoning_truncated: bool | None = None
    # How its tokens were picked: the reasoning's sampler when it reasoned, else the
    # greedy one of its constrained answer (SamplerSettings.to_json).
    sampling: dict[str, Any] = field(default_factory=lambda: GREEDY.to_json())
    # Threads llama.cpp ran each stage with (vlmduo.engine.threads: fewer under load).
    threads: dict[str, int] = field(default_factory=dict)
    reasoning_pieces: list[str] = field(default_factory=list, repr=False)
    reasoning_logprobs: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The agent object of the ``--json`` contract."""
        return {
            "model": self.model,
            "answer": self.answer,
            "reasoning": self.reasoning,
            "reasoning_truncated": self.reasoning_truncated,
            "sampling": dict(self.sampling),
            "threads": dict(self.threads),
            "tokens": dict(self.tokens),
            "timings_ms": dict(self.timings_ms),
            "answer_probability": self.answer_probability,
            "cancelled": self.cancelled,
        }


@dataclass
class ShortAnswer:
    """A short-answer agent's result plus what a later transfer needs: for a local
    agent its live session and the position right after image + question."""

    result: AgentResult
    session: Session | None = None
    prefix_end: int = 0


@dataclass(frozen=True)
class Transfer:
    """The large agent's answer after the transferred reasoning was inserted."""

    answer: str | None
    prefill_ms: float
    decode_ms: float
    prefill_tokens: int  # transferred text plus the cue that closes it
    answer_tokens: int
    probability: float | None
    # Added to the JSON's "transferred" object: a remote agent's cached_tokens, request_ms...
    details: dict[str, Any] = field(default_factory=dict)
