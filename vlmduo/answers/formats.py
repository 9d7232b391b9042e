"""Answer formats: which one a question asks for, its options, and the instruction.

Pure logic with no model calls: the agents tell their models how to answer with it,
and ``auto`` resolves here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmduo.errors import UsageError

FORMATS = ("choice", "yesno", "number", "short", "free")

# Letters accepted for a choice answer when the question's options are unknown.
# "I" is left out on purpose: it is far more often the pronoun than an option.
_DEFAULT_LETTERS = "ABCDEFGH"


# Option markers in a question: "(A)", "A.", "A)", "A:" after a non-word character and
# before a space; at the start of a line also before the text itself ("A.chair", "A:40°").
_OPTION_RE = re.compile(
    r"(?<![\w(])(?:\(([A-Za-z])\)|([A-Z])[.:]|([A-Za-z])\))(?=\s)"
    r"|(?:(?<=\n)|^)[ \t]*(?:\(([A-Za-z])\)|([A-Z])[.:]|([A-Za-z])\))(?=[^\s.:)])",
    re.MULTILINE,
)
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
    r"what(?:\s+is|'s)\s+the\s+(?:\S+\s+)?(?:sum|total|product|difference|average|mean|count|"
    r"number|value|area|perimeter|percentage|result|price|cost|age|height|width|length))\b"
)
_SHORT_Q_RE = re.compile(
    r"^(?:name|identify|(?:(?:in|on|at|from|of|to|for|by|with)\s+)?"
    r"(?:what\s+(?:colou?r|kind|type|brand|animal|shape|sport|time|fruit|food|letter|word|language|"
    r"country|city|species)|what(?:\s+is|'s)\s+the\s+name|"
    r"which|who|whom|whose|where|when))\b"
)
_FREE_Q_RE = re.compile(
    r"^(?:why|how|describe|explain|"
    r"what\s+(?:is|are|'s)\s+(?:happening|going\s+on|unusual|strange|funny|odd|interesting|wrong))\b"
)

# Answer-style instructions that evaluation harnesses write around a question (see
# tests/test_benchmark_phrasings.py for where each comes from), with the format each asks
# for: a strong request decides the format, a weak one only where the question leaves it
# open. vlmduo's own instruction replaces them in what the models are sent.
_INSTRUCTIONS: list[tuple[re.Pattern[str], str, bool]] = [
    (re.compile(pattern, re.IGNORECASE), fmt, strong)
    for pattern, fmt, strong in (
        (r"(?:please\s+)?answer\s+(?:with\s+)?(?:yes\s+or\s+no|yes/no)(?:\s+without\s+an\s+explanation)?\.?",
         "yesno", True),
        (r"answer\s+with\s+the\s+option'?s?\s+letter(?:\s+from\s+the\s+given\s+choices)?"
         r"(?:\s+directly)?(?:\s+only)?\.?", "choice", True),
        (r"(?:please\s+)?answer\s+(?:directly\s+)?with\s+only\s+the\s+letter\s+of\s+the\s+correct\s+option"
         r"(?:\s+and\s+nothing\s+else)?\.?", "choice", True),
        (r"please\s+select\s+the\s+correct\s+answer\s+from\s+the\s+options\s+above\.?", "choice", True),
        (r"select\s+from\s+the\s+following\s+choices\.?", "choice", True),
        (r"answer\s+with\s+a\s+letter\.?", "choice", True),
        (r"(?:please\s+)?answer\s+directly\s+with\s+a\s+single\s+word\s+or\s+number\.?", "short", False),
        (r"answer\s+the\s+question\s+(?:according\s+to\s+the\s+image\s+)?(?:using|with)\s+"
         r"(?:a\s+single\s+word(?:\s+or\s+(?:a\s+)?phrase)?|a\s+short\s+phrase)\.?", "short", False),
        (r"please\s+(?:try\s+to\s+)?answer\s+(?:the\s+question\s+)?(?:concisely\s+)?with\s+short\s+words"
         r"\s+or\s+phrases(?:\s+(?:when|if)\s+possible)?\.?", "short", False),
        (r"give\s+a\s+very\s+brief\s+answer\.?|answer\s+briefly\.?|your\s+response\s+must\s+be\s+concise\.?",
         "short", False),
        (r"provide\s+a\s+short\s+and\s+direct\s+response\.?", "short", False),
        (r"the\s+last\s+line\s+of\s+your\s+response\s+should\s+be\s+of\s+the\s+form[^\n]*", "short", False),
        (r"(?:^|(?<=\s))answer:\s*\Z", "short", False),
    )
]  # fmt: skip
# A hint or instruction that asks for a number ("requiring an integer answer", MathVista).
_NUMBER_REQUEST_RE = re.compile(r"\brequiring\s+an?\s+(?:integer|floating-point|numeric|number)\b", re.I)
_IMAGE_TAG_RE = re.compile(r"<image>[ \t]*\n?")
# Labels and lead-ins around the question proper (read, not sent differently).
_QUESTION_LABEL_RE = re.compile(r"^[ \t]*(?:question|q)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_OPTIONS_LABEL_RE = re.compile(
    r"^[ \t]*(?:(?:answer\s+)?options|choices|there\s+are\s+several\s+options)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_OPTIONS_LABEL_RE = re.compile(r"\s(?:options|choices)\s*:\s*", re.IGNORECASE)
_CONTEXT_LINE_RE = re.compile(
    r"^[ \t]*(?:hint|reference\s+ocr\s+tokens?)\s*:.*$", re.IGNORECASE | re.MULTILINE
)
_LEAD_IN_RE = re.compile(
    r"^(?:based\s+on|according\s+to|in|looking\s+at|from|given)\s+(?:the|this)\s+"
    r"(?:image|picture|photo|figure|chart|graph|table|diagram|scene|screenshot|document)s?\s*,\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedQuestion:
    """A question as a user or an evaluation harness wrote it, taken apart.

    ``text`` is what the models are sent: the question with its context (hints, OCR
    tokens, options), without ``<image>`` tags and without answer-style instructions
    (vlmduo's own, for the resolved format, replace them). ``question`` is the question
    proper, for inferring the format; ``requested`` the format an instruction asked for
    and ``strong`` whether it settles the format.
    """

    text: str
    question: str
    options: dict[str, str]
    requested: str | None = None
    strong: bool = False


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
        paren, dot, close = (m.group(1) or m.group(4)), (m.group(2) or m.group(5)), (m.group(3) or m.group(6))
        letter = paren or dot or close
        style = "paren" if paren else ("dot" if dot else "close")
        markers.append((letter, style, m.start(), m.end()))
    best: dict[str, str] = {}
    for i, first in enumerate(markers):
        if first[0] not in "Aa":
            continue
        run = [first]
        for marker in markers[i + 1 :]:
            # Markers that break the sequence (a stray "T." in "Mr. T.") are option text.
            if marker[1] == first[1] and marker[0] == chr(ord(run[-1][0]) + 1):
                run.append(marker)
        # The longest run whose options all have a text, the later of equal ones (options
        # follow the question); "A. A. B. B." has its texts after the first markers.
        options = _run_options(question, run) if len(run) >= 2 else {}
        if options and len(options) >= len(best):
            best = options
    return best


def _run_options(question: str, run: list[tuple[str, str, int, int]]) -> dict[str, str]:
    """The options a run of markers stands for; {} when one of them has no text."""
    options: dict[str, str] = {}
    for k, (letter, _style, _start, end) in enumerate(run):
        stop = run[k + 1][2] if k + 1 < len(run) else len(question)
        text = question[end:stop].split("\n", 1)[0].strip().rstrip(".,;").strip()
        if not text:
            return {}
        options[letter.upper()] = text
    return options


def parse_question(raw: str) -> ParsedQuestion:
    """Take a question apart (see :class:`ParsedQuestion`): harness instructions out of
    what is sent, scaffolding (``<image>``, ``Question:``, hints, lead-ins such as "Based
    on the image,", the options) out of the question proper."""
    text = _IMAGE_TAG_RE.sub("", raw)
    requested, strong = None, False
    for pattern, fmt, is_strong in _INSTRUCTIONS:
        if pattern.search(text):
            if requested is None or (is_strong and not strong):
                requested, strong = fmt, is_strong
            text = pattern.sub(" ", text)
    if _NUMBER_REQUEST_RE.search(text) and not strong:
        requested, strong = "number", True
    text = _tidy(text)
    if not re.search(r"\w", text):  # nothing but an instruction: send the user's words
        text = raw.strip()
    options = parse_options(text)
    return ParsedQuestion(text, _question_proper(text, options), options, requested, strong)


def _tidy(text: str) -> str:
    """Trailing spaces off each line, runs of blank lines collapsed, ends stripped."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _question_proper(text: str, options: dict[str, str]) -> str:
    """The question without labels, hints, OCR tokens, options or a lead-in."""
    labels = list(_QUESTION_LABEL_RE.finditer(text))
    if labels:  # "Hint: ...\nQuestion: ...": the question follows the last label
        text = text[labels[-1].end() :]
    cut = _OPTIONS_LABEL_RE.search(text) or (_INLINE_OPTIONS_LABEL_RE.search(text) if options else None)
    if cut:
        text = text[: cut.start()]
    elif options:
        first = _OPTION_RE.search(text)
        text = text[: first.start()] if first else text
    text = _CONTEXT_LINE_RE.sub("", text)
    return _LEAD_IN_RE.sub("", text.strip()).strip()


def infer_format(question: str | ParsedQuestion) -> str:
    """Guess the answer format of a question (the ``auto`` format), as it is written or
    as a benchmark harness wraps it (:func:`parse_question`).

    Options mean "choice"; an instruction asking for yes/no (or a number) decides; then
    the question proper: yes/no questions "yesno"; counts and quantities "number"; short
    wh- questions "short"; anything else "free", unless the harness asked for a word or
    a phrase.
    """
    parsed = question if isinstance(question, ParsedQuestion) else parse_question(question)
    if parsed.options:
        return "choice"
    if parsed.strong and parsed.requested in ("yesno", "number"):
        return parsed.requested
    found = _format_of(parsed.question)
    if found == "free" and parsed.requested == "short":
        return "short"
    return found


def _format_of(question: str) -> str:
    """The format the question proper asks for."""
    q = " ".join(question.lower().split())
    if re.search(r"\b(?:yes\s*(?:or|/)\s*no|true\s*(?:or|/)\s*false)\b", q):
        return "yesno"
    # Judge the question sentence itself, not instructions written around it.
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", q) if x]
    asked = [x for x in sentences if x.endswith("?")]
    sentence = (asked or sentences or [q])[-1].lstrip("\"'( ")
    sentence = _LEAD_IN_RE.sub("", sentence)
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


def resolve_format(fmt: str, question: str | ParsedQuestion) -> str:
    """Return ``fmt``, or the inferred format when it is ``auto``."""
    if fmt == "auto":
        return infer_format(question)
    check_format(fmt)
    return fmt


def listed_letters(options: dict[str, str] | None) -> str:
    """The option letters as a phrase: "A, B, C or D" (A-D when the options are unknown)."""
    letters = list(option_letters(options) if options else "ABCD")
    return ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else letters[0]


def answer_instruction(fmt: str, options: dict[str, str] | None = None) -> str:
    """One sentence telling a model how to format its answer (for a short answer, the
    phrase of LLaVA's and lmms-eval's prompts that VLMs are evaluated with)."""
    check_format(fmt)
    if fmt == "choice":
        return f"Answer with the option's letter ({listed_letters(options)}) only."
    return {
        "yesno": "Answer with Yes or No only.",
        "number": "Answer with a single number only, in digits.",
        "short": "Answer the question using a single word or phrase.",
        "free": "Answer the question concisely.",
    }[fmt]
