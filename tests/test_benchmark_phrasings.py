"""Formats inferred from the prompts benchmarks really send, scaffolding and all: the
table of published prompt formats in tests/phrasings.py (sources there)."""

from __future__ import annotations

import pytest
from phrasings import MMBENCH_HINT, PHRASINGS

from vlmduo.answers.formats import infer_format, parse_options, parse_question


@pytest.mark.parametrize(("question", "expected"), PHRASINGS, ids=[f"{i:02d}" for i in range(len(PHRASINGS))])
def test_a_published_benchmark_phrasing_gets_the_expected_format(question, expected):
    assert infer_format(question) == expected


def test_the_options_of_the_layouts_harnesses_use():
    assert parse_options(PHRASINGS[13][0]) == {"A": "chair", "B": "plant", "C": "window", "D": "tv stand"}
    assert parse_options(PHRASINGS[14][0]) == {"A": "Red", "B": "Blue", "C": "Green", "D": "Orange"}
    assert parse_options(PHRASINGS[16][0]) == {"A": "40°", "B": "60°", "C": "120°", "D": "140°"}
    assert parse_options(MMBENCH_HINT) == {"A": "no", "B": "yes"}
    # Letters in the hint's prose ("e.g., A, B, C, D") are not options.
    assert parse_options("Provide the correct option letter, e.g., A, B, C, D.\nWhat is it?") == {}


@pytest.mark.parametrize(
    ("question", "sent"),
    [
        # Answer-style instructions are the harness's; vlmduo's own instruction replaces them.
        (
            "Is there a snowboard in the image?\nAnswer the question using a single word or phrase.",
            "Is there a snowboard in the image?",
        ),
        ("<image>\nIs there a traffic light in the image?", "Is there a traffic light in the image?"),
        (
            "How many food item is shown in the bar graph? Answer:",
            "How many food item is shown in the bar graph?",
        ),
        # The hint and the options stay: they are what the models need to answer.
        (
            MMBENCH_HINT,
            MMBENCH_HINT.replace("Please select the correct answer from the options above. \n", "").strip(),
        ),
        (
            "What time is it?\nReference OCR token: 10:10, SEIKO\nAnswer the question using a single word.",
            "What time is it?\nReference OCR token: 10:10, SEIKO",
        ),
    ],
)
def test_the_text_sent_to_the_models_keeps_context_and_drops_the_harness_instructions(question, sent):
    assert parse_question(question).text == sent


def test_a_question_made_only_of_an_instruction_is_sent_as_written():
    # Nothing is left once the instruction goes: the user's words go to the models.
    assert parse_question("Answer briefly.").text == "Answer briefly."
