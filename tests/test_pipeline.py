"""The ask pipeline on real synthetic models: modes, policies, selectors, routes."""

from __future__ import annotations

import pytest

from vlmduo.agents.local import Agent
from vlmduo.agents.prompts import TRANSFER_CUE
from vlmduo.answers.agree import answers_agree
from vlmduo.duo.pipeline import AskOptions, ask, make_question
from vlmduo.duo.selection import SELECTORS, drop_unfinished
from vlmduo.errors import UsageError

CHOICE = "Which animal is shown? A. cat B. dog C. bird D. fish"
TIMING_KEYS = {"load", "image", "encode", "prefill", "decode"}


@pytest.fixture
def agents(small_model, large_model):
    return Agent(small_model, thinking=True), Agent(large_model, thinking=False)


def _ask(agents, image, question=CHOICE, **kw):
    small, large = agents
    q = make_question(question, image, kw.pop("fmt", "auto"))
    kw.setdefault("think_budget", 48)
    return ask(q, AskOptions(**kw), small=small, large=large)


@pytest.mark.parametrize("mode", ["small", "large", "large-think"])
def test_single_model_modes(agents, image, mode):
    result = _ask(agents, image, mode=mode)
    data = result.to_json()
    assert data["mode"] == mode and data["route"] is None and data["policy"] is None
    assert data["format"] == "choice"
    assert data["answer"] in {"A", "B", "C", "D"}
    used = data["small"] if mode == "small" else data["large"]
    unused = data["large"] if mode == "small" else data["small"]
    assert unused is None
    assert set(used["timings_ms"]) >= TIMING_KEYS
    assert used["tokens"]["image"] == 16 and used["tokens"]["generated"] >= 1
    if mode == "large":
        # The letter, after the space its token may carry (the grammar allows both).
        assert used["reasoning"] is None and used["tokens"]["generated"] <= 2
    else:
        assert used["reasoning"]
    assert data["timings_ms"]["total"] >= data["timings_ms"]["critical_path"] > 0


def test_think_budget_caps_reasoning_and_forces_an_answer(agents, image):
    result = _ask(agents, image, mode="small", think_budget=10)
    # 10 reasoning tokens, then the closing marker is inserted and 1 letter decoded.
    assert result.small.tokens["generated"] == 11
    assert len(result.small.reasoning_pieces) <= 10
    assert result.answer in {"A", "B", "C", "D"}


@pytest.fixture(scope="module")
def twin_of_large(large_files):
    """A second instance of the large model's weights (own KV cache) as the small agent.

    Random-weight models barely react to their input, so two different ones
    disagree on a yes/no question while the same weights agree: that forces
    each route of the verify policy deterministically.
    """
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings

    model = VisionLanguageModel(
        large_files.model, large_files.mmproj, EngineSettings(n_ctx=4096), name="twin"
    )
    return Agent(model, thinking=False)


@pytest.mark.parametrize("question", ["Is there a cat?", "Is it raining?"])
def test_verify_routes_follow_agreement(agents, twin_of_large, image, question):
    _, large = agents
    different = _ask(agents, image, question=question, policy="verify", think_budget=16)
    same = _ask((twin_of_large, large), image, question=question, policy="verify", think_budget=16)
    for result in (different, same):
        agree = answers_agree(result.small.answer, result.large.answer, "yesno")
        assert result.route == ("agree" if agree else "transfer")
        assert (result.transferred is None) == agree
    assert same.route == "agree" and same.answer == same.large.answer
    assert different.route == "transfer" and different.transferred["selector"] == "steps"
    # 16 tokens of a random model end mid-step: that unfinished step is not transferred.
    assert different.small.reasoning_truncated is True
    pieces = different.small.reasoning_pieces
    fragment = "".join(pieces)[len("".join(drop_unfinished(pieces)[0])) :].strip()
    assert fragment and fragment not in different.transferred["text"]


# A reasoning of whole steps, longer than the budgets below, for the large model's transfer.
STEPS = (
    "The animal has whiskers. Its ears are pointed. It sits on a sofa. Dogs are larger. "
    "Birds have wings. So it is a cat. Answer: A"
)


@pytest.mark.parametrize("selector", SELECTORS)
def test_always_transfers_with_every_selector(agents, image, selector):
    from vlmduo.agents.scripted import ScriptedAgent

    _, large = agents
    small = ScriptedAgent("small", thinking=True).enqueue(answer="A", reasoning=STEPS)
    result = _ask((small, large), image, policy="always", selector=selector, transfer_budget=12)
    data = result.to_json()
    assert data["route"] == "transfer"
    t = data["transferred"]
    assert t["selector"] == selector and 0 < t["tokens"] <= 12
    assert t["text"] and t["text"] in data["small"]["reasoning"] or selector == "steps"
    for key in ("select", "transfer_prefill", "answer_decode"):
        assert data["timings_ms"][key] >= 0.0
    assert data["answer"] in {"A", "B", "C", "D"}


def test_transfer_reuses_the_cached_image_and_question(agents, image):
    from vlmduo.agents.base import Sampling
    from vlmduo.agents.local import answer_short, transfer_answer

    _, large = agents
    q = make_question(CHOICE, image, "auto")
    short = answer_short(large, q, Sampling(), reserve=64)
    session = short.session
    encode_ms, image_ms = session.times.get("encode"), session.times.get("image")
    prompt_tokens, image_tokens = session.n_prompt_tokens, session.n_image_tokens
    text = "The animal has whiskers and pointed ears, so it is a cat."
    done = transfer_answer(large, short, q, text, Sampling())
    answer, n_tokens = done.answer, done.prefill_tokens
    prefill_ms, decode_ms = done.prefill_ms, done.decode_ms
    # No second encode or image preprocess, no re-prefill of the question:
    assert session.times.get("encode") == encode_ms and session.times.get("image") == image_ms
    assert session.n_image_tokens == image_tokens and session.n_prompt_tokens == prompt_tokens
    # the transfer prefilled exactly the inserted text plus its cue.
    # The transferred text is plain text (special=False), the cue is ours.
    expected = len(large.model.tokenize(text, special=False)) + len(
        large.model.tokenize(TRANSFER_CUE, special=True)
    )
    assert n_tokens == expected
    assert session.n_past == short.prefix_end + n_tokens + len(session.last.tokens)
    assert prefill_ms > 0.0 and decode_ms > 0.0 and answer in {"A", "B", "C", "D"}


def test_confidence_cancels_the_small_agent(agents, image):
    # Threshold 0: any large answer is confident; the small agent, with a long
    # budget, is still reasoning when the large answer arrives and is cancelled.
    result = _ask(agents, image, policy="confidence", confidence_threshold=0.0, think_budget=3000)
    assert result.route == "confident"
    assert result.small.cancelled
    assert result.small.tokens["generated"] < 3000
    assert result.answer == result.large.answer
    assert result.to_json()["small"]["cancelled"] is True


def test_confidence_sequential_never_starts_the_small_agent(agents, image):
    result = _ask(agents, image, policy="confidence", confidence_threshold=0.0, sequential=True)
    assert result.route == "confident" and result.small.cancelled
    assert result.small.tokens["generated"] == 0


def test_confidence_below_threshold_falls_back_to_verify(agents, image):
    result = _ask(agents, image, policy="confidence", confidence_threshold=1.0)
    assert result.route in {"agree", "transfer"}
    assert not result.small.cancelled


def test_sequential_and_concurrent_give_the_same_answers(agents, image):
    a = _ask(agents, image, policy="always", sequential=True)
    b = _ask(agents, image, policy="always", sequential=False)
    assert (a.small.answer, a.large.answer, a.answer) == (b.small.answer, b.large.answer, b.answer)


@pytest.mark.parametrize(
    ("question", "fmt"),
    [
        ("How many cats are there?", "number"),
        ("Is it raining?", "yesno"),
        ("What color is the car?", "short"),
        ("Describe the scene.", "free"),
    ],
)
def test_formats_constrain_the_large_answer(agents, image, question, fmt):
    result = _ask(agents, image, question=question, mode="large", max_answer_tokens=12)
    assert result.format == fmt
    if fmt == "number":
        float(result.answer)
    elif fmt == "yesno":
        assert result.answer.lower() in {"yes", "no"}
    elif fmt == "short":
        assert 1 <= len(result.answer.split()) <= 5


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "fast"}, "unknown mode"),
        ({"policy": "sometimes"}, "unknown policy"),
        ({"selector": "magic"}, "unknown selector"),
        ({"max_answer_tokens": 0}, "at least 1"),
        ({"think_budget": -1}, "negative"),
    ],
)
def test_bad_options_are_usage_errors(kw, message):
    with pytest.raises(UsageError, match=message):
        AskOptions(**kw).validate()


def test_empty_question_is_a_usage_error(image):
    with pytest.raises(UsageError, match="empty"):
        make_question("   ", image, "auto")


@pytest.mark.parametrize(
    ("prompt", "expected", "closed"),
    [
        # Qwen3-VL Thinking: the template opens the thought itself.
        ("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n", False),
        # A hybrid template with enable_thinking=False: already closed, nothing added.
        (
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            True,
        ),
        # No opener written: we add it.
        ("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n", False),
        # Only the last opener counts: an earlier turn's closed thought does not.
        (
            "<think>a</think><|im_start|>assistant\n<think>\n",
            "<think>a</think><|im_start|>assistant\n<think>\n",
            False,
        ),
    ],
)
def test_open_thought(prompt, expected, closed):
    from vlmduo.agents.prompts import open_thought

    assert open_thought(prompt, "<think>", "</think>") == (expected, closed)
