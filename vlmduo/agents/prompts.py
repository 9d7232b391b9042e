"""The words around a question that every agent, local or remote, sends its model:
the instructions, the cues that close reasoning, the thought's opening and its end.

Two kinds of reasoner are asked differently. A model that thinks natively (between
thinking markers) is asked the question with the answer instruction: it thinks first by
itself, then answers as told. Any other model is asked to reason and to end with one
fixed answer line ("Answer: ..."), with no "only" that would tell it to skip the
reasoning; the cue that closes its reasoning is that line's opening.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmduo.answers import formats

if TYPE_CHECKING:
    from vlmduo.agents.base import Question

# The fixed line a reasoning instruct model ends with, and the cue that asks for it after
# its reasoning (or the transferred reasoning). No space after the colon: the answer's
# first token carries it (Qwen writes " B" as one token), and the grammars allow it.
ANSWER_LINE = "Answer:"
ANSWER_CUE = f"\n\n{ANSWER_LINE}"
TRANSFER_CUE = ANSWER_CUE

# What Qwen3 inserts when a thinking budget runs out, before closing the thought
# (QwenLM/Qwen3, docs/source/getting_started/quickstart.md, "Thinking Budget": the
# early-stopping text "\n\nConsidering the limited time by the user, I have to give the
# solution based on the thinking directly now.\n</think>\n\n"). It is the one such
# hand-off a model family publishes; vlmduo ends every cut reasoning with it.
BUDGET_HANDOFF = (
    "Considering the limited time by the user, "
    "I have to give the solution based on the thinking directly now."
)

# What a reasoning instruct model is asked to end with, per format.
_ANSWER_SLOT = {
    "yesno": "Yes or No",
    "number": "a single number, in digits",
    "short": "a single word or phrase",
    "free": "a short answer",
}


def reasoning_instruction(fmt: str, options: dict[str, str] | None = None) -> str:
    """What asks a model that does not think natively to reason, then answer on one line."""
    formats.check_format(fmt)
    if fmt == "choice":
        slot = f"the option's letter ({formats.listed_letters(options)})"
    else:
        slot = _ANSWER_SLOT[fmt]
    # No placeholder ("Answer: X"): a small model copies it (SmolLM2-135M answered "X"
    # after reasoning "The capital of France is Paris"; benchmarks/answer_path.py).
    return (
        f'Think step by step, then end with a last line that starts with "{ANSWER_LINE}" followed by {slot}.'
    )


def reasoning_text(question: Question, thinks_natively: bool) -> str:
    """The user turn of a model asked to reason: the answer instruction for a native
    thinker (it thinks first by itself), the reasoning instruction for any other."""
    options = question.options or None
    if thinks_natively:
        instruction = formats.answer_instruction(question.fmt, options)
    else:
        instruction = reasoning_instruction(question.fmt, options)
    return f"{question.text}\n{instruction}"


def answer_text(question: Question) -> str:
    """The user turn of a model asked to answer directly."""
    return f"{question.text}\n{formats.answer_instruction(question.fmt, question.options or None)}"


def close_thought(reasoning: str, think_end: str, *, truncated: bool) -> str:
    """What follows a thought to close it: Qwen3's hand-off when the budget cut it, then the
    end marker and the blank line a thinking model writes before its answer."""
    if truncated:
        return f"\n\n{BUDGET_HANDOFF}\n{think_end}\n\n"
    return ("" if reasoning.endswith("\n") else "\n") + f"{think_end}\n\n"


def close_reasoning(truncated: bool) -> str:
    """What follows an instruct model's reasoning to ask for its answer line: the
    hand-off first when the budget cut it."""
    return f"\n\n{BUDGET_HANDOFF}{ANSWER_CUE}" if truncated else ANSWER_CUE


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
