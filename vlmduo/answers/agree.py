"""Do two answers agree? The paper's mutual verification, on normalised answers.

Pure logic with no model calls: the duo pipeline decides its route with it.
"""

from __future__ import annotations

import math

from vlmduo.answers.extract import (
    extract_answer,
    normalize_text,
    parse_choice,
    parse_number,
    parse_yesno,
    strip_markup,
)
from vlmduo.answers.formats import check_format


def normalize(answer: str | None, fmt: str, options: dict[str, str] | None = None) -> str | None:
    """Canonical form of an answer for comparison, or None if it has none.

    choice: the option letter; yesno: "yes"/"no"; number: a canonical decimal
    string ("1,234" -> "1234"); short/free: lowercase words without punctuation
    or articles.
    """
    check_format(fmt)
    if answer is None or not answer.strip():
        return None
    if fmt == "choice":
        return parse_choice(answer, options, strict=True)
    if fmt == "yesno":
        return parse_yesno(answer, strict=False)
    if fmt == "number":
        return parse_number(answer, strict=False)
    return normalize_text(strip_markup(answer))


def answers_agree(a: str | None, b: str | None, fmt: str, options: dict[str, str] | None = None) -> bool:
    """True when both answers normalize to the same value (numbers within 1e-6); for
    ``short`` and ``free``, also when the shorter answer stands word for word in the
    longer one ("red" in "The car is red"), unless the longer one negates it."""
    # A reply, not only a bare answer: read its answer first ("Answer: red", "**B. Blue.**").
    a, b = (_answer_of(x, fmt, options) for x in (a, b))
    na, nb = normalize(a, fmt, options), normalize(b, fmt, options)
    if na is None or nb is None:
        return False
    if fmt == "number":
        return math.isclose(float(na), float(nb), rel_tol=1e-6, abs_tol=1e-12)
    if fmt in ("short", "free"):
        return na == nb or _stands_in(*sorted((na.split(), nb.split()), key=len))
    return na == nb


# Words that turn "the car is not red" against "red"; function words that alone agree with
# nothing ("is" stands in every sentence).
_NEGATIONS = frozenset(
    "not no never none nothing neither nor isnt arent wasnt werent dont doesnt didnt cant cannot wont".split()
)
_FUNCTION_WORDS = frozenset("is are was were it this that there of in on at to and or with be".split())


def _stands_in(short: list[str], long: list[str]) -> bool:
    """True when ``short`` is a run of ``long`` that says something, and ``long`` negates nothing
    ``short`` does not."""
    if not short or not set(short) - _FUNCTION_WORDS:
        return False
    if (set(long) - set(short)) & _NEGATIONS:
        return False
    n = len(short)
    return any(long[i : i + n] == short for i in range(len(long) - n + 1))


def _answer_of(answer: str | None, fmt: str, options: dict[str, str] | None) -> str | None:
    """The answer a reply gives, where it marks one ("Answer: red", "**red**"); else the reply."""
    if answer is None or not answer.strip():
        return answer
    return extract_answer(answer, fmt, options) or answer
