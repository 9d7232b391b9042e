"""Every family in models.toml, on a fixture shaped like its published files.

Through llama.cpp and libmtmd: loading, chat templates, every mode through the
CLI (the same file as small and large agent: shared weights, two contexts),
images of three sizes including a 12 MP photo, token counts against libmtmd's
own, and KV-prefix reuse on an M-RoPE family with a negative control.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from vlmduo.duo.pipeline import AskOptions
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import ProjectorMismatchError
from vlmduo.media.images import LoadedImage, load_image, synthetic_image
from vlmduo.models import fixtures, registry

# name -> (registry family, extra shape keys); the file name says "thinking"
# for the reasoning variant, as the published Qwen3-VL Thinking files do.
FAMILIES = {
    "qwen3-vl-thinking": ("qwen3-vl", {"variant": "thinking"}),
    "qwen3-vl-instruct": ("qwen3-vl", {"variant": "instruct"}),
    "qwen2.5-vl": ("qwen2.5-vl", {}),
    "gemma3": ("gemma3", {}),
    "smolvlm": ("smolvlm", {}),
    "internvl": ("internvl", {}),
}
QUESTION = "Which colour is the sky?"


@dataclass(frozen=True)
class FamilyFiles:
    name: str
    model: Path
    mmproj: Path


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _build(family_dir: Path, name: str) -> FamilyFiles:
    family, extra = FAMILIES[name]
    model, mmproj = family_dir / f"{name}.gguf", family_dir / f"mmproj-{name}.gguf"
    if not model.exists():
        fixtures.build({"family": family, **extra}, model, mmproj, name=name)
    return FamilyFiles(name, model, mmproj)


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, family_dir: Path) -> FamilyFiles:
    return _build(family_dir, request.param)


@pytest.fixture(scope="session")
def family_model(family: FamilyFiles) -> VisionLanguageModel:
    settings = EngineSettings(n_ctx=4096, n_threads=2, image_max_tokens=1024)
    return VisionLanguageModel(family.model, family.mmproj, settings, name=family.name)


def _image_file(folder: Path, width: int, height: int, seed: int = 3) -> Path:
    from PIL import Image

    path = folder / f"img-{width}x{height}-{seed}.png"
    if not path.exists():
        img = synthetic_image(width, height, seed=seed)
        Image.frombytes("RGB", (img.width, img.height), img.rgb).save(path)
    return path


def mtmd_counts(model: VisionLanguageModel, prompt: str, image: LoadedImage) -> tuple[list[int], int]:
    """libmtmd's own view of a prompt: the first text chunk's tokens, and image tokens."""
    import llama_cpp.mtmd_cpp as mtmd

    chunks = mtmd.mtmd_input_chunks_init()
    data = prompt.encode()
    text = mtmd.mtmd_input_text(text=data, text_len=len(data), add_special=True, parse_special=True)
    pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, pixels)
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    try:
        assert mtmd.mtmd_tokenize(model._mtmd, chunks, ctypes.byref(text), bitmaps, 1) == 0
        first_text, n_image = None, 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                if first_text is None:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    first_text = [ptr[j] for j in range(n.value)]
            else:
                n_image += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        return first_text or [], n_image
    finally:
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_input_chunks_free(chunks)


def test_registry_families_all_have_fixtures():
    # DESIGN: a family without a fixture is not supported.
    shipped = {m.family for m in registry.load_registry().models.values() if m.family}
    assert shipped <= set(fixtures.FAMILIES), shipped - set(fixtures.FAMILIES)
    assert {family for family, _ in FAMILIES.values()} == set(fixtures.FAMILIES) - {"llama"}


def test_template_renders_question_and_marker(family_model):
    prompt = family_model.render_prompt(QUESTION, image=True)
    assert QUESTION in prompt and prompt.count(family_model.marker) == 1
    assert QUESTION in family_model.render_prompt(QUESTION, image=False)


def test_smolvlm_template_drops_string_content_so_parts_are_used(family_dir):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from vlmduo.engine import chat
    from vlmduo.models.fixtures.common import chat_template

    template = chat_template("smolvlm2")
    # The published template reads content[0]['type']: a string renders, empty.
    dropped = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(messages=[{"role": "user", "content": "<__media__>\nHi?"}], add_generation_prompt=True)
    )
    assert "Hi?" not in dropped
    rendered = chat.render(template, "Hi?", media_marker="<__media__>")
    assert "<__media__>\nHi?" in rendered


def test_exactly_one_bos(family_model):
    image = synthetic_image(120, 90, seed=1)
    for with_image in (True, False):
        prompt = family_model.render_prompt(QUESTION, image=with_image)
        tokens, _ = mtmd_counts(family_model, prompt, image) if with_image else (None, 0)
        if tokens is None:  # text only: libmtmd is not involved, our tokenizer adds BOS
            tokens = family_model.tokenize(prompt, add_bos=family_model.add_bos)
        n_bos = tokens.count(family_model.bos_id) if family_model.add_bos else 0
        assert n_bos == (1 if family_model.add_bos else 0), (with_image, tokens[:4])
        if family_model.add_bos:
            assert tokens[0] == family_model.bos_id


def test_output_depends_on_image_and_question(family_model):
    def first_logits(question: str, seed: int) -> np.ndarray:
        session = family_model.session()
        session.prefill(
            family_model.render_prompt(question, image=True), synthetic_image(160, 120, seed=seed)
        )
        return session.logits()

    base = first_logits(QUESTION, 1)
    assert np.allclose(base, first_logits(QUESTION, 1), atol=1e-4)  # deterministic
    assert np.abs(base - first_logits(QUESTION, 9)).max() > 0.05  # another image
    assert np.abs(base - first_logits("How many dogs are there?", 1)).max() > 0.05  # another question


@pytest.mark.parametrize("mode", ["small", "large", "large-think"])
def test_each_mode_through_the_cli(family, mode, tmp_path, isolated_env):
    image = _image_file(tmp_path, 320, 240)
    args = _model_args(family) + ["--mode", mode, "--think-budget", "24", "--json", "--threads", "2"]
    out = run_cli(["ask", str(image), QUESTION + " A. blue B. green", *args], isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)
    assert data["mode"] == mode and data["answer"] in {"A", "B"}
    agent = data["small"] if mode == "small" else data["large"]
    assert agent["tokens"]["image"] > 0 and agent["tokens"]["generated"] >= 1


@pytest.mark.parametrize(("width", "height"), [(64, 48), (300, 500), (4032, 3024)])
def test_duo_transfer_on_three_image_sizes(family, width, height, tmp_path, isolated_env):
    image = _image_file(tmp_path, width, height)
    # A 12 MP photo in a 1024-token context: the image cap derived from --ctx
    # makes libmtmd downsize it, or the context error says what to do.
    ctx = "1024" if width > 1000 else "4096"
    args = _model_args(family) + ["--policy", "always", "--think-budget", "24", "--json", "--ctx", ctx]
    out = run_cli(["ask", str(image), "Is it a cat?", *args], isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)
    assert data["route"] == "transfer" and data["answer"].lower() in {"yes", "no"}
    assert data["transferred"]["prefill_tokens"] >= 1
    # The JSON's image tokens are libmtmd's own count for the same image and cap.
    cap = AskOptions(think_budget=24).image_token_budget(int(ctx))
    settings = EngineSettings(n_ctx=int(ctx), image_max_tokens=cap)
    model = VisionLanguageModel(family.model, family.mmproj, settings, name=family.name)
    _, n_image = mtmd_counts(model, model.render_prompt("Is it a cat?", image=True), load_image(str(image)))
    assert data["large"]["tokens"]["image"] == data["small"]["tokens"]["image"] == n_image
    assert n_image + data["large"]["tokens"]["prompt"] < int(ctx)


def _model_args(family: FamilyFiles) -> list[str]:
    paths = [str(family.model), str(family.mmproj)]
    return ["--small", paths[0], "--small-mmproj", paths[1], "--large", paths[0], "--large-mmproj", paths[1]]


@pytest.mark.parametrize("name", ["qwen3-vl-instruct", "qwen2.5-vl"])
def test_kv_prefix_reuse_matches_a_fresh_run_on_mrope(family_dir, name):
    files = _build(family_dir, name)
    model = VisionLanguageModel(files.model, files.mmproj, EngineSettings(n_ctx=2048, n_threads=2))
    assert model.uses_mrope
    prompt = model.render_prompt(QUESTION, image=True)
    suffix = "The sky is blue and the grass is green. So"
    image, other = synthetic_image(200, 150, seed=4), synthetic_image(200, 150, seed=5)

    cached = model.session()
    cached.prefill(prompt, image)
    prefix_end, encode_ms = cached.n_past, cached.times.get("encode")
    assert cached.n_kv > cached.n_past  # M-RoPE: the image filled more cells than positions
    cached.generate(6)  # a first answer, thrown away as the duo pipeline does
    cached.rewind(prefix_end)
    cached.append(suffix, stage="transfer_prefill")
    reused = cached.logits()
    assert cached.times.get("encode") == encode_ms  # no second encode

    def fresh(img: LoadedImage) -> np.ndarray:
        session = model.session()
        session.prefill(prompt + suffix, img)
        assert session.n_kv == cached.n_kv
        return session.logits()

    same = fresh(image)
    assert np.allclose(reused, same, atol=0.02), np.abs(reused - same).max()
    # Negative control: the same text after another image gives other logits.
    assert np.abs(same - fresh(other)).max() > 0.1


def test_projector_of_another_family_is_refused_in_one_line(family_dir):
    qwen, gemma = _build(family_dir, "qwen3-vl-instruct"), _build(family_dir, "gemma3")
    with pytest.raises(ProjectorMismatchError, match="not a pair") as info:
        VisionLanguageModel(qwen.model, gemma.mmproj, EngineSettings(n_ctx=512))
    assert "\n" not in info.value.message


def test_model_without_bos_token_does_not_abort(family_dir):
    files = _build(family_dir, "qwen3-vl-instruct")
    model = VisionLanguageModel(files.model, files.mmproj, EngineSettings(n_ctx=512))
    assert model.piece(-1) == b""  # LLAMA_TOKEN_NULL, what a vocabulary without BOS reports
