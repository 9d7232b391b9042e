"""Command-line checks that run before any work: each failure is a usage error (exit 2)
that says what was asked and what is possible.

Pure functions of the parsed options, so they are table-tested without a model.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass

from vlmduo.errors import UsageError

# llama.cpp rounds a context up to a multiple of 256 tokens; below 256 it silently gives 256.
LLAMA_CTX_STEP = 256
MODES_THAT_REASON = ("duo", "small", "large-think")


def engine(*, ctx: int, threads: int | None) -> None:
    """``--ctx`` and ``--threads`` as llama.cpp can honour them."""
    if threads is not None and threads < 1:
        cores = os.cpu_count() or 1
        raise UsageError(
            f"--threads {threads}: a model needs at least 1 thread (this machine has {cores} cores)",
            hint="give --threads 1 or more, or leave it out to use every core",
        )
    if ctx < LLAMA_CTX_STEP:
        raise UsageError(
            f"--ctx {ctx} is below llama.cpp's minimum context of {LLAMA_CTX_STEP} tokens",
            hint=f"give --ctx {LLAMA_CTX_STEP} or more (default 4096; llama.cpp rounds it up to a "
            f"multiple of {LLAMA_CTX_STEP})",
        )


def image_tokens(*, image_max_tokens: int | None, image_min_tokens: int | None) -> None:
    """The image token limits, positive and in order."""
    if image_max_tokens is not None and image_max_tokens < 1:
        raise UsageError(
            f"--image-max-tokens {image_max_tokens}: an image needs at least 1 token",
            hint="give 1 or more, or leave it out to fit the image to --ctx",
        )
    if image_min_tokens is not None and image_min_tokens < 1:
        raise UsageError(
            f"--image-min-tokens {image_min_tokens}: give 1 or more, or leave it out for the model's own"
        )
    if image_max_tokens is not None and image_min_tokens is not None and image_min_tokens > image_max_tokens:
        raise UsageError(
            f"--image-min-tokens {image_min_tokens} is above --image-max-tokens {image_max_tokens}"
        )


def question_format(question: str, fmt: str) -> None:
    """``--format choice`` needs options in the question to choose from."""
    if fmt != "choice":
        return
    from vlmduo.answers.formats import parse_options

    if not parse_options(question):
        raise UsageError(
            "--format choice needs lettered options in the question, such as "
            "'Which animal? A. cat B. dog'; this question has none",
            hint="add the options to the question, or use --format auto, yesno, number, short or free",
        )


@dataclass(frozen=True)
class Scope:
    """Where an option of ``ask`` has an effect."""

    flag: str
    modes: tuple[str, ...]
    policies: tuple[str, ...] | None = None  # None: any policy


# Options of ``ask`` (by parameter name) that only some modes (and policies) use.
SCOPES = {
    "policy": Scope("--policy", ("duo",)),
    "selector": Scope("--selector", ("duo",)),
    "sequential": Scope("--sequential", ("duo",)),
    "confidence_threshold": Scope("--confidence-threshold", ("duo",), ("confidence",)),
    "show_reasoning_flag": Scope("--show-reasoning", MODES_THAT_REASON),
}
# Not listed, so a script may pass the same flags for every mode:
# - --small/--large and their projectors name a pair, as --pair does; each mode takes
#   from the pair the models it needs;
# - --think-budget, --transfer-budget and --max-answer-tokens are caps: a cap on tokens
#   a mode never generates holds trivially.


def _modes(modes: tuple[str, ...]) -> str:
    """``--mode duo``, or ``--mode duo, small or large-think``."""
    if len(modes) == 1:
        return f"--mode {modes[0]}"
    return f"--mode {', '.join(modes[:-1])} or {modes[-1]}"


def applicable(mode: str, policy: str, given: Collection[str]) -> None:
    """Every option in ``given`` (parameter names typed on the command line) has an effect
    in ``mode`` with ``policy``; none is silently dropped."""
    for name, scope in SCOPES.items():
        if name not in given:
            continue
        if mode not in scope.modes:
            raise UsageError(
                f"{scope.flag} has no effect with --mode {mode}: it applies to {_modes(scope.modes)}",
                hint=f"drop {scope.flag}, or choose {_modes(scope.modes)}",
            )
        if scope.policies is not None and policy not in scope.policies:
            wanted = " or ".join(f"--policy {p}" for p in scope.policies)
            raise UsageError(
                f"{scope.flag} has no effect with --policy {policy}: it applies to {wanted}",
                hint=f"drop {scope.flag}, or add {wanted}",
            )


def output(*, quiet: bool, show_reasoning: bool) -> None:
    """``--quiet`` keeps stderr for errors only, so it cannot also show the reasoning."""
    if quiet and show_reasoning:
        raise UsageError(
            "--show-reasoning prints the reasoning on stderr, which --quiet keeps for errors only",
            hint="drop one of them; --json also carries the reasoning (small.reasoning, transferred.text)",
        )
