"""Synthetic registry entries: random-weight GGUF VLMs built locally on first use.

A registry entry ``synthetic = {family = "qwen3-vl", ...}`` names a family
fixture builder (``vlmduo.models.fixtures``) and its shape; the files are built once
into ``$VLMDUO_CACHE/synthetic`` under a hash of the shape, so a changed shape
gets new files. Answers are meaningless, latency is real, and the code paths
are those of the family's published files. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmduo.models import fixtures
from vlmduo.models.fixtures.llama import Shape as SyntheticSpec
from vlmduo.models.fixtures.llama import build, vocabulary

__all__ = ["SyntheticSpec", "build", "cache_root", "ensure_built", "synthetic_paths", "vocabulary"]


def cache_root() -> Path:
    """Where synthetic models are built: ``$VLMDUO_CACHE`` or ``~/.cache/vlmduo``."""
    from vlmduo.paths import cache_dir

    return Path(cache_dir()) / "synthetic"


def synthetic_paths(name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Paths of a synthetic entry's model and projector, built or not."""
    folder = cache_root() / f"{name}-{fixtures.file_digest(params)}"
    return folder / "model.gguf", folder / "mmproj.gguf"


def ensure_built(name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Build a registry entry's synthetic model into the cache unless already there."""
    model_path, mmproj_path = synthetic_paths(name, params)
    if not (model_path.exists() and mmproj_path.exists()):
        fixtures.build(params, model_path, mmproj_path, name=name)
    return model_path, mmproj_path
