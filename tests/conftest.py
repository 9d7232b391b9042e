"""Shared fixtures: synthetic GGUF VLMs built once per test run, loaded through llama.cpp."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmduo.models.synthetic import SyntheticSpec, build

SMALL = SyntheticSpec(n_vocab=512, n_embd=128, n_layer=2, n_ff=256, n_head=4, n_head_kv=2, seed=1)
# Several times the small model's cost per token, as the duo pipeline assumes.
LARGE = SyntheticSpec(n_vocab=512, n_embd=512, n_layer=4, n_ff=1024, n_head=8, n_head_kv=4, seed=2)


@dataclass(frozen=True)
class BuiltModel:
    spec: SyntheticSpec
    model: Path
    mmproj: Path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def small_files(model_dir: Path) -> BuiltModel:
    build(SMALL, model_dir / "small.gguf", model_dir / "small-mmproj.gguf", name="test-small")
    return BuiltModel(SMALL, model_dir / "small.gguf", model_dir / "small-mmproj.gguf")


@pytest.fixture(scope="session")
def large_files(model_dir: Path) -> BuiltModel:
    build(LARGE, model_dir / "large.gguf", model_dir / "large-mmproj.gguf", name="test-large")
    return BuiltModel(LARGE, model_dir / "large.gguf", model_dir / "large-mmproj.gguf")


@pytest.fixture(scope="session")
def small_model(small_files: BuiltModel):
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings

    return VisionLanguageModel(
        small_files.model, small_files.mmproj, EngineSettings(n_ctx=4096), name="test-small"
    )


@pytest.fixture(scope="session")
def large_model(large_files: BuiltModel):
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings

    return VisionLanguageModel(
        large_files.model, large_files.mmproj, EngineSettings(n_ctx=4096), name="test-large"
    )


@pytest.fixture
def image():
    from vlmduo.media.images import synthetic_image

    return synthetic_image(96, 72, seed=3)


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    from PIL import Image

    from vlmduo.media.images import synthetic_image

    img = synthetic_image(96, 72, seed=3)
    path = tmp_path / "photo.png"
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(path)
    return path


def cli_env(root: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: config and caches under ``root``, and no network."""
    env = dict(os.environ)
    env.update(
        VLMDUO_HOME=str(root / "home"),
        VLMDUO_CACHE=str(root / "cache"),
        HF_HOME=str(root / "hf"),
        HF_HUB_OFFLINE="1",
        NO_COLOR="1",
        COLUMNS="120",
    )
    env.pop("VLMDUO_DEBUG", None)
    return env


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Environment for CLI subprocesses: own config, caches, and no network."""
    return cli_env(tmp_path)


def run_cli(
    args: list[str], env: dict[str, str], stdin: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m vlmduo ARGS`` the way a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "vlmduo", *args], input=stdin, env=env, capture_output=True, timeout=timeout
    )


def interrupt_after(command: list[str], env: dict[str, str], seconds: float) -> tuple[int, bytes]:
    """Start ``command``, send it SIGINT after ``seconds`` (it must still run), and return
    its exit code and stderr once it ends."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(seconds)
    assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)  # a hang guard, not a timing claim
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err
