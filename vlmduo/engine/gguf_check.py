"""Check GGUF files before llama.cpp sees them.

libmtmd aborts the whole process on some projector files it does not expect, and
an abort cannot be caught. So a projector is read here first, with ggml's own
header reader (``gguf_meta``): is it GGUF at all, is it complete, is it a
projector. A model file gets only the checks that need no parse (there, a GGUF)
before llama.cpp, which refuses a bad model without aborting; when it refuses,
the model's header is read here to say why (truncated, corrupt, a projector).

Whether the projector's embeddings are as wide as the model takes is left to
libmtmd: it computes the width from the projector's tensors per projector type
(``clip_n_mmproj_embd``: Qwen3-VL stacks its deepstack layers, Gemma 3 reads
``mm_input_projection``, ...) and refuses a mismatch with a logged reason
instead of aborting. The engine turns that refusal into ProjectorMismatchError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlmduo.engine import gguf_meta
from vlmduo.errors import ModelError

GGUF_MAGIC = gguf_meta.MAGIC


@dataclass(frozen=True)
class GgufInfo:
    """What vlmduo needs to know about one GGUF file."""

    path: Path
    architecture: str
    n_embd: int | None  # language models: the main hidden width
    projector_type: str | None  # projectors: clip.projector_type (qwen3vl_merger, gemma3, ...)
    chat_template: str | None
    n_ctx_train: int | None


def read_info(path: Path, *, kind: str = "model") -> GgufInfo:
    """Read and sanity-check ``path``; ``kind`` ("model"/"mmproj") only shapes messages."""
    check_file(path, kind)
    try:
        header = gguf_meta.read_header(path)
    except (gguf_meta.GgufFormatError, ValueError, OverflowError, OSError) as exc:
        raise ModelError(f"{kind} file is corrupt or truncated: {path} ({exc})") from exc
    _check_complete(header, path, kind)
    arch = str(header.get("general.architecture") or "unknown")
    n_embd = header.get(f"{arch}.embedding_length")
    n_ctx = header.get(f"{arch}.context_length")
    return GgufInfo(
        path=path,
        architecture=arch,
        n_embd=int(n_embd) if n_embd is not None else None,
        projector_type=header.get("clip.projector_type") or header.get("clip.vision.projector_type"),
        chat_template=header.get("tokenizer.chat_template"),
        n_ctx_train=int(n_ctx) if n_ctx is not None else None,
    )


def check_pair(model: GgufInfo, mmproj: GgufInfo) -> None:
    """Raise when the files are in the wrong roles (the width check is libmtmd's)."""
    if model.architecture == "clip":
        raise ModelError(
            f"{model.path.name} is a projector (mmproj), not a language model",
            hint="pass the language model as the model and this file with --small-mmproj/--large-mmproj",
        )
    check_projector(mmproj)


def check_projector(mmproj: GgufInfo) -> None:
    """Raise unless ``mmproj`` is a projector file."""
    if mmproj.architecture != "clip":
        raise ModelError(f"{mmproj.path.name} is not a projector (mmproj) file")


def check_file(path: Path, kind: str) -> None:
    """Exists, is a file, starts with the GGUF magic: the checks that need no parse."""
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


def _check_complete(header: gguf_meta.GgufHeader, path: Path, kind: str) -> None:
    """Every tensor's bytes must lie inside the file (catches interrupted copies)."""
    size = os.path.getsize(path)
    end = max((header.data_start + t.offset + t.n_bytes for t in header.tensors), default=0)
    if end > size:
        raise ModelError(
            f"{kind} file is truncated: {path} has {size} bytes, its tensors need {end}",
            hint="download it again (vlmduo pull resumes)",
        )
