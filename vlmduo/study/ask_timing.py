"""An ``ask`` seen by the latency model: its time in llama.cpp's stages, and the time
the fitted models give it for the tokens it actually generated.

Shared by ``vlmduo bench`` (one ask per mode) and the study (the sweep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmduo.duo.pipeline import AskResult
from vlmduo.study import latency_model as lm

AGENT_STAGES = ("image", "encode", "prefill", "decode")


@dataclass(frozen=True)
class ModeCheck:
    """A measured ``ask`` of one mode against the prediction for its actual token counts.

    ``stages_ms`` is the time inside llama.cpp's stages (image, encode, prefill,
    decode, transfer), what the latency model predicts; ``measured_ms`` the
    whole ask, which adds Python work around them (prompt rendering, grammar
    set-up, answer parsing): ``outside_ms``.
    """

    mode: str
    route: str | None
    measured_ms: float
    stages_ms: float
    predicted_ms: float | None
    tokens: dict[str, int]

    @property
    def outside_ms(self) -> float:
        """Wall time of the ask outside the timed stages."""
        return max(0.0, self.measured_ms - self.stages_ms)

    @property
    def error_pct(self) -> float | None:
        """(predicted - measured stages) / measured stages, in percent."""
        if self.predicted_ms is None or self.stages_ms <= 0:
            return None
        return (self.predicted_ms - self.stages_ms) / self.stages_ms * 100.0


def chain_ms(agent: Any) -> float:
    """An agent's time in llama.cpp's stages (image, encode, prefill, decode)."""
    if agent is None:
        return 0.0
    return sum(agent.timings_ms.get(stage, 0.0) for stage in AGENT_STAGES)


def stage_ms(result: AskResult, *, concurrent: bool) -> float:
    """An ask's time in llama.cpp's stages: what the latency model predicts."""
    small, large = chain_ms(result.small), chain_ms(result.large)
    if result.mode != "duo":
        return small + large  # one of them is 0
    stage1 = max(small, large) if concurrent else small + large
    return stage1 + sum(result.timings_ms.get(k, 0.0) for k in ("transfer_prefill", "answer_decode"))


def predict_result(
    small: lm.LatencyModel, large: lm.LatencyModel, result: AskResult, *, concurrent: bool
) -> float:
    """The time the fits give an ``ask`` result, from the token counts it actually had."""

    def run(fit: lm.LatencyModel, agent: Any) -> float:
        if agent is None or (agent.tokens["generated"] == 0 and agent.tokens["prompt"] == 0):
            return 0.0  # never started (a sequential duo that ended confident)
        t = agent.tokens
        return fit.run_ms(lm.Prompt(t["prompt"] + t["image"], t["image"]), t["generated"])

    small_ms = run(small, result.small)
    large_ms = run(large, result.large)
    if result.mode == "small":
        return small_ms
    if result.mode != "duo":
        return large_ms
    stage1 = max(small_ms, large_ms) if concurrent else small_ms + large_ms
    if result.route == "confident":
        stage1 = large_ms
    if not result.transferred or result.large is None:
        return stage1
    t = result.large.tokens
    added, answer = result.transferred.get("prefill_tokens", 0), result.transferred.get("answer_tokens", 0)
    context = t["prompt"] + t["image"] + t["generated"] + added
    return stage1 + large.prefill_ms(added) + large.decode_ms(answer, context)
