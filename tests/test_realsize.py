"""Real-size simulated models: the build path on a scaled-down shape (no multi-GB files here).

The real shapes only get planned (names, quantisation, size estimates); the
build itself runs the same code on a Qwen3-VL shape a few MB large: streamed
writer, pool weights, llama.cpp's quantiser, the published projector type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from vlmduo.models import fixtures
from vlmduo.models.fixtures import common, qwen3vl
from vlmduo.study import realsize

# Rows of 256 so that K-quants apply, as on the real shapes.
SCALED = dict(
    variant="thinking",
    n_vocab=2048,
    n_embd=256,
    n_ff=512,
    n_layer=3,
    n_head=4,
    n_head_kv=2,
    head_dim=64,
    v_embd=64,
    v_layer=3,
    v_ff=128,
    v_head=2,
    deepstack_indexes="1",
    lm_ftype="f16",
)


def scaled_spec(folder: Path) -> realsize.RealSizeSpec:
    return realsize.RealSizeSpec(
        name="scaled-qwen3-vl",
        family="qwen3-vl",
        params=SCALED,
        quant="Q4_K_M",
        published="a scaled-down test shape",
        dims_source="tests/test_realsize.py",
        folder=folder,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> realsize.RealSizeSpec:
    spec = scaled_spec(tmp_path_factory.mktemp("simulated") / "scaled")
    seen: list[tuple[str, float, float]] = []
    realsize.build_spec(spec, threads=1, progress=lambda *step: seen.append(step))
    assert any("quantising to Q4_K_M" in desc for desc, _, _ in seen)
    assert any(desc.startswith("scaled-qwen3-vl model-f16") for desc, _, _ in seen)
    return spec


def _types(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def test_build_quantises_the_language_model_with_llama_cpp(built: realsize.RealSizeSpec) -> None:
    assert built.built()
    types = _types(built.model_path)
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q6_K"  # tied embeddings double as the output: Q6_K in Q4_K_M
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "Q6_K" in {types[f"blk.{i}.ffn_down.weight"] for i in range(3)}  # Q4_K_M's "more bits" layers
    reader = gguf.GGUFReader(built.model_path)
    assert reader.fields["general.file_type"].parts[-1][0] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "tokenizer.chat_template" in reader.fields


def test_projector_is_written_as_published(built: realsize.RealSizeSpec) -> None:
    types = _types(built.mmproj_path)
    assert types["v.blk.0.attn_qkv.weight"] == "Q8_0"
    assert types["v.patch_embd.weight"] == "F32"


def test_build_leaves_only_the_final_files(built: realsize.RealSizeSpec) -> None:
    names = sorted(p.name for p in built.folder.iterdir())
    assert names == ["build.json", "mmproj.gguf", "model.gguf"]  # no F16 model, no spool, no .tmp
    info = realsize.build_info(built)
    assert info["quant"] == "Q4_K_M" and info["dims_source"] == "tests/test_realsize.py"
    assert info["bytes"]["model"] < info["bytes"]["f16"] / 2
    assert info["bytes"]["model"] == built.model_path.stat().st_size
    json.dumps(info)


def test_built_model_loads_and_answers(built: realsize.RealSizeSpec) -> None:
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.media.images import synthetic_image

    model = VisionLanguageModel(built.model_path, built.mmproj_path, EngineSettings(n_ctx=512, n_threads=1))
    session = model.session()
    session.prefill(model.render_prompt("What is this?", image=True), synthetic_image(64, 64))
    assert session.n_image_tokens > 0
    assert len(list(session.stream(4))) >= 1


def test_seams_are_restored_even_after_a_failing_build(tmp_path: Path) -> None:
    spec = dataclasses.replace(scaled_spec(tmp_path / "bad"), params={**SCALED, "n_head_kv": 3})
    with pytest.raises(ValueError, match="n_head must divide"):
        realsize.build_spec(spec, threads=1)
    assert gguf.GGUFWriter.__name__ == "GGUFWriter"
    assert qwen3vl.Weights is common.Weights
    assert not spec.built() and not list((tmp_path / "bad").glob("*.gguf*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_spooling_writer_keeps_no_tensor_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Odd sizes: each tensor is followed by alignment padding in the spool.
    tensors = {f"blk.{i}.w": rng.standard_normal((3 + i, 7 + 2 * i)).astype(np.float32) for i in range(3)}
    with realsize.streaming_build("t", lambda *_: None):
        writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
        for name, data in tensors.items():
            writer.add_tensor(name, data)
        spooled = [info.tensor for info in writer.tensors[0].values()]
        spool = Path(os.readlink(f"/proc/self/fd/{writer.temp_file.fileno()}"))
        common.finish(writer)
    assert spooled == [None, None, None]  # the bytes went to disk
    assert spool.parent == tmp_path  # beside the output, never in a RAM-backed /tmp
    plain = gguf.GGUFWriter(str(tmp_path / "y.gguf"), "llama")  # negative control: keeps the array
    plain.add_tensor("blk.0.w", tensors["blk.0.w"])
    assert next(iter(plain.tensors[0].values())).tensor is tensors["blk.0.w"]
    read = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    assert set(read) == set(tensors)
    for name, data in tensors.items():
        assert np.array_equal(read[name].reshape(data.shape), data), name


def test_pool_weights_are_random_and_scaled() -> None:
    w = realsize.PoolWeights(seed=0)
    values = w.normal((3, 1 << 20), std=0.5)
    assert values.shape == (3, 1 << 20) and values.dtype == np.float32
    assert values.std() == pytest.approx(0.5, rel=0.02)
    assert not np.array_equal(values[0], values[1])  # chunks come from different offsets
    assert w.linear(8, 64).std() == pytest.approx(1 / 8, rel=0.3)


def test_real_shapes_are_planned_from_the_registry(tmp_path: Path) -> None:
    spec = realsize.spec_for("qwen3-vl-8b-instruct", tmp_path)
    assert spec.family == "qwen3-vl" and spec.quant == "Q4_K_M"
    assert spec.params["n_embd"] == 4096 and spec.params["n_layer"] == 36
    assert spec.params["lm_ftype"] == "f16"
    assert "Qwen3VL-8B-Instruct-Q4_K_M.gguf" in spec.published
    assert "REAL_SHAPES['qwen3-vl-8b-instruct']" in spec.dims_source
    sizes = realsize.estimate_bytes(spec)
    assert 15e9 < sizes["f16"] < 18e9  # 8.2 B weights in F16
    assert 5e9 < sizes["final"] < 7e9  # published: 5.0 GB model + 0.75 GB projector
    assert realsize.spec_for("qwen3-vl-2b-thinking", tmp_path).folder != spec.folder
    assert "qwen3-vl-2b-thinking" in realsize.real_shape_names()


def test_unknown_real_shape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no real shape for 'synthetic-small'"):
        realsize.spec_for("synthetic-small", tmp_path)


@pytest.mark.parametrize(
    ("file", "quant"),
    [
        ("Qwen3VL-8B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("SmolVLM2-500M-Video-Instruct-Q8_0.gguf", "Q8_0"),
        ("model-q4_0.gguf", "Q4_0"),
        ("model.gguf", "Q4_K_M"),
        (None, "Q4_K_M"),
    ],
)
def test_quant_of_a_published_name(file: str | None, quant: str) -> None:
    assert realsize.quant_of(file) == quant


def test_disk_check_names_the_shortfall(tmp_path: Path) -> None:
    realsize.check_disk(tmp_path / "new" / "dir", 1)
    with pytest.raises(OSError, match="GB free"):
        realsize.check_disk(tmp_path, 10**18)


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl", "gemma3", "smolvlm", "internvl"])
def test_every_family_builds_through_the_streamed_path(family: str, tmp_path: Path) -> None:
    """Each family's builder at its tiny default shape, through the same seams and quantiser."""
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings

    module = fixtures.builder(family)
    fields = {f.name for f in dataclasses.fields(module.Shape)}
    params = {"lm_ftype": "f16"} if "lm_ftype" in fields else {}
    spec = realsize.RealSizeSpec(family, family, params, "Q8_0", "tiny", "test", tmp_path / family)
    realsize.build_spec(spec, threads=1)
    assert gguf.GGUFReader(spec.model_path).fields["general.file_type"].parts[-1][0] == 7  # Q8_0
    model = VisionLanguageModel(spec.model_path, spec.mmproj_path, EngineSettings(n_ctx=512, n_threads=1))
    assert model.has_vision
