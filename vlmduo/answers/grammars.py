"""llama.cpp GBNF grammars that hold the large model to a short answer.

The large agent's latency is its decoded tokens, so every grammar here is
bounded: once the answer is complete nothing but end-of-generation can follow,
and no rule can repeat without limit.
"""

from __future__ import annotations

import string

from vlmduo.answers.formats import FORMATS
from vlmduo.errors import UsageError

# Letters offered when a choice question's options could not be parsed.
DEFAULT_CHOICE_LETTERS = "ABCD"

# Latin letters with diacritics too ("café", "Zürich"); the GBNF parser reads \u escapes.
_WORD_CHARS = r"a-zA-Z0-9\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F'-"

_YESNO = 'root ::= "Yes" | "No" | "yes" | "no"\n'

# At most 12 characters: sign, 7 integer digits (no leading zeros), "." and 3 decimals.
_NUMBER = 'root ::= "-"? integer fraction?\ninteger ::= "0" | [1-9] [0-9]{0,6}\nfraction ::= "." [0-9]{1,3}\n'

# One to five words separated by single spaces, each at most 24 characters.
_SHORT = f'root ::= word (" " word){{0,4}}\nword ::= [{_WORD_CHARS}]{{1,24}}\n'


def grammar_for(fmt: str, options: dict[str, str] | None = None) -> str | None:
    """Return a GBNF grammar (root rule ``root``) for the answer format, or None.

    choice: exactly one of the options' letters (A-D when there are none);
    yesno: Yes or No; number: an optional minus, digits and an optional decimal
    part; short: one to five words; free: None, no constraint.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown answer format {fmt!r}", hint=f"use one of: auto, {', '.join(FORMATS)}")
    if fmt == "choice":
        return _choice_grammar(options)
    if fmt == "yesno":
        return _YESNO
    if fmt == "number":
        return _NUMBER
    if fmt == "short":
        return _SHORT
    return None


def _choice_grammar(options: dict[str, str] | None) -> str:
    # Only single capital letters reach the grammar: anything else would need
    # escaping and cannot be an option letter from parse_options anyway.
    letters = sorted(
        {k.upper() for k in (options or {}) if len(k) == 1 and k.upper() in string.ascii_uppercase}
    )
    alternatives = " | ".join(f'"{letter}"' for letter in letters or DEFAULT_CHOICE_LETTERS)
    return f"root ::= {alternatives}\n"
