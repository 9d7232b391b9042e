"""The answer path as the published models meet it: prompts, the budget's end, sampling,
thinking detection (synthetic models shaped like the published files)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from vlmduo.agents import prompts
from vlmduo.agents.base import Question, Sampling, reasoning_sampler
from vlmduo.duo.pipeline import AskOptions, ask, make_question
from vlmduo.engine.sampling import GREEDY, SamplerSettings
from vlmduo.models import fixtures

CHOICE = "Which animal is shown? A. cat B. dog C. bird D. fish"


# --- prompts: what each kind of reasoner is asked ---------------------------------------


def test_a_native_thinker_is_asked_for_its_answer_and_thinks_by_itself():
    q = Question(CHOICE, None, "choice", {"A": "cat", "B": "dog", "C": "bird", "D": "fish"})
    text = prompts.reasoning_text(q, thinks_natively=True)
    assert text.endswith("Answer with the option's letter (A, B, C or D) only.")
    assert "step by step" not in text


@pytest.mark.parametrize("fmt", ["choice", "yesno", "number", "short", "free"])
def test_another_reasoner_is_asked_to_reason_then_give_one_answer_line(fmt):
    q = Question("How many cats? A. 1 B. 2", None, fmt, {"A": "1", "B": "2"} if fmt == "choice" else {})
    text = prompts.reasoning_text(q, thinks_natively=False)
    assert "Think step by step" in text and 'a last line that starts with "Answer:"' in text
    # No placeholder letter for a small model to copy as its answer.
    assert " X" not in text and "$" not in text
    # No "only": it would tell the model to answer at once and leave nothing to transfer.
    assert "only" not in text.lower()
    assert prompts.ANSWER_CUE.strip() == "Answer:"  # the cue opens that very line


def test_a_cut_thought_ends_with_qwen3s_hand_off_and_a_finished_one_does_not():
    cut = prompts.close_thought("so the cat is", "</think>", truncated=True)
    assert cut == (
        "\n\nConsidering the limited time by the user, I have to give the solution based on the "
        "thinking directly now.\n</think>\n\n"
    )
    assert prompts.close_thought("So it is a cat.\n", "</think>", truncated=False) == "</think>\n\n"
    assert prompts.close_thought("So it is a cat.", "</think>", truncated=False) == "\n</think>\n\n"
    assert prompts.close_reasoning(truncated=True).endswith(prompts.BUDGET_HANDOFF + "\n\nAnswer:")
    assert prompts.close_reasoning(truncated=False) == "\n\nAnswer:"


# --- sampling: the model card for reasoning, greedy answers -----------------------------


def test_the_reasoning_sampler_is_the_cards_with_the_users_temperature_over_it():
    card = (("temperature", 1.0), ("top_p", 0.95), ("top_k", 20), ("presence_penalty", 0.0))
    assert reasoning_sampler(card, Sampling(seed=3)) == SamplerSettings(
        temperature=1.0, top_p=0.95, top_k=20, presence_penalty=0.0, seed=3
    )
    assert reasoning_sampler(card, Sampling(temperature=0.0)).greedy
    # No card: llama.cpp's own defaults (what llama-cli samples with).
    assert reasoning_sampler((), Sampling()) == SamplerSettings()


def test_the_shipped_cards_are_in_the_registry():
    from vlmduo.models.registry import load_registry

    models = load_registry().models
    thinking = dict(models["qwen3-vl-2b-thinking"].sampling)
    instruct = dict(models["qwen3-vl-8b-instruct"].sampling)
    assert thinking == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
        "presence_penalty": 0.0,
        "repeat_penalty": 1.0,
    }
    assert instruct == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "presence_penalty": 1.5,
        "repeat_penalty": 1.0,
    }


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("temperature = -1", "temperature must be a number from 0 to 5"),
        ("top_p = 1.5", "top_p must be a number from 0 to 1"),
        ("top_k = 2.5", "top_k must be a whole number"),
        ('min_p = "low"', "min_p must be a number"),
        ("presence_penalty = true", "presence_penalty must be a number"),
    ],
)
def test_a_bad_sampling_key_is_refused_by_name(tmp_path, line, problem):
    from vlmduo.errors import RegistryError
    from vlmduo.models.registry import load_registry

    (tmp_path / "models.toml").write_text(f'[models.mine]\npath = "/m.gguf"\nmmproj = "/p.gguf"\n{line}\n')
    with pytest.raises(RegistryError, match=problem):
        load_registry(tmp_path)


# --- on synthetic Qwen3-VL files: the whole path ----------------------------------------


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """Qwen3-VL-shaped Thinking and Instruct fixtures, the thinking one copied under a
    name that says nothing of thinking (as a user's own file might be called)."""
    folder = tmp_path_factory.mktemp("qwen-pair")
    built = {}
    for variant in ("thinking", "instruct"):
        model, mmproj = folder / f"{variant}.gguf", folder / f"mmproj-{variant}.gguf"
        fixtures.build({"family": "qwen3-vl", "variant": variant, "seed": 4}, model, mmproj, name=variant)
        built[variant] = (model, mmproj)
    plain = folder / "plain"
    plain.mkdir()
    shutil.copy(built["thinking"][0], plain / "model.gguf")
    shutil.copy(built["thinking"][1], plain / "mmproj-model.gguf")
    built["plain"] = (plain / "model.gguf", plain / "mmproj-model.gguf")
    return built


def _agent(paths: tuple[Path, Path], role: str):
    from vlmduo.api import load_agent
    from vlmduo.engine.settings import EngineSettings

    agent, _ = load_agent(str(paths[0]), paths[1], EngineSettings(n_ctx=4096, n_threads=2), role=role)
    return agent


def test_a_model_whose_template_opens_its_thought_thinks_whatever_its_name(qwen_pair):
    plain = _agent(qwen_pair["plain"], "small")
    assert plain.thinking is True  # "model.gguf": only its chat template says it
    assert plain.model.thinks_natively() is True
    instruct = _agent(qwen_pair["instruct"], "large")
    assert instruct.thinking is False and instruct.model.thinks_natively() is False


def test_a_cut_thought_is_reported_and_the_sampling_each_agent_used(qwen_pair, image):
    small = _agent(qwen_pair["plain"], "small")
    large = _agent(qwen_pair["instruct"], "large")
    small = dataclasses.replace(small, card=(("temperature", 1.0), ("top_p", 0.95), ("top_k", 20)))
    q = make_question(CHOICE, image, "auto")
    result = ask(q, AskOptions(think_budget=12, seed=5, policy="always"), small=small, large=large).to_json()
    assert result["small"]["reasoning_truncated"] is True  # 12 tokens: the budget cut it
    assert result["large"]["reasoning_truncated"] is None  # it did not reason
    assert result["small"]["sampling"] == {
        **SamplerSettings(temperature=1.0, top_p=0.95, top_k=20, seed=5).to_json()
    }
    assert result["large"]["sampling"] == GREEDY.to_json()
    greedy = ask(q, AskOptions(mode="small", think_budget=12, temperature=0.0), small=small).to_json()
    assert greedy["small"]["sampling"] == {"temperature": 0.0, "seed": 0}
    # Negative control: at the card's temperature the seed changes the reasoning.
    other = ask(q, AskOptions(mode="small", think_budget=12, seed=6), small=small).to_json()
    again = ask(q, AskOptions(mode="small", think_budget=12, seed=5), small=small).to_json()
    assert again["small"]["reasoning"] == result["small"]["reasoning"] != other["small"]["reasoning"]


def test_large_think_on_an_instruct_model_reasons(qwen_pair, image):
    large = _agent(qwen_pair["instruct"], "large")
    q = make_question(CHOICE, image, "auto")
    result = ask(q, AskOptions(mode="large-think", think_budget=20, temperature=0.0), large=large)
    assert result.large.reasoning and result.large.tokens["generated"] > 20
    assert result.large.reasoning_truncated is True
