"""The local agent: a ``VisionLanguageModel`` in a role, run through llama.cpp.

It reports per-stage timings and token counts. Its short answer keeps its
session and the position of its cached image+question prefix, so the transfer
inserts reasoning there without re-encoding the image or re-prefilling the question.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

from vlmduo.agents import prompts
from vlmduo.agents.base import (
    AgentResult,
    Progress,
    Question,
    Sampling,
    ShortAnswer,
    Transfer,
    reasoning_sampler,
)
from vlmduo.answers import extract
from vlmduo.engine import threads as engine_threads
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.prefix_cache import PrefixCache
from vlmduo.engine.sampling import GREEDY
from vlmduo.engine.session import Context, Generation, Session


@dataclass(frozen=True)
class Agent:
    """A loaded model in a role, with how it marks its thinking.

    ``context`` is the agent's own KV cache over the model's weights: two
    agents on the same model never share one. Without it the model's default
    context is used (one agent per model).
    """

    model: VisionLanguageModel
    thinking: bool = False
    think_start: str = "<think>"
    think_end: str = "</think>"
    context: Context | None = None
    # The model card's sampling (registry keys and values), for its reasoning.
    card: tuple[tuple[str, float], ...] = ()
    # Image prefixes this agent restores and keeps (None: every image is encoded anew).
    prefix_cache: PrefixCache | None = None

    @property
    def name(self) -> str:
        """The model's display name."""
        return self.model.name

    def session(self, cancel: threading.Event | None = None) -> Session:
        """A fresh conversation in this agent's context."""
        return (self.context or self.model.default_context).session(cancel)

    def image_cache(self, use: bool) -> PrefixCache | None:
        """The prefix cache to prefill with (None when the ask turned it off)."""
        return self.prefix_cache if use else None

    def count_tokens(self, text: str) -> int:
        """What ``text`` costs this agent's model, as plain text."""
        return self.model.count_tokens(text)

    def stage1_threads(self, sequential: bool) -> contextlib.AbstractContextManager[None]:
        """While both agents run at once they split the cores; restored on leaving."""
        threads = self.model.settings.threads()
        n = threads if sequential else max(1, threads // 2)
        return (self.context or self.model.default_context).threads(n)

    def solo(self) -> None:
        """The other agent is done with stage 1: take every core for the rest of it."""
        (self.context or self.model.default_context).widen(self.model.settings.threads())

    def reason(self, question: Question, sampling: Sampling, think_budget: int, **kwargs: Any) -> AgentResult:
        """``reason_then_answer`` with this agent."""
        return reason_then_answer(self, question, sampling, think_budget, **kwargs)

    def answer_short(self, question: Question, sampling: Sampling, **kwargs: Any) -> ShortAnswer:
        """``answer_short`` with this agent."""
        return answer_short(self, question, sampling, **kwargs)

    def transfer(
        self, short: ShortAnswer, question: Question, text: str, sampling: Sampling, **kwargs: Any
    ) -> Transfer:
        """``transfer_answer`` with this agent."""
        return transfer_answer(self, short, question, text, sampling, **kwargs)


def _stream(
    session: Session, agent: Agent, phase: str, max_tokens: int, progress: Progress | None, **kwargs: Any
) -> Generation:
    on_text = getattr(progress, "on_text", None)
    for event_count, event in enumerate(session.stream(max_tokens, **kwargs), start=1):
        if progress is not None:
            progress(agent.name, phase, event_count)
        if on_text is not None:
            on_text(agent.name, phase, event.text)
    return session.last


def _constrained_answer(
    session: Session,
    agent: Agent,
    question: Question,
    sampling: Sampling,
    progress: Progress | None,
    phase: str = "answer",
    stage: str = "decode",
) -> Generation:
    """Decode the short answer under the format's grammar, greedily, keeping log-probs
    for its probability."""
    return _stream(
        session,
        agent,
        phase,
        sampling.max_answer_tokens,
        progress,
        grammar=question.grammar,
        logprobs=True,
        sampler=GREEDY,
        stage=stage,
    )


def _result(
    agent: Agent, session: Session, answer: str | None, reasoning: str | None, load_ms: float
) -> AgentResult:
    timings = session.times.as_dict()
    timings["load"] = round(load_ms, 3)
    timings.setdefault("restore", 0.0)
    return AgentResult(
        model=agent.name,
        answer=answer,
        reasoning=reasoning,
        tokens={
            "prompt": session.n_prompt_tokens,
            "image": session.n_image_tokens,
            "generated": session.n_generated,
            "cached": session.n_cached_tokens,
        },
        timings_ms=timings,
        threads=dict(session.threads_used),
    )


def _answer_from(gen: Generation, question: Question) -> str | None:
    """The answer a constrained generation gave, as generated (a letter is that letter,
    never read through the options' text); free text as written."""
    if question.grammar is None:
        return gen.text.strip() or None
    return extract.constrained_answer(gen.text, question.fmt)


def _probability(gen: Generation) -> float | None:
    # The constrained answer's probability, its end included (Session.stream):
    # tokens the grammar forbids carry no mass, forced tokens count 1.
    return gen.probability


def reason_then_answer(
    agent: Agent,
    question: Question,
    sampling: Sampling,
    think_budget: int,
    *,
    load_ms: float = 0.0,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    reasoning_logprobs: bool = False,
    image_cache: bool = True,
) -> AgentResult:
    """Reason (inside thinking markers, or step by step) for at most ``think_budget``
    tokens with the model card's sampling, close the reasoning (with Qwen3's hand-off
    when the budget cut it), then decode a constrained answer greedily.

    ``reasoning_logprobs`` keeps each reasoning token's log-probability (the
    ``surprisal`` selector reads them); off, no softmax over the vocabulary is
    paid per token. ``image_cache`` restores the image prefix from the agent's
    cache when it holds it (and keeps it there when not).
    """
    model = agent.model
    prompt = model.render_prompt(
        prompts.reasoning_text(question, agent.thinking),
        image=question.image is not None,
        enable_thinking=True if agent.thinking else None,
    )
    if agent.thinking:
        prompt, _ = prompts.open_thought(prompt, agent.think_start, agent.think_end)
    session = agent.session(cancel)
    reserve = think_budget + sampling.max_answer_tokens + 16 + model.count_tokens(prompts.BUDGET_HANDOFF)
    session.prefill(prompt, question.image, reserve=reserve, cache=agent.image_cache(image_cache))
    stop = model.token_id(agent.think_end) if agent.thinking else None
    sampler = reasoning_sampler(agent.card, sampling)
    thought = _stream(
        session,
        agent,
        "reason",
        think_budget,
        progress,
        logprobs=reasoning_logprobs,
        stop_tokens=() if stop is None else (stop,),
        sampler=sampler,
    )
    pieces, logprobs = list(thought.pieces), list(thought.logprobs)
    if thought.stop_reason == "stop":  # the closing marker itself is not reasoning
        pieces, logprobs = pieces[:-1], logprobs[: len(pieces) - 1]
    reasoning = "".join(pieces)
    if agent.thinking and agent.think_end in reasoning:
        reasoning = reasoning.split(agent.think_end)[0]
    truncated = thought.stop_reason in ("length", "context")
    if thought.stop_reason == "cancelled":
        result = _result(agent, session, None, reasoning.strip(), load_ms)
        result.cancelled = True
        result.reasoning_pieces, result.reasoning_logprobs = pieces, logprobs
        result.sampling = sampler.to_json()
        return result
    # Close the reasoning ourselves (with the hand-off when the budget ran out) and force the answer.
    if agent.thinking:
        closer = prompts.close_thought(reasoning, agent.think_end, truncated=truncated)
    else:
        closer = prompts.close_reasoning(truncated)
    session.append(closer, stage="prefill")
    final = _constrained_answer(session, agent, question, sampling, progress)
    answer = _answer_from(final, question)
    if answer is None:
        answer = extract.extract_answer(reasoning, question.fmt, question.options or None)
    result = _result(agent, session, answer, reasoning.strip(), load_ms)
    result.answer_probability = _probability(final)
    result.reasoning_truncated = truncated
    result.sampling = sampler.to_json()
    result.reasoning_pieces, result.reasoning_logprobs = pieces, logprobs
    return result


def answer_short(
    agent: Agent,
    question: Question,
    sampling: Sampling,
    *,
    reserve: int = 0,
    load_ms: float = 0.0,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    image_cache: bool = True,
) -> ShortAnswer:
    """Encode the image, prefill the question and decode a short constrained answer.

    ``reserve`` keeps room in the context for a later transfer.
    """
    model = agent.model
    prompt = model.render_prompt(
        prompts.answer_text(question),
        image=question.image is not None,
        enable_thinking=False if agent.thinking else None,
    )
    closed = False
    if agent.thinking:
        prompt, closed = prompts.open_thought(prompt, agent.think_start, agent.think_end)
    session = agent.session(cancel)
    cache = agent.image_cache(image_cache)
    session.prefill(prompt, question.image, reserve=reserve + sampling.max_answer_tokens + 16, cache=cache)
    prefix_end = session.n_past
    if agent.thinking and not closed:  # answer without thinking: close the (empty) thought first
        session.append(f"\n{agent.think_end}\n\n", stage="prefill")
    gen = _constrained_answer(session, agent, question, sampling, progress)
    result = _result(agent, session, _answer_from(gen, question), None, load_ms)
    result.answer_probability = _probability(gen)
    return ShortAnswer(result=result, session=session, prefix_end=prefix_end)


def transfer_answer(
    agent: Agent,
    short: ShortAnswer,
    question: Question,
    transferred_text: str,
    sampling: Sampling,
    *,
    progress: Progress | None = None,
) -> Transfer:
    """Insert ``transferred_text`` into the large agent's response after its cached
    prefix and decode a constrained answer.

    Only the inserted tokens and the answer are new work: the image and the
    question stay in the KV cache.
    """
    session = short.session
    if session is None:
        raise ValueError("this short answer kept no session to transfer into")
    session.rewind(short.prefix_end)
    if agent.thinking:
        cue = prompts.close_thought(transferred_text, agent.think_end, truncated=False)
    else:
        cue = prompts.TRANSFER_CUE
    before = session.times.get("transfer_prefill")
    # The other model's text is plain text: a "<|im_end|>" it wrote must not
    # become a control token in this model's cache. The cue is ours.
    n_tokens = session.append(
        transferred_text,
        stage="transfer_prefill",
        reserve=sampling.max_answer_tokens + agent.model.count_tokens(cue),
        special=False,
    )
    n_tokens += session.append(cue, stage="transfer_prefill", reserve=sampling.max_answer_tokens)
    prefill_ms = session.times.get("transfer_prefill") - before
    gen = _constrained_answer(session, agent, question, sampling, progress, "transfer", "answer_decode")
    answer = _answer_from(gen, question)
    used = {stage: session.threads_used[stage] for stage in ("transfer_prefill", "answer_decode")}
    details = {"threads": used, "waits": engine_threads.waits()}
    return Transfer(answer, prefill_ms, gen.decode_ms, n_tokens, len(gen.tokens), _probability(gen), details)
