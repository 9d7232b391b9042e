"""Answer formats: which one a question asks for, its options, and the instruction.

Pure logic with no model calls: the agents tell their models how to answer with it,
and ``auto`` resolves here.
"""

from __future__ import annotations

import re

from vlmduo.errors import UsageError

FORMATS = ("choice", "yesno", "number", "short", "free")

# Letters accepted for a choice answer when the question's options are unknown.
# "I" is left out on purpose: it is far more often the pronoun than an option.
_DEFAULT_LETTERS = "ABCDEFGH"


# Option markers in a question: "(A)", "A.", "A)", "A:" after a non-word character.
_OPTION_RE = re.compile(r"(?<![\w(])(?:\(([A-Za-z])\)|([A-Z])[.:]|([A-Za-z])\))(?=\s)")
_YESNO_START_RE = re.compile(
    r"^(?:is|are|am|was|were|does|do|did|can|could|has|have|had|will|would|should|"
    r"shall|may|might|must|isn't|aren't|doesn't|don't|didn't|can't|wasn't|weren't)\b"
)
_REQUEST_RE = re.compile(
    r"^(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"(?=(?:tell|say|identify|name|describe|list|count|give|determine|find|explain|read)\b)"
)
_NUMBER_Q_RE = re.compile(
    r"\b(?:how\s+(?:many|much|old)|what\s+number|count|number\s+of|"
    r"what(?:\s+is|'s)\s+the\s+(?:sum|total|product|difference|average|mean|count|"
    r"number|value|area|perimeter|percentage|result|price|cost|age|height|width|length))\b"
)
_SHORT_Q_RE = re.compile(
    r"^(?:name|identify|(?:(?:in|on|at|from|of|to|for|by|with)\s+)?"
    r"(?:what\s+(?:colou?r|kind|type|brand|animal|shape|sport|time|fruit|food|letter|word|language|country|city|species)|what(?:\s+is|'s)\s+the\s+name|"
    r"which|who|whom|whose|where|when))\b"
)
_FREE_Q_RE = re.compile(r"^(?:why|how|describe|explain|what\s+(?:is|are)\s+(?:happening|going))\b")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown answer format {fmt!r}", hint=f"use one of: auto, {', '.join(FORMATS)}")


def option_letters(options: dict[str, str] | None) -> str:
    return "".join(sorted(options)) if options else _DEFAULT_LETTERS


def parse_options(question: str) -> dict[str, str]:
    """Return the question's multiple-choice options as ``{"A": text, ...}``.

    Recognises "A. cat B. dog", one option per line ("A) cat", "(A) cat", "A: cat"),
    with or without an "Options:" line. A run of options must start at A and have
    at least two consecutive letters in one marker style; otherwise ``{}``.
    """
    markers = []
    for m in _OPTION_RE.finditer(question):
        letter = m.group(1) or m.group(2) or m.group(3)
        style = "paren" if m.group(1) else ("dot" if m.group(2) else "close")
        markers.append((letter, style, m.start(), m.end()))
    best: list[tuple[str, str, int, int]] = []
    for i, first in enumerate(markers):
        if first[0] not in "Aa":
            continue
        run = [first]
        for marker in markers[i + 1 :]:
            # Markers that break the sequence (a stray "T." in "Mr. T.") are option text.
            if marker[1] == first[1] and marker[0] == chr(ord(run[-1][0]) + 1):
                run.append(marker)
        if len(run) >= 2 and len(run) >= len(best):
            best = run
    options: dict[str, str] = {}
    for k, (letter, _style, _start, end) in enumerate(best):
        stop = best[k + 1][2] if k + 1 < len(best) else len(question)
        text = question[end:stop].split("\n", 1)[0].strip().rstrip(".,;").strip()
        if not text:
            return {}
        options[letter.upper()] = text
    return options


def infer_format(question: str) -> str:
    """Guess the answer format of a question (the ``auto`` format).

    Options mean "choice"; yes/no questions "yesno"; counts and quantities
    "number"; short wh- questions "short"; anything else "free".
    """
    if parse_options(question):
        return "choice"
    q = " ".join(question.lower().split())
    if re.search(r"\b(?:yes\s*(?:or|/)\s*no|true\s*(?:or|/)\s*false)\b", q):
        return "yesno"
    # Judge the question sentence itself, not instructions written around it.
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", q) if x]
    asked = [x for x in sentences if x.endswith("?")]
    sentence = (asked or sentences or [q])[-1].lstrip("\"'( ")
    request = _REQUEST_RE.match(sentence)
    if request:
        # "Can you tell me how many..." is a request, not a yes/no question.
        sentence = sentence[request.end() :]
    elif _YESNO_START_RE.match(sentence):
        # "Is it a cat or a dog?" asks for one of two things, not yes or no.
        return "short" if re.search(r"\w\s+or\s+\w", sentence) else "yesno"
    if _NUMBER_Q_RE.search(sentence) or re.search(r"\d\s*[-+*/x\u00d7\u00f7]\s*\d", sentence):
        return "number"
    if _FREE_Q_RE.match(sentence):
        return "free"
    if _SHORT_Q_RE.match(sentence):
        return "short"
    if sentence.startswith("what") and len(sentence.split()) <= 8:
        return "short"
    return "free"


def resolve_format(fmt: str, question: str) -> str:
    """Return ``fmt``, or the inferred format when it is ``auto``."""
    if fmt == "auto":
        return infer_format(question)
    check_format(fmt)
    return fmt


def answer_instruction(fmt: str, options: dict[str, str] | None = None) -> str:
    """One sentence telling a model how to format its answer."""
    check_format(fmt)
    if fmt == "choice":
        letters = list(option_letters(options) if options else "ABCD")
        listed = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else letters[0]
        return f"Answer with the option's letter ({listed}) only."
    return {
        "yesno": "Answer with Yes or No only.",
        "number": "Answer with a single number only, in digits.",
        "short": "Answer with a single word or short phrase only.",
        "free": "Answer the question concisely.",
    }[fmt]
