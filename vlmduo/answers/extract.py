"""Answers out of model text: the final answer a reply or a reasoning holds.

Pure logic with no model calls: the agents read their own answers with it (the small
model's out of its reasoning), and ``agree`` compares what it extracts.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

from vlmduo.answers.formats import check_format, option_letters

_YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "true", "correct", "right", "affirmative"})
_NO_WORDS = frozenset({"no", "nope", "nah", "false", "incorrect", "wrong", "negative"})

_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)}
_NUMBER_WORDS.update({w: 20 + 10 * i for i, w in enumerate(_TENS)})
_MULTIPLIERS = {"hundred": 100, "dozen": 12}
_SCALES = {"thousand": 1000, "million": 1_000_000}
_NUMWORD = "|".join(sorted([*_NUMBER_WORDS, *_MULTIPLIERS, *_SCALES], key=len, reverse=True))

# A digit number; a comma only counts as a thousands separator before exactly
# three digits, so "1, 2, 3" stays three numbers while "1,234" is one.
_DIGITS_RE = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")
_WORDS_RE = re.compile(rf"\b(?:{_NUMWORD})(?:(?:[\s-]+and)?[\s-]+(?:{_NUMWORD}))*\b", re.IGNORECASE)
# "1. " or "2) " at the start of a line is a list item, not a count.
_LIST_MARKER_RE = re.compile(r"^\s*\d+[.)]\s", re.MULTILINE)

# Phrases that introduce a final answer; what follows them (to the end of the
# line) is the answer span.
_MARKER_RE = re.compile(
    r"(?:\banswer(?:\s+to\s+(?:the|this)\s+question)?"
    r"|\b(?:correct|right|best|final|most\s+(?:likely|appropriate|accurate))\s+"
    r"(?:option|choice|letter|response))"
    r"[*_\s]*"
    r"(?:(?:is|would\s+be|should\s+be|will\s+be|must\s+be|seems\s+to\s+be)\b"
    r"(?:\s+(?:therefore|thus|then|clearly|probably|likely|definitely))?\s*:?|[:=])",
    re.IGNORECASE,
)
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,80})\*\*|__([^_\n]{1,80})__")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")

# Words that cannot follow the article "a", so "A because ..." names option A.
_NOT_AFTER_ARTICLE = frozenset(
    "because since as is was and or but so which with given here there seems".split()
)


def _words_value(words: str) -> int:
    total, current = 0, 0
    for word in re.split(r"[\s-]+", words.lower()):
        if word in _NUMBER_WORDS:
            current += _NUMBER_WORDS[word]
        elif word in _MULTIPLIERS:
            current = max(current, 1) * _MULTIPLIERS[word]
        elif word in _SCALES:
            total += max(current, 1) * _SCALES[word]
            current = 0
    return total + current


def _canonical(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _is_pronoun_one(text: str, start: int, end: int) -> bool:
    """True for "one" used as a pronoun ("the one on the left"), not as a count."""
    before = text[max(0, start - 12) : start].lower().split()
    after = text[end : end + 12].lower().split()
    return bool(
        (before and before[-1] in {"the", "this", "that", "which", "each", "any", "every"})
        or (after and after[0].strip(",.") in {"of", "on", "in", "at", "that", "which"})
    )


def _numbers(text: str) -> list[tuple[int, Decimal, bool]]:
    """All numbers in ``text`` as (position, value, written in digits), in order."""
    found: list[tuple[int, Decimal, bool]] = []
    list_items = {m.end() - 2 for m in _LIST_MARKER_RE.finditer(text)}
    for m in _DIGITS_RE.finditer(text):
        if m.end() in list_items:
            continue
        found.append((m.start(), Decimal(m.group().replace(",", "").replace("\u2212", "-")), True))
    for m in _WORDS_RE.finditer(text):
        if m.group().lower() == "one" and _is_pronoun_one(text, m.start(), m.end()):
            continue
        found.append((m.start(), Decimal(_words_value(m.group())), False))
    return sorted(found, key=lambda item: item[0])


def strip_markup(text: str) -> str:
    """Drop LaTeX boxes, markdown emphasis, quotes and surrounding whitespace."""
    text = _TEXT_CMD_RE.sub(r"\1", text)
    text = _BOXED_RE.sub(r"\1", text)
    text = re.sub(r"[*_`$]+", "", text)
    return text.strip().strip("\"'\u201c\u201d\u2018\u2019").strip()


def _explicit_spans(text: str) -> list[tuple[int, str, bool]]:
    """Answer spans introduced by markers, as (position, span, strict).

    A strict span (bold text) counts only when the whole span is an answer,
    because models also bold headings such as "**Step 1: count the cats**".
    """
    spans: list[tuple[int, str, bool]] = []
    for m in _MARKER_RE.finditer(text):
        spans.append((m.start(), text[m.end() :].split("\n", 1)[0][:200], False))
    for m in _BOXED_RE.finditer(text):
        spans.append((m.start(), m.group(1), False))
    for m in _BOLD_RE.finditer(text):
        spans.append((m.start(), m.group(1) or m.group(2), True))
    return spans


def _first_sentence(span: str) -> str:
    span = strip_markup(span)
    return re.split(r"(?<=[^\s.]{2})[.!?](?:\s|$)|\n", span, maxsplit=1)[0].strip()


def _match_option_text(text: str, options: dict[str, str] | None, whole: bool) -> str | None:
    """The letter whose option text equals (``whole``) or is mentioned in ``text``."""
    if not options:
        return None
    norm = normalize_text(text) or ""
    best: tuple[int, int, str] | None = None
    for letter, option in options.items():
        opt = normalize_text(option)
        if not opt:
            continue
        if whole:
            if norm == opt:
                return letter
            continue
        for m in re.finditer(rf"(?<!\S){re.escape(opt)}(?!\S)", norm):
            # Last mention wins; a longer option wins a tie ("red car" over "car").
            key = (m.end(), len(opt), letter)
            negated = re.search(r"\b(?:not|no|isnt|arent|wasnt|cant|dont|doesnt)\s*$", norm[: m.start()])
            if not negated and (best is None or key > best):
                best = key
    return best[2] if best else None


def parse_choice(span: str, options: dict[str, str] | None, strict: bool) -> str | None:
    letters = option_letters(options)
    text = strip_markup(span)
    text = re.sub(r"^(?:option|choice|letter)\s*", "", text, flags=re.IGNORECASE)
    m = re.match(r"[(\[]?([A-Za-z])[)\]]?(?=$|[^\w'])(.*)", text, re.DOTALL)
    valid = bool(m) and m.group(1).upper() in letters  # type: ignore[union-attr]
    # A lone valid letter is that option, even when another option's text is that
    # letter ("Which letter is on the sign? A. B  B. D": "B" is option B).
    if valid and m and not m.group(2).strip(" .):]!"):
        return m.group(1).upper()
    by_text = _match_option_text(_first_sentence(text), options, whole=True)
    if by_text:
        return by_text
    if valid and m:
        letter, rest = m.group(1), m.group(2)
        upper = letter.upper()
        alone = not rest.strip(" .):]!")
        separated = text[0] in "([" or re.match(r"\s*[.):,;\-\u2013]", rest)
        own_text = bool(options) and normalize_text(rest) == normalize_text(options[upper])
        if alone or separated or own_text:
            return upper
        # "A" before a lowercase word is the article ("A cat is..."), not option A.
        if not strict and letter.isupper() and not (upper == "A" and _article_follows(rest)):
            return upper
    if strict:
        return None
    return _match_option_text(_first_sentence(text), options, whole=False)


def _article_follows(rest: str) -> bool:
    """True when "A" + ``rest`` reads as the article before a word ("A cat ...")."""
    m = re.match(r"\s+([a-z]+)", rest)
    return bool(m) and m.group(1) not in _NOT_AFTER_ARTICLE


def parse_yesno(span: str, strict: bool) -> str | None:
    words = re.findall(r"[a-z']+", strip_markup(span).lower())
    if not words or (strict and len(words) > 12):
        return None
    if words[0] in _YES_WORDS:
        return "yes"
    if words[0] in _NO_WORDS:
        return "no"
    return None


def parse_number(span: str, strict: bool) -> str | None:
    text = strip_markup(span)
    if re.match(r"(?:none|no|zero|nothing)\b", text, re.IGNORECASE):
        return "0"
    found = _numbers(text)
    if not found:
        return None
    # A strict (bold) span must be just the number, with at most a unit or a noun.
    if strict and (found[0][0] > 2 or len(text.split()) > 3):
        return None
    return _canonical(found[0][1])


def _parse_text(span: str, strict: bool) -> str | None:
    text = _first_sentence(span)
    if strict and text.endswith(":"):
        return None  # a bold heading such as "**Answer:**", not an answer
    text = text.rstrip(":;,").strip()
    if not text or (strict and len(text.split()) > 5) or text.lower().startswith("not "):
        return None
    return text


def _parse_span(span: str, fmt: str, options: dict[str, str] | None, strict: bool) -> str | None:
    if fmt == "choice":
        return parse_choice(span, options, strict)
    if fmt == "yesno":
        return parse_yesno(span, strict)
    if fmt == "number":
        return parse_number(span, strict)
    return _parse_text(span, strict)


def _fallback_choice(text: str, options: dict[str, str] | None) -> str | None:
    letters = option_letters(options)
    whole = parse_choice(text, options, strict=True) if len(text) <= 80 else None
    if whole:
        return whole
    found: list[tuple[int, str]] = []
    patterns = (
        r"\(([A-Z])\)",
        r"\b(?:option|choice|letter)\s*\(?([A-Z])\b",
        r"\b(?:it's|it\s+is|is|be|choose|pick|select|go\s+with)\s+\(?([A-Z])\)?(?=$|[\s.,;:!)])",
        r"\b(?:so|thus|therefore|hence)[,:]?\s+\(?([A-Z])\)?(?=$|[\s.,;:!)])",
        r"^[\s*]*([A-Z])(?:$|[.):]\s)",
        r"(?<=\s)([A-Z])[.!]?\s*\Z",
    )
    for pattern in patterns:
        for m in re.finditer(pattern, text, re.MULTILINE):
            rest = text[m.end() :]
            if m.group(1) in letters and not (m.group(1) == "A" and _article_follows(rest)):
                found.append((m.start(1), m.group(1)))
    by_text = _match_option_text(text, options, whole=False)
    if by_text and options:
        # Whichever comes last, a letter or an option's text, is the conclusion.
        text_pos = text.lower().rfind(options[by_text].lower().strip())
        found.append((text_pos if text_pos >= 0 else len(text), by_text))
    return max(found)[1] if found else None


def _fallback_yesno(text: str) -> str | None:
    found: list[tuple[int, str]] = []
    first = parse_yesno(text, strict=False)
    if first:
        found.append((0, first))
    # A yes/no that ends a clause ("No.", "Yes, ...", "so, yes!") is an answer;
    # one inside a sentence ("I see no reason") is not.
    for m in re.finditer(r"\b(yes|yeah|yep|no|nope)\b(?=\s*(?:[,.!;:)\]*]|$))", text, re.I):
        found.append((m.start(), "yes" if m.group(1).lower() in _YES_WORDS else "no"))
    return max(found)[1] if found else None


def _fallback_number(text: str) -> str | None:
    found = _numbers(text)
    digits = [item for item in found if item[2]]
    # Digits are less ambiguous than words, so the last digit number wins.
    chosen = digits[-1] if digits else (found[-1] if found else None)
    return _canonical(chosen[1]) if chosen else None


def _fallback_text(text: str, fmt: str) -> str | None:
    text = strip_markup(text)
    if fmt == "free" or len(text.split()) <= 8:
        return text.rstrip(".").strip() or None
    lines = [line for line in text.splitlines() if line.strip()]
    sentences = re.split(r"(?<=[.!?])\s+", lines[-1].strip()) if lines else []
    last = strip_markup(sentences[-1]).rstrip(".!").strip() if sentences else ""
    return last or None


def _final_text(text: str) -> str:
    """The reply after the model's thinking block, or everything if that is empty."""
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1].strip()
        if after:
            return after
    return re.sub(r"</?think>", "", text).strip()


def _extract_from(text: str, fmt: str, options: dict[str, str] | None) -> str | None:
    candidates = []
    for pos, span, strict in _explicit_spans(text):
        value = _parse_span(span, fmt, options, strict)
        if value is not None:
            candidates.append((pos, value))
    if candidates:
        # The last explicit answer wins: models revise themselves ("wait, ...").
        return max(candidates, key=lambda c: c[0])[1]
    if fmt == "choice":
        return _fallback_choice(text, options)
    if fmt == "yesno":
        return _fallback_yesno(text)
    if fmt == "number":
        return _fallback_number(text)
    return _fallback_text(text, fmt)


def extract_answer(text: str, fmt: str, options: dict[str, str] | None = None) -> str | None:
    """Pull the final answer out of a model's free-text reply.

    Explicit markers ("The answer is B", "Answer: 3", ``\\boxed{B}``, "**Yes**")
    win over the last plain mention, and the last explicit marker wins. Returns the
    answer as written (a letter for "choice", "yes"/"no", a canonical number), or
    None when nothing recognisable is there.
    """
    check_format(fmt)
    final = _final_text(text)
    if not final:
        return None
    answer = _extract_from(final, fmt, options)
    if answer is None and final != text.strip() and fmt != "free":
        # The answer may sit inside the thinking block when the tail has none.
        answer = _extract_from(re.sub(r"</?think>", "", text), fmt, options)
    return answer


def normalize_text(answer: str) -> str | None:
    """Lowercase words for comparing texts: number words as digits ("two" -> "2"),
    thousands separators dropped, punctuation and symbols dropped (but the "." and ":"
    between digits: "3.5", "10:10"), hyphens as spaces, no articles."""
    text = unicodedata.normalize("NFKC", answer).lower().replace("-", " ")
    text = _WORDS_RE.sub(lambda m: _number_word(text, m), text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    kept = []
    for i, ch in enumerate(text):
        if ch.isspace():
            kept.append(" ")
        elif unicodedata.category(ch).startswith(("P", "S")):
            between_digits = ch in ".:" and text[i - 1 : i].isdigit() and text[i + 1 : i + 2].isdigit()
            if between_digits:
                kept.append(ch)
        else:
            kept.append(ch)
    words = [w for w in "".join(kept).split() if w not in {"a", "an", "the"}]
    return " ".join(words) or None


def _number_word(text: str, m: re.Match[str]) -> str:
    if m.group().lower() == "one" and _is_pronoun_one(text, m.start(), m.end()):
        return m.group()
    return str(_words_value(m.group()))


def constrained_answer(text: str, fmt: str) -> str | None:
    """A reply the format's grammar held as the answer: as generated, without the space
    its first token carried and, for a number, without the period ending its sentence."""
    answer = text.strip()
    if fmt == "number" and answer.endswith("."):
        answer = answer[:-1]
    return answer or None
