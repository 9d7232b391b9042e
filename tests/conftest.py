"""Shared fixtures: synthetic GGUF VLMs built once per test run, loaded through llama.cpp."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlmduo.models.synthetic import SyntheticSpec, build

pytest_plugins = ["real_models"]

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


def default_sigint() -> None:
    """In a child, before it runs: SIGINT's default disposition. A shell's background job
    inherits SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Endless test models (``endless = true``: greedy decoding never ends a generation or a
# thought), in the user's registry of a test: an interrupt always finds them at work.
ENDLESS_REGISTRY = """
[models.endless-small]
thinking = true
[models.endless-small.synthetic]
family = "qwen3-vl"
variant = "thinking"
seed = 1
endless = true
[models.endless-large.synthetic]
family = "qwen3-vl"
variant = "instruct"
n_embd = 256
n_ff = 768
head_dim = 64
seed = 2
endless = true
[pairs.endless]
small = "endless-small"
large = "endless-large"
"""


def with_endless_pair(env: dict[str, str]) -> dict[str, str]:
    """``env`` whose user registry has the ``endless`` pair (``--pair endless``)."""
    home = Path(env["VLMDUO_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(ENDLESS_REGISTRY)
    return env


def interrupt_when(
    command: list[str], env: dict[str, str], reported: bytes | Callable[[], bool], guard_s: float = 300
) -> tuple[int, bytes]:
    """Start ``command`` with its stderr on a terminal, wait until it reports ``reported``
    there (or until ``reported()`` is true), check that it still runs, send it SIGINT, and
    return its exit code and everything it wrote on stderr. It waits for states, never for
    a time: ``guard_s`` only ends a hang."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        command,
        env={**env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        preexec_fn=default_sigint,
    )
    os.close(slave)
    seen = bytearray()

    def read(wait_s: float) -> bool:
        """Read what is there within ``wait_s``; False once the terminal is closed."""
        if select.select([master], [], [], wait_s)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end
                return False
            seen.extend(chunk)
            return bool(chunk)
        return True

    try:
        deadline = time.monotonic() + guard_s
        ready = (lambda: reported in seen) if isinstance(reported, bytes) else reported
        while not ready():
            assert proc.poll() is None, "ended before it reported: " + seen.decode(errors="replace")
            assert time.monotonic() < deadline, "never reported: " + seen.decode(errors="replace")
            read(0.05)
        assert proc.poll() is None, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        while read(1.0) and time.monotonic() < deadline:
            pass
        proc.wait(timeout=60)  # a hang guard, not a timing claim
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, bytes(seen)
