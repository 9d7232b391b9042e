"""Check GGUF files before llama.cpp sees them.

llama.cpp aborts the whole process on some inputs it does not expect, and an
abort cannot be caught. So a model and its projector are read here first, with
the ``gguf`` package: is it GGUF at all, is it complete, and does the projector
produce embeddings as wide as the language model takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmduo.errors import ModelError, ProjectorMismatchError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """What vlmduo needs to know about one GGUF file."""

    path: Path
    architecture: str
    n_embd: int | None  # language models: the width image embeddings must have
    projection_dim: int | None  # projectors: the width they produce
    chat_template: str | None
    n_ctx_train: int | None


def read_info(path: Path, *, kind: str = "model") -> GgufInfo:
    """Read and sanity-check ``path``; ``kind`` ("model"/"mmproj") only shapes messages."""
    _check_file(path, kind)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors
        raise ModelError(f"{kind} file is corrupt or truncated: {path} ({exc})") from exc
    _check_complete(reader, path, kind)
    arch = _field(reader, "general.architecture") or "unknown"
    n_embd = _field(reader, f"{arch}.embedding_length")
    deepstack = _field(reader, f"{arch}.n_deepstack_layers") or 0
    if n_embd is not None:
        # Models with deepstack (Qwen3-VL) take image embeddings that are the
        # main width stacked (1 + n_deepstack_layers) times.
        n_embd = int(n_embd) * (1 + int(deepstack))
    proj = _field(reader, "clip.vision.projection_dim")
    if proj is None:
        proj = _projector_width_from_tensors(reader)
    return GgufInfo(
        path=path,
        architecture=str(arch),
        n_embd=n_embd,
        projection_dim=int(proj) if proj is not None else None,
        chat_template=_field(reader, "tokenizer.chat_template"),
        n_ctx_train=_field(reader, f"{arch}.context_length"),
    )


def check_pair(model: GgufInfo, mmproj: GgufInfo) -> None:
    """Raise when the projector's output width differs from the model's input width."""
    if model.architecture == "clip":
        raise ModelError(
            f"{model.path.name} is a projector (mmproj), not a language model",
            hint="pass the language model as the model and this file with --small-mmproj/--large-mmproj",
        )
    if mmproj.architecture != "clip":
        raise ModelError(f"{mmproj.path.name} is not a projector (mmproj) file")
    if model.n_embd and mmproj.projection_dim and model.n_embd != mmproj.projection_dim:
        raise ProjectorMismatchError(
            f"projector {mmproj.path.name} produces {mmproj.projection_dim}-wide embeddings "
            f"but model {model.path.name} takes {model.n_embd}: they are not a pair",
            hint="use the mmproj file published with this model",
        )


def _check_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise ModelError(f"{kind} file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{kind} path is a directory, not a .gguf file: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {kind} file {path}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file: {path}", hint="vlmduo needs GGUF models (llama.cpp)")


def _check_complete(reader: Any, path: Path, kind: str) -> None:
    """Every tensor's bytes must lie inside the file (catches interrupted copies)."""
    size = os.path.getsize(path)
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelError(
            f"{kind} file is truncated: {path} has {size} bytes, its tensors need {end}",
            hint="download it again (vlmduo pull resumes)",
        )


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # an unexpected type: treat as absent rather than guess
        return None


def _projector_width_from_tensors(reader: Any) -> int | None:
    """Fallback for projectors without projection_dim: the last ``mm.N`` layer's width."""
    best: tuple[int, int] | None = None
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 3 and parts[0] == "mm" and parts[1].isdigit() and parts[2] == "weight":
            layer = int(parts[1])
            if best is None or layer > best[0]:
                best = (layer, int(tensor.shape[-1]) if len(tensor.shape) else 0)
    # GGUFReader reports shapes in ggml order: ne[1] (the output width) is index 1.
    if best is None:
        return None
    for tensor in reader.tensors:
        if tensor.name == f"mm.{best[0]}.weight" and len(tensor.shape) >= 2:
            return int(tensor.shape[1])
    return None
