"""Table tests for answer formats: options, format inference, extraction, comparison."""

from __future__ import annotations

import pytest

from vlmduo.answers.agree import answers_agree, normalize
from vlmduo.answers.extract import constrained_answer, extract_answer, normalize_text
from vlmduo.answers.formats import FORMATS, answer_instruction, infer_format, parse_options, resolve_format
from vlmduo.errors import UsageError

PETS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is it? A. cat B. dog", {"A": "cat", "B": "dog"}),
        ("What animal?\nA) cat\nB) dog\nC) bird", {"A": "cat", "B": "dog", "C": "bird"}),
        ("What animal?\n(A) cat\n(B) dog", {"A": "cat", "B": "dog"}),
        ("What animal?\nA: cat\nB: dog\nC: bird\nD: fish", PETS),
        ("What animal?\nOptions:\nA. cat\nB. dog\nAnswer with the letter.", {"A": "cat", "B": "dog"}),
        ("Which one? Options: A. red car, B. blue bus.", {"A": "red car", "B": "blue bus"}),
        ("Which? (a) a cat (b) a dog", {"A": "a cat", "B": "a dog"}),
        ("Pick: a) 3 b) 4 c) 5", {"A": "3", "B": "4", "C": "5"}),
        ("Who is it? A. Mr. T. Smith B. Ms. Jones", {"A": "Mr. T. Smith", "B": "Ms. Jones"}),
        ("A cat is on the mat. What color is it?", {}),
        ("I. think this is hard. II. maybe not. What is it?", {}),
        ("What is on the table? A. cat", {}),
        ("Is there a dog? B. yes C. no", {}),
        ("What time is it? 10 a.m. or 11 a.m.?", {}),
        ("", {}),
    ],
)
def test_parse_options(question: str, expected: dict[str, str]) -> None:
    assert parse_options(question) == expected


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What animal is this? A. cat B. dog C. bird", "choice"),
        ("Is there a dog in the picture?", "yesno"),
        ("Are the lights on?", "yesno"),
        ("Does the man wear a hat?", "yesno"),
        ("Can you see any cars?", "yesno"),
        ("Was the photo taken at night?", "yesno"),
        ("Do the shoes match?", "yesno"),
        ("Has the cake been cut?", "yesno"),
        ("The sky looks cloudy; is it going to rain? Answer yes or no.", "yesno"),
        ("Look at the image. Is the door open?", "yesno"),
        ("Is it a cat or a dog?", "short"),
        ("How many people are in the photo?", "number"),
        ("What number is on the jersey?", "number"),
        ("Count the apples on the table.", "number"),
        ("How much does the bag cost?", "number"),
        ("What is the sum of the numbers shown?", "number"),
        ("What's the total price on the receipt?", "number"),
        ("Can you tell me how many birds there are?", "number"),
        ("What color is the car?", "short"),
        ("What is the name of the store?", "short"),
        ("Which animal is bigger?", "short"),
        ("Who is holding the umbrella?", "short"),
        ("Where was this photo taken?", "short"),
        ("In which room is the person standing?", "short"),
        ("What is the man holding?", "short"),
        ("Describe the scene in detail.", "free"),
        ("Why is the boy crying?", "free"),
        ("What is happening in this image?", "free"),
        ("Tell me a story about the people in this picture and what they might do next.", "free"),
    ],
)
def test_infer_format(question: str, expected: str) -> None:
    assert infer_format(question) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is B", "B"),
        ("Answer: B", "B"),
        ("**B**", "B"),
        ("B. dog", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("Final answer: \\boxed{B}", "B"),
        ("So the final answer is $\\boxed{\\text{C}}$.", "C"),
        ("I think it's B.", "B"),
        ("Looking closely, the animal has floppy ears, so it is a dog.", "B"),
        ("It's not a cat, it's a dog", "B"),
        ("The fur is orange and it has whiskers, so I'd say a cat is shown.", "A"),
        ("A cat is on the mat? Looking again, the answer is B.", "B"),
        ("A cat would have pointed ears. The answer is B.", "B"),
        ("The answer is a dog.", "B"),
        ("The correct option is (C) bird.", "C"),
        ("**Answer:** D", "D"),
        ("**Answer**: option D", "D"),
        ("The answer is A. Wait, the tail is feathered. The answer is C.", "C"),
        ("Option A is wrong. Option C is also wrong. So B.", "B"),
        ("Hmm, I would pick B", "B"),
        ("<think>A or B? The ears flop.</think>\nB", "B"),
        ("<think>The ears flop, so the answer is B.</think>", "B"),
        ("<think>The ears flop.</think>\nThe answer is (D).", "D"),
        ("Step 1: look at the animal.\nStep 2: it swims.\nAnswer: D. fish", "D"),
        ("The best choice would be B, because of the floppy ears.", "B"),
        ("I cannot tell what this is.", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice", PETS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog on the sofa.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("**Yes**", "yes"),
        ("There is a **yes** sign? The answer is no.", "no"),
        ("I see no reason to doubt it. Yes.", "yes"),
        ("I see no reason to doubt it. **Yes**", "yes"),
        ("Looking at the image there is no dog, so the answer is no.", "no"),
        ("Answer: Yes", "yes"),
        ("The answer is yes, the light is on.", "yes"),
        ("Final answer: \\boxed{No}", "no"),
        ("Is it open? No, the door is shut. Hmm, wait. Yes, it is slightly open.", "yes"),
        ("Correct, the man wears a hat.", "yes"),
        ("<think>There is no cat here. Is there? No.</think>\nNo", "no"),
        ("The picture shows a dog near a tree.", None),
    ],
)
def test_extract_yesno(text: str, expected: str | None) -> None:
    assert extract_answer(text, "yesno") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 3", "3"),
        ("There are 3 cats", "3"),
        ("three", "3"),
        ("I count twenty-one people.", "21"),
        ("1,234", "1234"),
        ("3.5 kg", "3.5"),
        ("The answer is -2.", "-2"),
        ("$1,234.50", "1234.5"),
        ("I count 1, 2, 3 birds. Total: 3", "3"),
        ("1. First I count the dogs.\n2. Then the cats.\nSo there are 5 animals.", "5"),
        ("The one on the left is red; there are 2 cars.", "2"),
        ("**Step 1: Count the apples**\nThere are 4 apples.\n**Answer: 4**", "4"),
        ("I first thought 7 but recounting gives **6**.", "6"),
        ("The answer is 4. Wait, one is hidden. The answer is 5.", "5"),
        ("Final answer: \\boxed{12}", "12"),
        ("There are no people here, so the answer is zero.", "0"),
        ("The answer is none.", "0"),
        ("I can see a couple of apples.", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        ("Answer: red", "short", "red"),
        ("The answer is a red car.", "short", "a red car"),
        ("red", "short", "red"),
        ("The sign says **STOP**.", "short", "STOP"),
        (
            "The photo was taken outside in the early evening with long shadows. The car is red.",
            "short",
            "The car is red",
        ),
        ("<think>It could be Paris.</think>\nParis", "short", "Paris"),
        ("A cat is sitting on a mat.", "free", "A cat is sitting on a mat"),
        ("", "free", None),
    ],
)
def test_extract_text(text: str, fmt: str, expected: str | None) -> None:
    assert extract_answer(text, fmt) == expected


@pytest.mark.parametrize(
    ("answer", "fmt", "expected"),
    [
        ("B", "choice", "B"),
        ("b", "choice", "B"),
        ("(b)", "choice", "B"),
        ("B.", "choice", "B"),
        ("B) dog", "choice", "B"),
        ("Option B", "choice", "B"),
        ("dog", "choice", "B"),
        ("Dog!", "choice", "B"),
        ("a dog", "choice", "B"),
        ("A cat", "choice", "A"),
        ("A cat is on the mat", "choice", None),
        ("E", "choice", None),
        ("elephant", "choice", None),
        ("Yes", "yesno", "yes"),
        ("yes.", "yesno", "yes"),
        ("True", "yesno", "yes"),
        ("yeah", "yesno", "yes"),
        ("Yep, it is.", "yesno", "yes"),
        ("correct", "yesno", "yes"),
        ("No", "yesno", "no"),
        ("no, there isn't", "yesno", "no"),
        ("nope", "yesno", "no"),
        ("False", "yesno", "no"),
        ("maybe", "yesno", None),
        ("1,234", "number", "1234"),
        ("3.50 kg", "number", "3.5"),
        ("three", "number", "3"),
        ("-2", "number", "-2"),
        ("100", "number", "100"),
        ("0.0", "number", "0"),
        ("one hundred and five", "number", "105"),
        ("a few", "number", None),
        ("The Red Car.", "short", "red car"),
        ("  an  apple ", "short", "apple"),
        ("T-shirt", "short", "t shirt"),
        ("Hello, world!", "free", "hello world"),
        ("...", "short", None),
        (None, "short", None),
        ("", "yesno", None),
    ],
)
def test_normalize(answer: str | None, fmt: str, expected: str | None) -> None:
    assert normalize(answer, fmt, PETS if fmt == "choice" else None) == expected


def test_a_lone_valid_letter_is_that_option_whatever_the_option_texts_say() -> None:
    # "Which letter is on the sign? A. B  B. D": the answer "B" is option B, not option A.
    options = {"A": "B", "B": "D"}
    assert normalize("B", "choice", options) == "B"
    assert normalize("(A)", "choice", options) == "A"
    assert extract_answer("The sign reads D. Answer: B", "choice", options) == "B"
    assert normalize("D", "choice", options) == "B"  # not a letter of these options: its text


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        (" B", "choice", "B"),  # the space of Qwen's " B" token
        ("B", "choice", "B"),
        (" Yes", "yesno", "Yes"),
        (" 1,234", "number", "1,234"),
        ("3.", "number", "3"),  # the sentence's period, not a decimal point
        ("45%", "number", "45%"),
        (" St. Louis", "short", "St. Louis"),
        ("", "short", None),
    ],
)
def test_a_constrained_answer_is_returned_as_generated(text: str, fmt: str, expected: str | None) -> None:
    assert constrained_answer(text, fmt) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs", "2 dogs"),
        ("the one on the left", "one on left"),
        ("1,234 apples", "1234 apples"),
        ("$3.99", "3.99"),
        ("10:10 AM", "10:10 am"),
        ("AT&T", "att"),
        ("Zürich.", "zürich"),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_normalize_choice_without_options() -> None:
    assert normalize("(c)", "choice") == "C"
    assert normalize("dog", "choice") is None


@pytest.mark.parametrize(
    ("a", "b", "fmt", "expected"),
    [
        ("B", "dog", "choice", True),
        ("(b)", "B. dog", "choice", True),
        ("A", "B", "choice", False),
        ("Yes", "yeah", "yesno", True),
        ("No.", "yes", "yesno", False),
        ("3", "three", "number", True),
        ("1,234", "1234.0", "number", True),
        ("0.1", "0.1000000001", "number", True),
        ("2", "3", "number", False),
        ("The red car", "red car.", "short", True),
        ("red", "blue", "short", False),
        # The shorter answer standing in the longer one, case, articles, number words.
        ("The car is red", "red", "short", True),
        ("red", "The car is red.", "short", True),
        ("two", "2", "short", True),
        ("There are two cars", "2", "free", True),
        ("Answer: red", "red", "short", True),
        ("St. Louis", "st louis", "short", True),
        ("10:10", "10:10.", "short", True),
        # ... but not a negated one, a number inside another, or a bare function word.
        ("The car is not red", "red", "short", False),
        ("12 cars", "2", "short", False),
        ("is", "the car is red", "short", False),
        ("3.5", "35", "short", False),
        ("red car", "car red", "short", False),
        (None, "B", "choice", False),
        ("maybe", "maybe", "yesno", False),
    ],
)
def test_answers_agree(a: str | None, b: str | None, fmt: str, expected: bool) -> None:
    assert answers_agree(a, b, fmt, PETS if fmt == "choice" else None) is expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_answer_instruction_is_one_sentence(fmt: str) -> None:
    text = answer_instruction(fmt, PETS)
    assert text.endswith(".") and text.count(". ") == 0


def test_answer_instruction_names_letters() -> None:
    assert "A, B or C" in answer_instruction("choice", {"A": "x", "B": "y", "C": "z"})


def test_resolve_format() -> None:
    assert resolve_format("auto", "How many dogs?") == "number"
    assert resolve_format("free", "How many dogs?") == "free"


@pytest.mark.parametrize("call", [extract_answer, normalize, answer_instruction])
def test_unknown_format_is_a_usage_error(call) -> None:  # noqa: ANN001
    with pytest.raises(UsageError):
        call("x", "essay")
