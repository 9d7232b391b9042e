"""Table-driven tests for key-reasoning selection (pure logic, no model)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest

from vlmduo.duo.selection import SELECTORS, Selection, drop_unfinished, select_key_reasoning, split_steps

# Realistic small-model reasoning traces, with the question each one answers.
TRACES: dict[str, tuple[str, str]] = {
    "count": (
        "How many apples are on the table?",
        "Got it, let's see. The question asks how many apples are on the table. "
        "I can see 3 red apples on the left side. There is also 1 green apple near the "
        "plate. Hmm, wait, let me double-check the corner. Maybe there's another one "
        "behind the bowl. No, that's the bowl's shadow. So there are 3 red apples and 1 "
        "green apple. Therefore, the total is 4 apples.",
    ),
    "sizes": (
        "Which animal is bigger, the dog or the cat?",
        "Okay, let me think about this.\n"
        "The dog is on the left and the cat is on the right.\n"
        "The dog looks larger than the cat, about 2 times its height.\n"
        "Wait, maybe the cat is closer to the camera?\n"
        "No, both stand at the same distance from the fence.\n"
        "The dog looks larger than the cat.\n"
        "So the dog is bigger.",
    ),
    "sign": (
        "What does the sign above the door say?",
        "Step 1: Find the sign in the image. Step 2: The sign above the door reads "
        '"EXIT 12". Step 3: The letters are white on green, e.g. like a highway sign. '
        "Hmm, I'm not sure if the second digit is 2 or 7. Looking closer, it is a 2 "
        "because of the flat base. The answer is EXIT 12.",
    ),
    "choice": (
        "Which fruit is the largest? A. apple B. watermelon C. grape D. cherry",
        "The question asks which fruit is the largest.\n"
        "Options: A. apple B. watermelon C. grape D. cherry\n"
        "A. An apple is smaller than a watermelon.\n"
        "C. A grape is smaller than an apple.\n"
        "Alternatively, maybe the apple is larger? No.\n"
        "A grape is smaller than an apple.\n"
        "The watermelon is about 30 cm wide, larger than all others.\n"
        "Thus the answer is B.",
    ),
    "price": (
        "Is the left item more expensive than the right one?",
        "The left tag shows $3.50 per pound.\n"
        "The right tag shows $2.75 per pound.\n"
        "Hmm, let me double-check the decimals.\n"
        "Yes, 3.50 is greater than 2.75.\n"
        "So the answer is yes.",
    ),
}

CONCLUSIONS = {
    "count": "Therefore, the total is 4 apples.",
    "sizes": "So the dog is bigger.",
    "sign": "The answer is EXIT 12.",
    "choice": "Thus the answer is B.",
    "price": "So the answer is yes.",
}


def tokenize(text: str) -> list[str]:
    """Word-ish pieces that carry their leading whitespace, like a BPE tokenizer."""
    pieces = re.findall(r"\s*\w+|\s*[^\w\s]|\s+", text)
    assert "".join(pieces) == text
    return pieces


def quarter_chars(text: str) -> int:
    """A large-model tokenizer stand-in: one token per four characters."""
    return math.ceil(len(text) / 4)


def words(text: str) -> int:
    """Another stand-in: one token per whitespace-separated word."""
    return len(text.split())


def flat_logprobs(pieces: list[str]) -> list[float]:
    """Logprobs that vary but single out no step."""
    return [-0.05 - 0.01 * (i % 5) for i in range(len(pieces))]


def surprising(text: str, pieces: list[str], targets: list[str]) -> list[float]:
    """Logprobs that make the steps containing ``targets`` surprising, the rest not."""
    logprobs = flat_logprobs(pieces)
    for step in split_steps(text, pieces):
        if any(target in step.text for target in targets):
            for i in range(step.first_token, step.last_token):
                logprobs[i] = -3.0
    return logprobs


def select(
    name: str,
    selector: str,
    budget: int,
    count_tokens: Callable[[str], int] | None = None,
    logprobs: list[float] | None = None,
) -> Selection:
    question, text = TRACES[name]
    pieces = tokenize(text)
    if logprobs is None:
        logprobs = flat_logprobs(pieces)
    return select_key_reasoning(pieces, logprobs, question, selector, budget, count_tokens)


def step_subsequence(selected: str, text: str) -> list[str] | None:
    """The steps of ``text`` whose space-join is ``selected``, in order, or None."""
    chosen, rest = [], selected
    for step in split_steps(text):
        if rest == step.text or rest.startswith(step.text + " "):
            chosen.append(step.text)
            rest = rest[len(step.text) :].lstrip(" ")
    return chosen if not rest else None


# --- splitting ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("It costs 3.5 dollars. That is cheap.", ["It costs 3.5 dollars.", "That is cheap."]),
        ("Use a tool, e.g. a ruler. Then measure.", ["Use a tool, e.g. a ruler.", "Then measure."]),
        ("First line\nSecond line", ["First line", "Second line"]),
        ("- red car\n- blue bus\n* green van", ["- red car", "- blue bus", "* green van"]),
        ("Step 1: look. Step 2: count the cars", ["Step 1: look.", "Step 2: count the cars"]),
        ("Step 1: find it Step 2: count", ["Step 1: find it", "Step 2: count"]),
        (
            "Options: A. cat B. dog\nA. The cat is small.",
            ["Options: A. cat B. dog", "A. The cat is small."],
        ),
        ("1. Count. 2. Compare.", ["1. Count.", "2. Compare."]),
        ("Really? Yes! Done.", ["Really?", "Yes!", "Done."]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("  padded  \n\n  lines  ", ["padded", "lines"]),
    ],
)
def test_split_steps(text: str, expected: list[str]) -> None:
    steps = split_steps(text)
    assert [step.text for step in steps] == expected
    for step in steps:
        assert text[step.start : step.end] == step.text
        assert (step.first_token, step.last_token) == (step.start, step.end)


@pytest.mark.parametrize("name", sorted(TRACES))
def test_split_steps_token_ranges_cover_steps(name: str) -> None:
    text = TRACES[name][1]
    pieces = tokenize(text)
    steps = split_steps(text, pieces)
    assert len(steps) >= 5
    for step in steps:
        assert step.text in "".join(pieces[step.first_token : step.last_token])
    ranges = [(step.first_token, step.last_token) for step in steps]
    assert ranges == sorted(ranges)
    assert ranges[-1][1] == len(pieces)


def test_split_steps_rejects_pieces_that_are_not_the_text() -> None:
    with pytest.raises(ValueError, match="concatenate"):
        split_steps("one two", ["one", " three"])


# --- the budget is a hard cap -------------------------------------------------


@pytest.mark.parametrize("count_tokens", [None, quarter_chars, words])
@pytest.mark.parametrize("budget", [0, 1, 5, 20, 1000])
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("name", sorted(TRACES))
def test_budget_never_exceeded(
    name: str, selector: str, budget: int, count_tokens: Callable[[str], int] | None
) -> None:
    text = TRACES[name][1]
    selection = select(name, selector, budget, count_tokens)
    assert selection.selector == selector
    assert selection.tokens <= budget
    if count_tokens is not None:
        assert selection.tokens == count_tokens(selection.text)
    if budget == 0:
        assert selection == Selection(selector, "", 0)
    if budget == 1000:
        assert selection.text
    if selector in ("full", "tail"):
        assert selection.text in text
    else:  # whole steps in their original order, or a cut of the single best one
        chosen = step_subsequence(selection.text, text)
        cut = any(step.text.startswith(selection.text) for step in split_steps(text))
        assert chosen is not None or cut


# --- full and tail -------------------------------------------------------------


@pytest.mark.parametrize("count_tokens", [None, quarter_chars])
@pytest.mark.parametrize("selector", ["full", "tail"])
@pytest.mark.parametrize("name", sorted(TRACES))
def test_big_budget_returns_everything(
    name: str, selector: str, count_tokens: Callable[[str], int] | None
) -> None:
    assert select(name, selector, 1000, count_tokens).text == TRACES[name][1].strip()


@pytest.mark.parametrize(
    ("name", "budget", "count_tokens", "expected"),
    [
        # A step boundary one piece short of the budget: cut there.
        (
            "count",
            20,
            None,
            "Got it, let's see. The question asks how many apples are on the table.",
        ),
        # No step boundary near: cut between words.
        (
            "choice",
            20,
            None,
            "The question asks which fruit is the largest.\nOptions: A. apple B. watermelon C. grape",
        ),
        ("sign", 10, quarter_chars, "Step 1: Find the sign in the image."),
    ],
)
def test_full_truncates_at_boundaries(
    name: str, budget: int, count_tokens: Callable[[str], int] | None, expected: str
) -> None:
    selection = select(name, "full", budget, count_tokens)
    assert selection.text == expected
    assert TRACES[name][1].startswith(selection.text)


@pytest.mark.parametrize(
    ("name", "budget", "count_tokens", "expected"),
    [
        ("count", 10, None, "Therefore, the total is 4 apples."),
        ("price", 9, None, "So the answer is yes."),
        ("sizes", 14, quarter_chars, "The dog looks larger than the cat.\nSo the dog is bigger."),
        # Mid-step start, but on a word boundary.
        ("count", 5, None, "total is 4 apples."),
    ],
)
def test_tail_returns_the_ending(
    name: str, budget: int, count_tokens: Callable[[str], int] | None, expected: str
) -> None:
    selection = select(name, "tail", budget, count_tokens)
    assert selection.text == expected
    assert TRACES[name][1].endswith(selection.text)


# --- steps -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kept", "dropped"),
    [
        (
            "count",
            ["3 red apples on the left", "1 green apple near", CONCLUSIONS["count"]],
            ["Got it", "Hmm, wait", "Maybe there's", "bowl's shadow"],
        ),
        (
            "sizes",
            ["2 times its height", "on the left", CONCLUSIONS["sizes"]],
            ["let me think", "Wait, maybe", "The dog looks larger than the cat.\n"],
        ),
        (
            "sign",
            ['reads "EXIT 12"', "flat base", CONCLUSIONS["sign"]],
            ["I'm not sure", "Hmm"],
        ),
        (
            "choice",
            ["30 cm wide", "smaller than a watermelon", CONCLUSIONS["choice"]],
            ["Alternatively", "No."],
        ),
        (
            "price",
            ["$3.50", "$2.75", "3.50 is greater than 2.75", CONCLUSIONS["price"]],
            ["double-check"],
        ),
    ],
)
def test_steps_drops_chatter_and_keeps_content(name: str, kept: list[str], dropped: list[str]) -> None:
    selection = select(name, "steps", 1000)
    for phrase in kept:
        assert phrase in selection.text
    for phrase in dropped:
        assert phrase not in selection.text
    assert step_subsequence(selection.text, TRACES[name][1]) is not None


@pytest.mark.parametrize(
    ("name", "repeat"),
    [
        ("sizes", "The dog looks larger than the cat"),
        ("choice", "A grape is smaller than an apple"),
    ],
)
def test_steps_drops_repeats(name: str, repeat: str) -> None:
    assert TRACES[name][1].count(repeat) == 2
    assert select(name, "steps", 1000).text.count(repeat) == 1


@pytest.mark.parametrize("count_tokens", [None, quarter_chars])
@pytest.mark.parametrize("name", sorted(TRACES))
def test_steps_keeps_the_conclusion_on_a_small_budget(
    name: str, count_tokens: Callable[[str], int] | None
) -> None:
    assert CONCLUSIONS[name] in select(name, "steps", 20, count_tokens).text


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What color is the bus?", "The bus is yellow. So that is all."),
        ("What color is the car?", "The car is red. So that is all."),
    ],
)
def test_steps_prefers_question_terms(question: str, expected: str) -> None:
    pieces = tokenize("The car is red. The bus is yellow. So that is all.")
    selection = select_key_reasoning(pieces, None, question, "steps", 10)
    assert selection.text == expected


# --- surprisal ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("count", ["I can see 3 red apples", "There is also 1 green apple"]),
        ("sizes", ["Wait, maybe the cat is closer"]),
        ("sign", ["Looking closer, it is a 2"]),
        ("choice", ["The watermelon is about 30 cm", "A. An apple is smaller"]),
        ("price", ["The right tag shows"]),
    ],
)
@pytest.mark.parametrize("count_tokens", [None, quarter_chars])
def test_surprisal_keeps_the_surprising_steps(
    name: str, targets: list[str], count_tokens: Callable[[str], int] | None
) -> None:
    question, text = TRACES[name]
    pieces = tokenize(text)
    logprobs = surprising(text, pieces, targets)
    expected = [
        step.text
        for step in split_steps(text)
        if step.text == CONCLUSIONS[name] or any(t in step.text for t in targets)
    ]
    joined = " ".join(expected)
    # Exactly room for the surprising steps and the conclusion.
    budget = count_tokens(joined) if count_tokens else len(tokenize(joined))
    selection = select(name, "surprisal", budget, count_tokens, logprobs)
    assert step_subsequence(selection.text, text) == expected
    assert selection.tokens <= budget


@pytest.mark.parametrize("name", sorted(TRACES))
def test_surprisal_keeps_the_conclusion_first(name: str) -> None:
    question, text = TRACES[name]
    pieces = tokenize(text)
    # The conclusion is the most predictable step, yet it is kept when only it fits.
    logprobs = [-2.0] * len(pieces)
    budget = len(tokenize(CONCLUSIONS[name]))
    selection = select(name, "surprisal", budget, logprobs=logprobs)
    assert selection.text == CONCLUSIONS[name]


# --- errors and edge cases -------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "logprobs", "budget", "message"),
    [
        ("surprisal", None, 10, "logprobs"),
        ("surprisal", [-0.1], 10, "logprobs"),
        ("steps", [-0.1, -0.2], 10, "logprobs"),
        ("best", None, 10, "full, tail, steps, surprisal"),
        ("full", None, -1, "budget"),
    ],
)
def test_invalid_arguments(selector: str, logprobs: list[float] | None, budget: int, message: str) -> None:
    pieces = tokenize("One step. Two steps. So three.")
    with pytest.raises(ValueError, match=message):
        select_key_reasoning(pieces, logprobs, "How many?", selector, budget)


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("pieces", [[], [" ", "\n"]])
def test_empty_reasoning(selector: str, pieces: list[str]) -> None:
    logprobs = [-0.1] * len(pieces)
    selection = select_key_reasoning(pieces, logprobs, "Why?", selector, 50)
    assert selection == Selection(selector, "", 0)


@pytest.mark.parametrize("logprob", [float("-inf"), float("nan"), 0.0])
def test_surprisal_tolerates_extreme_logprobs(logprob: float) -> None:
    pieces = tokenize("The sign says STOP. So the answer is STOP.")
    logprobs = [-0.1] * len(pieces)
    logprobs[2] = logprob
    selection = select_key_reasoning(pieces, logprobs, "What does it say?", "surprisal", 100)
    assert selection.text == "The sign says STOP. So the answer is STOP."


# --- a thought the think budget cut ---------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "kept"),
    [
        (["The cat ", "is red.", " Next we", " check the"], "The cat is red."),
        (["The cat ", "is red.", "\n", "So it"], "The cat is red."),
        (["The cat ", "is red."], "The cat is red."),  # ended complete: all of it
        (["The cat is red.\n"], "The cat is red.\n"),
        (["Step 1: count. Step 2: the ", "three"], "Step 1: count."),
        (["no step ", "ended"], ""),  # not one finished step: nothing
        ([], ""),
    ],
)
def test_drop_unfinished(pieces: list[str], kept: str) -> None:
    kept_pieces, logprobs = drop_unfinished(pieces, [-1.0] * len(pieces))
    assert "".join(kept_pieces).rstrip(" ") == kept
    assert logprobs is not None and len(logprobs) == len(kept_pieces)


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("name", sorted(TRACES))
def test_a_cut_thought_never_transfers_its_unfinished_step(selector: str, name: str) -> None:
    # Qwen3's own budget example ends "...large language models" mid-sentence; every trace
    # here, cut mid-word, ends with such a fragment, which every selector favours (it is
    # the end, where the conclusion usually is).
    question, text = TRACES[name]
    cut = text + " So the final answer must be the one with the markin"
    pieces = [m.group() for m in re.finditer(r"\S+\s*|\s+", cut)]
    logprobs = [-2.5] * len(pieces)  # the fragment as surprising as anything
    chosen = select_key_reasoning(pieces, logprobs, question, selector, 40, truncated=True)
    assert "markin" not in chosen.text and chosen.tokens > 0
    # Negative control: not cut, the same end is what the selectors take.
    whole = select_key_reasoning(pieces, logprobs, question, selector, 40)
    assert "markin" in whole.text or selector == "full"
