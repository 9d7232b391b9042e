"""Do two answers agree? The paper's mutual verification, on normalised answers.

Pure logic with no model calls: the duo pipeline decides its route with it.
"""

from __future__ import annotations

import math

from vlmduo.answers.extract import normalize_text, parse_choice, parse_number, parse_yesno, strip_markup
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
    """True when both answers normalize to the same value (numbers within 1e-6)."""
    na, nb = normalize(a, fmt, options), normalize(b, fmt, options)
    if na is None or nb is None:
        return False
    if fmt == "number":
        return math.isclose(float(na), float(nb), rel_tol=1e-6, abs_tol=1e-12)
    return na == nb
