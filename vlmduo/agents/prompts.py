"""The words around a question that every agent, local or remote, sends its model:
the answer instruction, the cue that closes free reasoning, the thought's opening."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmduo.answers import formats

if TYPE_CHECKING:
    from vlmduo.agents.base import Question


STEP_BY_STEP = "Think step by step, then give the final answer."
# What closes an instruct model's free reasoning and asks for the answer.
ANSWER_CUE = "\n\nFinal answer: "
TRANSFER_CUE = "\n\nSo the answer is: "


def open_thought(prompt: str, think_start: str, think_end: str) -> tuple[str, bool]:
    """The prompt of a thinking model, ending inside its thought, and whether the
    template already closed it.

    Templates differ: Qwen3-VL Thinking's ends with ``<think>\n``; a hybrid
    one rendered with ``enable_thinking=False`` (Qwen3's) already holds an
    empty, closed thought ``<think>\n\n</think>\n\n``, which must not get a
    second ``</think>``; others write no opener, so we add it.
    """
    at = prompt.rfind(think_start)
    if at >= 0 and think_end in prompt[at:]:
        return prompt, True
    if prompt.rstrip().endswith(think_start):
        return prompt, False
    return prompt + think_start + "\n", False


def user_text(question: Question, extra: str) -> str:
    instruction = formats.answer_instruction(question.fmt, question.options or None)
    return "\n".join(part for part in (question.text, instruction, extra) if part)
