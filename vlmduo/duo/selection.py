"""Key-reasoning selection: pick the part of the small model's reasoning to transfer.

The small agent reasons in free text; when the two agents disagree, the pipeline
inserts the key part of that reasoning into the large agent's response. Which
part, and how much, is decided here from what generation already produced (the
token strings and their log-probabilities), so selection costs no model call.

The budget is a hard cap counted in the large model's tokenizer (``count_tokens``)
because those are the tokens the large model will prefill; every candidate text
is counted as it will be rendered rather than estimated from its parts, since
tokenizers are not additive across joins.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SELECTORS = ("full", "tail", "steps", "surprisal")

# A cut on a step boundary is preferred when it keeps at least this share of
# the tokens a cut on the nearest token boundary would keep.
_NEAR_STEP = 0.75
# How many tokens a cut may move to land between words instead of inside one.
_WORD_BACKOFF = 3
# Weight of each question term shared with a step in the surprisal ranking:
# small next to the gap between predictable (~0.1 nats) and surprising steps.
_SURPRISAL_TERM_WEIGHT = 0.2
# -logprob is clamped so a single -inf token cannot swamp a step's mean.
_MAX_SURPRISAL = 30.0

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_STEP_MARKER = re.compile(r"\bStep\s+\d+\s*[:.)]", re.IGNORECASE)
# "1." / "A." / "(b)" opening a step is a list label, not the end of a sentence.
_LIST_LABEL = re.compile(r"\(?(?:\d+|[A-Za-z])[.)]")
_ABBREVIATIONS = frozenset(
    {"e.g.", "i.e.", "vs.", "cf.", "approx.", "etc.", "mr.", "mrs.", "ms.", "dr.", "st.", "fig."}
)

_HEDGE = re.compile(
    r"\b(?:hmm+|wait|maybe|perhaps|alternatively|i'?m not sure|i am not sure|not sure"
    r"|let me (?:think|see|double[- ]?check|check again|re-?check|verify|reconsider"
    r"|re-?examine|look again)|double[- ]?check|on second thought|hold on|actually"
    r"|i guess|or maybe|no wait)\b",
    re.IGNORECASE,
)
_CORRECTION = re.compile(
    r"\b(?:that'?s (?:not right|wrong|incorrect)|i made a mistake|let me correct"
    r"|scratch that|doesn'?t (?:seem|look) right|i was wrong|my mistake)\b",
    re.IGNORECASE,
)
# "No, ..." opening a step usually retracts the step before; milder than a hedge
# because a yes/no conclusion can open the same way.
_RETRACTION = re.compile(r"^(?:no|nope|oh|oops),", re.IGNORECASE)
_FILLER = re.compile(
    r"^(?:okay|ok|alright|all right|got it|sure|great|hello|hi|first,? let(?:'s| me)"
    r"|let'?s (?:see|start|begin|look|analyze|break)|so,? let'?s"
    r"|the user (?:is asking|asks|wants)|the question (?:is asking|asks|is)"
    r"|i need to (?:figure out|determine|find|answer|look))\b",
    re.IGNORECASE,
)
_CONCLUSION = re.compile(
    r"^(?:so|therefore|thus|hence|in conclusion|overall|finally|final answer)\b"
    r"|\bthe (?:final |correct )?answer\b|\banswer\s*(?:is|:)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"\d")
_NUMBER_WORD = re.compile(
    r"\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
    r"|dozen|twice|half|double|triple)\b",
    re.IGNORECASE,
)
_COMPARISON_SYMBOL = re.compile(r"[=<>≤≥≠]")
_COMPARISON_WORDS = frozenset(
    "more less fewer larger smaller bigger taller shorter higher lower greater "
    "left right above below than same equal most least largest smallest biggest "
    "between behind front under over".split()
)
_QUOTED = re.compile(r"[\"“][^\"”]{1,60}[\"”]")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with as and or but if is are was were be been "
    "being do does did what which who whom whose where when why how many much there "
    "this that these those it its it's i me my we you your they them their he she his "
    "her can could would should will shall may might must not no yes any some all each "
    "image picture photo shown show shows visible see seen look looks question answer "
    "option options choose select following based please about into than then so "
    "let let's think".split()
)


@dataclass(frozen=True)
class Step:
    """One sentence or reasoning step of the small model's reasoning."""

    text: str
    start: int  # char offsets into the joined reasoning text
    end: int
    first_token: int  # index range into pieces (tokens) covering the step
    last_token: int  # exclusive


@dataclass(frozen=True)
class Selection:
    """The reasoning chosen for transfer and its size in the large model's tokens."""

    selector: str
    text: str
    tokens: int  # tokens of `text`, counted with count_tokens (or pieces when None)


Span = tuple[int, int]


def split_steps(text: str, pieces: Sequence[str] | None = None) -> list[Step]:
    """Split reasoning text into steps: sentences, lines, bullets and "Step N:" parts.

    Sentence ends are ``.``, ``!`` or ``?`` followed by whitespace, except in
    decimals, abbreviations such as "e.g." and list labels such as "A." or "2.".
    With ``pieces`` (whose concatenation must be ``text``) each step carries the
    range of pieces that covers it; without, each character counts as a piece.
    """
    if pieces is None:
        offsets = list(range(len(text) + 1))
    else:
        if "".join(pieces) != text:
            raise ValueError("pieces do not concatenate to the reasoning text")
        offsets = _piece_offsets(pieces)
    starts = offsets[:-1]
    steps = []
    cuts = [0, *_boundaries(text), len(text)]
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        segment = text[lo:hi]
        stripped = segment.strip()
        if not stripped:
            continue
        start = lo + (len(segment) - len(segment.lstrip()))
        end = start + len(stripped)
        first = bisect_right(starts, start) - 1
        last = bisect_left(starts, end)
        steps.append(Step(stripped, start, end, first, last))
    return steps


def select_key_reasoning(
    pieces: Sequence[str],
    logprobs: Sequence[float] | None,
    question: str,
    selector: str,
    budget: int,
    count_tokens: Callable[[str], int] | None = None,
    *,
    truncated: bool = False,
) -> Selection:
    """Choose the key reasoning to transfer, at most ``budget`` tokens long.

    ``truncated`` says the think budget cut the reasoning: its unfinished last step
    (a sentence or line the cut left dangling) is never transferred, whatever the
    selector (every selector favours the end, where the fragment is).

    ``pieces`` are the small model's generated tokens (thinking markers removed)
    and ``logprobs[i]`` the log-probability it gave ``pieces[i]``. Tokens are
    counted with ``count_tokens`` (the large model's tokenizer) or, when it is
    None, as the pieces the text covers. ``selector`` is one of ``SELECTORS``:
    ``full`` (from the start), ``tail`` (the end), ``steps`` (scored steps) or
    ``surprisal`` (the least predictable steps; needs ``logprobs``).

    Raises ValueError for an unknown selector, a negative budget, or logprobs
    that are missing (surprisal) or not one per piece.
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if logprobs is not None and len(logprobs) != len(pieces):
        raise ValueError(f"{len(logprobs)} logprobs for {len(pieces)} pieces")
    if selector == "surprisal" and logprobs is None:
        raise ValueError("the surprisal selector needs the small model's logprobs")
    if truncated:
        pieces, logprobs = drop_unfinished(pieces, logprobs)
    text = "".join(pieces)
    counter = _Counter(text, _piece_offsets(pieces), count_tokens)
    if budget == 0 or not text.strip():
        return Selection(selector, "", 0)
    if selector == "full":
        spans = [_select_full(text, counter, budget)]
    elif selector == "tail":
        spans = [_select_tail(text, counter, budget)]
    else:
        steps = split_steps(text, pieces)
        if selector == "steps":
            order = _rank_by_score(steps, question)
        else:
            assert logprobs is not None  # checked above; narrows the type
            order = _rank_by_surprisal(steps, logprobs, question)
        spans = _select_ranked(steps, order, counter, budget)
    return Selection(selector, counter.render(spans), counter.cost(spans))


def drop_unfinished(
    pieces: Sequence[str], logprobs: Sequence[float] | None = None
) -> tuple[list[str], list[float] | None]:
    """The reasoning up to the end of its last complete step (a sentence end or a line
    break), as pieces and their log-probabilities: all of it when it ends complete,
    nothing when not one step was finished."""
    text = "".join(pieces)
    if not text.strip():
        return [], None if logprobs is None else []
    cuts = [cut for cut in _boundaries(text) if text[:cut].strip()]
    if not cuts:
        return [], None if logprobs is None else []
    if not text[cuts[-1] :].strip():
        return list(pieces), None if logprobs is None else list(logprobs)
    end, kept, offset = cuts[-1], [], 0
    for piece in pieces:
        if offset >= end:
            break
        kept.append(piece[: end - offset])
        offset += len(piece)
    return kept, None if logprobs is None else list(logprobs[: len(kept)])


class _Counter:
    """Renders spans of the reasoning and counts their tokens the way the caller does."""

    def __init__(self, text: str, offsets: list[int], count_tokens: Callable[[str], int] | None) -> None:
        self.text = text
        self.offsets = offsets  # piece start offsets, then len(text)
        self.starts = offsets[:-1]
        self.count_tokens = count_tokens

    def render(self, spans: Sequence[Span]) -> str:
        """The transferred text: each span stripped, spans joined by single spaces."""
        parts = (self.text[lo:hi].strip() for lo, hi in spans)
        return " ".join(part for part in parts if part)

    def cost(self, spans: Sequence[Span]) -> int:
        """Tokens of ``render(spans)``; without a tokenizer, the pieces it touches."""
        rendered = self.render(spans)
        if not rendered:
            return 0
        if self.count_tokens is not None:
            return self.count_tokens(rendered)
        starts = self.starts
        total = 0
        for lo, hi in spans:
            segment = self.text[lo:hi]
            if not segment.strip():
                continue
            lo += len(segment) - len(segment.lstrip())
            hi -= len(segment) - len(segment.rstrip())
            total += bisect_left(starts, hi) - (bisect_right(starts, lo) - 1)
        return total


def _piece_offsets(pieces: Sequence[str]) -> list[int]:
    """Start offset of each piece in the joined text, then the total length."""
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return offsets


def _boundaries(text: str) -> list[int]:
    """Char offsets where one step ends and the next begins."""
    cuts = sorted(
        {m.start() for m in re.finditer(r"\n", text)} | {m.start() for m in _STEP_MARKER.finditer(text)}
    )
    for match in _SENTENCE_END.finditer(text):
        word_start = max(text.rfind(c, 0, match.start()) for c in " \t\n") + 1
        word = text[word_start : match.end()].lstrip("(\"'“").lower()
        if word in _ABBREVIATIONS:
            continue
        before = bisect_right(cuts, word_start) - 1
        previous = cuts[before] if before >= 0 else 0
        opens_step = not text[previous:word_start].strip()
        if opens_step and _LIST_LABEL.fullmatch(word):
            continue
        following = text[match.end() :].lstrip()
        # A lowercase continuation means the period was not a sentence end:
        # an option label mid-line ("apple B. watermelon") or an abbreviation.
        if match.group().startswith(".") and following[:1].islower():
            continue
        insort(cuts, match.end())
    return cuts


def _select_full(text: str, counter: _Counter, budget: int) -> Span:
    """The longest prefix within budget, cut on a step boundary when one is near."""
    whole = (0, len(text))
    if counter.cost([whole]) <= budget:
        return whole
    cut = _fit_prefix(counter, 0, len(text), budget)
    if cut == 0:
        return (0, 0)
    ends = [step.end for step in split_steps(text) if step.end <= cut]
    if ends and counter.cost([(0, ends[-1])]) >= _NEAR_STEP * counter.cost([(0, cut)]):
        return (0, ends[-1])
    # Otherwise cut between words if a word boundary is a few pieces back.
    index = counter.offsets.index(cut)
    for back in range(index, max(index - _WORD_BACKOFF, 0) - 1, -1):
        boundary = counter.offsets[back]
        if boundary > 0 and (text[boundary - 1].isspace() or text[boundary : boundary + 1].isspace()):
            return (0, boundary)
    return (0, cut)


def _select_tail(text: str, counter: _Counter, budget: int) -> Span:
    """The longest suffix within budget, starting on a step boundary when one is near."""
    whole = (0, len(text))
    if counter.cost([whole]) <= budget:
        return whole
    cut = _fit_suffix(counter, 0, len(text), budget)
    if cut == len(text):
        return (cut, cut)
    starts = [step.start for step in split_steps(text) if step.start >= cut]
    end = len(text)
    if starts and counter.cost([(starts[0], end)]) >= _NEAR_STEP * counter.cost([(cut, end)]):
        return (starts[0], end)
    index = counter.offsets.index(cut)
    for ahead in range(index, min(index + _WORD_BACKOFF, len(counter.offsets) - 1) + 1):
        boundary = counter.offsets[ahead]
        if boundary < end and (text[boundary].isspace() or text[boundary - 1].isspace()):
            return (boundary, end)
    return (cut, end)


def _fit_prefix(counter: _Counter, start: int, end: int, budget: int) -> int:
    """The furthest piece boundary ``c`` in (start, end] with [start, c) within budget.

    Returns ``start`` when not even one piece fits.
    """
    bounds = [o for o in counter.offsets if start < o < end] + [end]
    lo, hi = 0, len(bounds)  # bounds[:lo] fit (by binary search), bounds[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if counter.cost([(start, bounds[mid])]) <= budget:
            lo = mid + 1
        else:
            hi = mid
    # Tokenizers are not strictly monotone under truncation; walk back until it fits.
    for index in range(lo - 1, -1, -1):
        if counter.cost([(start, bounds[index])]) <= budget:
            return bounds[index]
    return start


def _fit_suffix(counter: _Counter, start: int, end: int, budget: int) -> int:
    """The earliest piece boundary ``c`` in [start, end) with [c, end) within budget.

    Returns ``end`` when not even one piece fits.
    """
    bounds = [start] + [o for o in counter.offsets if start < o < end]
    lo, hi = 0, len(bounds)  # bounds[hi:] fit, bounds[:lo] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if counter.cost([(bounds[mid], end)]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    for index in range(hi, len(bounds)):
        if counter.cost([(bounds[index], end)]) <= budget:
            return bounds[index]
    return end


def _select_ranked(steps: Sequence[Step], order: Sequence[int], counter: _Counter, budget: int) -> list[Span]:
    """Keep steps in rank order while the rendered text fits; output in text order."""
    chosen: list[int] = []
    for index in order:
        trial = sorted([*chosen, index])
        if counter.cost([(steps[i].start, steps[i].end) for i in trial]) <= budget:
            chosen = trial
    if chosen or not order:
        return [(steps[i].start, steps[i].end) for i in chosen]
    # Not one whole step fits: a truncated best step beats transferring nothing.
    best = steps[order[0]]
    return [(best.start, _fit_prefix(counter, best.start, best.end, budget))]


def _content_words(text: str) -> set[str]:
    """Lowercased words minus stopwords, with a plural "s" stripped, for overlap tests."""
    words = set()
    for word in _WORD.findall(text.lower()):
        # Single letters stay: in a multiple-choice question they are the options.
        if word in _STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.add(word)
    return words


def _is_chatter(text: str) -> bool:
    """Hedging or self-correction: the model talking to itself, not about the image."""
    return bool(_HEDGE.search(text) or _CORRECTION.search(text))


def _conclusion_index(steps: Sequence[Step]) -> int | None:
    """The concluding step: the last with a conclusion cue, else the last non-hedge."""
    for index in range(len(steps) - 1, -1, -1):
        if _CONCLUSION.search(steps[index].text) and not _is_chatter(steps[index].text):
            return index
    for index in range(len(steps) - 1, -1, -1):
        if not _is_chatter(steps[index].text):
            return index
    return len(steps) - 1 if steps else None


def _score_step(step: Step, position_from_end: int, question_terms: set[str]) -> float:
    """Heuristic value of one step for the large model (<= 0 means drop it)."""
    text = step.text
    score = 1.0
    if _HEDGE.search(text):
        score -= 4.0
    if _CORRECTION.search(text):
        score -= 4.0
    if _RETRACTION.search(text):
        score -= 2.0
    if _FILLER.search(text):
        score -= 3.0
    if _NUMBER.search(text):
        score += 2.0
    elif _NUMBER_WORD.search(text):
        score += 1.0
    words = set(_WORD.findall(text.lower()))
    comparisons = len(words & _COMPARISON_WORDS) + len(_COMPARISON_SYMBOL.findall(text))
    score += min(comparisons, 2)
    score += 1.5 * min(len(_content_words(text) & question_terms), 3)
    if _QUOTED.search(text):
        score += 1.0  # quoted text is usually something read off the image
    if _CONCLUSION.search(text):
        score += 3.0
    score += {0: 2.0, 1: 1.0}.get(position_from_end, 0.0)
    if len(words) < 3 and not _NUMBER.search(text):
        score -= 1.0
    return score


def _is_repeat(words: set[str], norm: str, kept: Sequence[tuple[set[str], str]]) -> bool:
    """Whether a step says nothing that an earlier kept step did not already say."""
    for kept_words, kept_norm in kept:
        if norm == kept_norm:
            return True
        if len(words) >= 3 and len(words & kept_words) >= 0.8 * len(words):
            return True
    return False


def _rank_by_score(steps: Sequence[Step], question: str) -> list[int]:
    """Indices of the steps worth keeping, best first; hedges and repeats left out."""
    question_terms = _content_words(question)
    kept: list[tuple[set[str], str]] = []
    scored: list[tuple[float, int]] = []
    for index, step in enumerate(steps):
        score = _score_step(step, len(steps) - 1 - index, question_terms)
        if score <= 0:
            continue
        words = _content_words(step.text)
        norm = " ".join(_WORD.findall(step.text.lower()))
        if _is_repeat(words, norm, kept):
            continue
        kept.append((words, norm))
        scored.append((score, index))
    # Ties go to the later step, which is nearer the conclusion.
    return [index for _, index in sorted(scored, key=lambda item: (-item[0], -item[1]))]


def _rank_by_surprisal(steps: Sequence[Step], logprobs: Sequence[float], question: str) -> list[int]:
    """Indices of steps, the concluding one first, then by mean surprisal, highest first."""
    question_terms = _content_words(question)
    scored: list[tuple[float, int]] = []
    for index, step in enumerate(steps):
        values = logprobs[step.first_token : step.last_token]
        if not values:
            continue
        surprisal = sum(_surprisal(lp) for lp in values) / len(values)
        shared = len(_content_words(step.text) & question_terms)
        scored.append((surprisal + _SURPRISAL_TERM_WEIGHT * min(shared, 3), index))
    order = [index for _, index in sorted(scored, key=lambda item: (-item[0], item[1]))]
    conclusion = _conclusion_index(steps)
    if conclusion in order:
        order.remove(conclusion)
        order.insert(0, conclusion)
    return order


def _surprisal(logprob: float) -> float:
    """-logprob in nats, clamped to [0, _MAX_SURPRISAL]; NaN counts as unsurprising."""
    if math.isnan(logprob):
        return 0.0
    return min(max(-logprob, 0.0), _MAX_SURPRISAL)
