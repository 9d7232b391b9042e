"""Real outputs of the shipped families (and their close relatives), from published
sources, through extraction, agreement and selection.

Every text below is verbatim from its source (a Python or JSON literal copied with its
escapes where the source printed one), so the tests read what the models really write:

- QWEN_COOKBOOK: QwenLM/Qwen3-VL ``cookbooks/spatial_understanding.ipynb`` (commit
  96588727e44c78b25ba03ea03b8e12f7e64fd0da), outputs of ``qwen3-vl-235b-a22b-instruct``.
- QWEN3_DOCS: QwenLM/Qwen3 ``docs/source/getting_started/quickstart.md`` ("Thinking
  Budget", commit 7a2f61ffc7a20d47efcd2bf97f6f2bf52729042e), Qwen3-8B, thinking_budget=16.
- TRANSFORMERS_INTERNVL: huggingface/transformers ``docs/source/en/model_doc/internvl.md``
  (commit 01c031970acd3a9b45980bb2e2bc4191e824f3c1), InternVL3-1B/8B-hf, greedy.
- TRANSFORMERS_GEMMA3: huggingface/transformers ``tests/models/gemma3/test_modeling_gemma3.py``
  (commit 003320480b9eac976d31b6d4e0f02e80249a3826), google/gemma-3-4b-it, greedy.
- TRANSFORMERS_SMOLVLM: huggingface/transformers ``tests/models/smolvlm/test_modeling_smolvlm.py``
  (commit 0051c6d53d8e47b632fa1ce680d42fd7343b5d08), SmolVLM2-256M-Video-Instruct.
- QWEN3VL8B_LOG: a public "Qwen3-VL-8B Baseline Raw Example Samples" file (GitHub code
  index file id 66139956076; its repository is not named there), MMBench, BLINK, GQA,
  MMVet, MathVista and MathVerse predictions.
"""

from __future__ import annotations

import re

import pytest

from vlmduo.answers.agree import answers_agree
from vlmduo.answers.extract import extract_answer
from vlmduo.answers.formats import infer_format, parse_options
from vlmduo.duo.selection import select_key_reasoning

QWEN_COOKBOOK = "QwenLM/Qwen3-VL cookbooks/spatial_understanding.ipynb"
QWEN3VL8B_LOG = "Qwen3-VL-8B Baseline Raw Example Samples (code index id 66139956076)"

T2 = (
    "No, the speaker **cannot** fit behind the guitar \u2014 at least not in the current setup shown in the "
    "image.\n\nHere\u2019s why:\n\n- The **guitar is leaning forward** on a stand, angled slightly away from "
    "the wall.\n- The **speaker (a small black amplifier)** is sitting on a **white stool** that is "
    "positioned **behind the guitar\u2019s body**, but **not directly behind the neck or headstock**.\n"
    "\u2705 So, if you mean \u201ccan the speaker be placed behind the guitar in space?\u201d \u2014 yes, it "
    "already is.\n\n\u274c If you mean \u201ccan the speaker be placed behind the guitar such that the guitar "
    "is in front of it and blocking it from view?\u201d \u2014 no, not without moving the guitar or the "
    "speaker, and even then, it would be unstable or impractical.\n\n**Final Answer**: **No**, the speaker "
    "cannot fit *physically behind* the guitar in a way that the guitar is in front of it \u2014 because the "
    "guitar\u2019s position and angle prevent that without destabilizing the setup."
)
T3 = (
    "Looking at the image:\n\n- The robot is holding an **apple**.\n- There is a **green can** on the left.\n"
    "- There is an **orange** (fruit) in the middle.\n- There is a **paper cup** on the right.\n\nThe goal is "
    "to move the **apple** to a position **between the green can and the orange**.\n\nNow, look at the "
    "arrows:\n\n- **Red arrow** points from the apple toward the green can \u2014 that would move the apple "
    "**left**, possibly **past** the can, not between.\n- **Blue arrow** points from the apple **toward the "
    "orange**, but slightly left \u2014 this would move the apple **between** the green can and the orange.\n"
    "- **Green arrow** points from the apple toward the paper cup \u2014 that would move it **right**, away "
    "from the target position.\n\nSo, to place the apple **between** the green can and the orange, the "
    "robot should follow the **blue arrow**.\n\n\u2705 Correct answer: **B. Blue.**"
)
T4 = (
    "To change the coffee pod in this machine (which appears to be a **Nespresso-style** pod-based espresso "
    "machine), you typically need to **open the pod compartment** \u2014 usually located at the **top "
    "front** of the machine, where you insert and eject the pod.\n\nLooking at the labeled arrows:\n\n- **A** "
    "points to the **drip tray** \u2014 this is for catching drips, not for pod access.\n- **B** points to the "
    "**steam wand or milk frother area** \u2014 used for frothing milk, not pod replacement.\n- **C** points "
    "to **accessories or storage** \u2014 not relevant to pod changing.\n- **D** points to the **top front "
    "lever or slot** \u2014 this is where you typically **lift or press** to open the pod chamber and eject "
    "the used pod.\n\n\u2705 So, the correct motion to change the coffee pod is **D** \u2014 you lift or "
    "press the lever at the top front to open the pod compartment.\n\n---\n\n**Answer: D. D.**"
)
T5 = (
    "The robot starts at the bed facing the TV. First, it goes forward until the TV. Then, it needs to turn "
    "left to head towards the shower. After reaching the shower, it turns right to go to the toilet. So "
    "the sequence is Turn Left, Turn Right."
)
T5_QUESTION = (
    "These are frames of a video.\nYou are a robot beginning at the bed facing the tv. You want to navigate "
    "to the toilet.\nOptions:\nA. Turn Back, Turn Left\nB. Turn Left, Turn Left\nC. Turn Left, Turn Right\n"
    "D. Turn Right, Turn Right"
)
T6_THOUGHT = "Okay, the user is asking for a short introduction to large language models"
T10 = (
    "The image shows two cats lying on a pink blanket. The cat on the left is a tabby with a mix of brown, "
    "black, and white fur, and it appears to be sleeping with its head resting on the blanket. The cat on the"
)
T12 = (
    "No, these images are not identical. \n\nHere's a breakdown of the differences:\n\n*   **Image 1:** "
    "Shows a brown"
)

# (source, question, the model's reply, format, expected answer)
CASES = [
    (QWEN_COOKBOOK, "Which object holds the farthest placement?\nAnswer options:\nA.chair\nB.plant\n"
     "C.window\nD.tv stand.", "C. window", "choice", "C"),
    (QWEN_COOKBOOK, "Can the speaker fit behind the guitar?", T2, "yesno", "no"),
    (QWEN_COOKBOOK, "What color arrow should the robot follow to move the apple in between the green can "
     "and the orange? Choices: A. Red. B. Blue. C. Green. D. Orange.", T3, "choice", "B"),
    (QWEN_COOKBOOK, "Which motion can help change the coffee pod? Choices: A. A. B. B. C. C. D. D.", T4,
     "choice", "D"),
    (QWEN_COOKBOOK, T5_QUESTION, T5, "choice", "C"),  # the option's text, no letter
    ("QWEN3_DOCS", "Give me a short introduction to large language models.",
     f"<think>\n{T6_THOUGHT}\n\nConsidering the limited time by the user, I have to give the solution based "
     "on the thinking directly now.\n</think>\nLarge language models (LLMs) are advanced artificial "
     "intelligence systems trained on vast amounts of text data.", "free",
     "Large language models (LLMs) are advanced artificial intelligence systems trained on vast amounts of "
     "text data"),
    ("TRANSFORMERS_INTERNVL", "What type of shot is the man performing?",
     "The man is performing a forehand shot.", "short", "The man is performing a forehand shot"),
    ("TRANSFORMERS_INTERNVL", "What type of shot is the man performing?", "A forehand shot", "short",
     "A forehand shot"),
    ("TRANSFORMERS_INTERNVL", "How many cats are there?", T10, "number", "2"),  # cut mid-sentence
    ("TRANSFORMERS_GEMMA3", "Are these images identical?", T12, "yesno", "no"),
    ("TRANSFORMERS_SMOLVLM", "Describe this video in detail", " The video depicts a large language model "
     "architecture, specifically a language model with a \"quick brown\" feature", "free",
     "The video depicts a large language model architecture, specifically a language model with a "
     "\"quick brown\" feature"),
    (QWEN3VL8B_LOG, "Two points are circled on the image, labeled by A and B beside each circle. Which "
     "point is closer to the camera?\nSelect from the following choices.\n(A) A is closer\n(B) B is closer",
     "(B) B is closer", "choice", "B"),
    (QWEN3VL8B_LOG, "Identify the question that Madelyn and Tucker's experiment can best answer.\nOptions:\n"
     "A. Does it slide in less time with a thin or a thick layer of wax?\nB. Does it slide in less time with "
     "or without a layer of wax?\nReturn only the final option letter.", "B", "choice", "B"),
    (QWEN3VL8B_LOG, "What is d in the last equation?\n\nAnswer briefly.", "d = 0.5", "number", "0.5"),
    (QWEN3VL8B_LOG, "what is the total volume of the measuring cup?\n\nReturn only the final integer.",
     "1000", "number", "1000"),
    (QWEN3VL8B_LOG, "What is this bird called?\n\nAnswer briefly.", "cockatoo", "short", "cockatoo"),
    (QWEN3VL8B_LOG, "What color is the helmet in the middle of the image?\n\nAnswer briefly.", "blue",
     "short", "blue"),
    (QWEN3VL8B_LOG, "As shown in the figure, then the size of angle CED is ()\nChoices:\nA:40\u00b0\n"
     "B:60\u00b0\nC:120\u00b0\nD:140\u00b0", "C", "choice", "C"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "question", "reply", "fmt", "expected"), CASES)
def test_the_answer_of_a_published_reply(source, question, reply, fmt, expected):
    options = parse_options(question) or None
    assert extract_answer(reply, fmt, options) == expected, source


@pytest.mark.parametrize(
    ("question", "fmt"),
    # "What is d in the last equation?" asks for a number nothing in its words names.
    [
        (case[1], case[3])
        for case in CASES
        if case[3] in ("choice", "yesno", "number") and "d =" not in case[2]
    ],
)
def test_the_questions_of_the_corpus_get_the_format_their_replies_answer(question, fmt):
    assert infer_format(question) == fmt


@pytest.mark.parametrize(
    ("a", "b", "fmt", "options", "agree"),
    [
        # Two ways Qwen3-VL writes the same option (cookbook cells 8 and 14 and the log).
        ("C. window", "C", "choice", {"A": "chair", "B": "plant", "C": "window", "D": "tv stand"}, True),
        ("\u2705 Correct answer: **B. Blue.**", "B", "choice", {"A": "Red", "B": "Blue"}, True),
        ("(B) B is closer", "B", "choice", {"A": "A is closer", "B": "B is closer"}, True),
        ("Turn Left, Turn Right", "C", "choice", {"A": "Turn Back, Turn Left", "B": "Turn Left, Turn Left",
                                                   "C": "Turn Left, Turn Right"}, True),
        # InternVL3's full sentence against a short answer: the same answer.
        ("The man is performing a forehand shot.", "forehand", "short", None, True),
        ("A forehand shot", "The man is performing a forehand shot.", "short", None, True),
        # The log's GQA miss: a different answer, not a needless transfer.
        ("cockatoo", "parrot", "short", None, False),
        ("blue", "light blue", "short", None, True),  # a short answer inside a longer one
        ("two cats", "2", "short", None, True),
        (T12, "No", "yesno", None, True),
    ],
)  # fmt: skip
def test_agreement_on_published_replies(a, b, fmt, options, agree):
    assert answers_agree(a, b, fmt, options) is agree


def test_qwen3s_cut_thought_transfers_no_fragment():
    # Qwen's own example: the thought the budget cut ends mid-sentence ("...language
    # models", no period). Nothing of it is a finished step, so nothing is transferred.
    pieces = re.findall(r"\S+\s*", T6_THOUGHT)
    question = "Give me a short introduction to large language models."
    for selector in ("full", "tail", "steps", "surprisal"):
        chosen = select_key_reasoning(pieces, [-1.0] * len(pieces), question, selector, 32, truncated=True)
        assert chosen.text == "" and chosen.tokens == 0
    # InternVL3's reply cut by max_new_tokens: the finished sentences are kept, the fragment not.
    pieces = re.findall(r"\S+\s*", T10)
    chosen = select_key_reasoning(pieces, None, "How many cats are there?", "full", 200, truncated=True)
    assert chosen.text.endswith("resting on the blanket.") and "The cat on the" not in chosen.text[-20:]
