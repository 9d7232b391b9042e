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

# Every grammar lets the answer begin with the space a byte-level BPE merges into its
# first word: after "Answer:" Qwen's tokenizer writes " B" as one token (425), and a
# grammar without the space would force the pair " ", "B" the model rarely produced (and
# skew the answer's probability). The agents strip the answer.
_SPACE = '" "?'

_YESNO = f'root ::= {_SPACE} ("Yes" | "No" | "yes" | "no")\n'

# An optional sign, an integer (thousands separated by commas or not, no leading zeros),
# an optional decimal part, an optional percent sign, and the period that may end the
# sentence: at most 18 characters.
_NUMBER = (
    f'root ::= {_SPACE} [-+]? integer fraction? "%"? "."?\n'
    'integer ::= "0" | [1-9] [0-9]{0,8} | [1-9] [0-9]{0,2} ("," [0-9]{3}){1,2}\n'
    'fraction ::= "." [0-9]{1,4}\n'
)

# Any printable text on one line, any script: times ("10:10"), prices ("$3.99"), URLs,
# names with punctuation ("St. Louis", "AT&T"). It starts with a visible character and
# holds at most 80; max_answer_tokens bounds it first. The classes name valid code points
# only: llama.cpp's grammar reads a lead byte such as 0xF6 as a code point beyond U+10FFFF,
# which a class that merely excludes the controls would let through.
SHORT_MAX_CHARS = 80
_UNICODE = r"\u00A0-\uD7FF\uE000-\uFFFD\U00010000-\U0010FFFF"
_SHORT = f"root ::= {_SPACE} [!-~{_UNICODE}] char{{0,{SHORT_MAX_CHARS - 1}}}\nchar ::= [ -~{_UNICODE}]\n"


def grammar_for(fmt: str, options: dict[str, str] | None = None) -> str | None:
    """Return a GBNF grammar (root rule ``root``) for the answer format, or None.

    choice: exactly one of the options' letters (A-D when there are none);
    yesno: Yes or No; number: a signed integer or decimal, with thousands separators, a
    percent sign and a final period allowed; short: one line of printable text; free:
    None, no constraint. Each may begin with a space (see ``_SPACE``).
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
    return f"root ::= {_SPACE} ({alternatives})\n"
