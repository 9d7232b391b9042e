"""Downloads against a local Hub (tests/hub_server.py): pull, resume, errors, offline, rm.

End-to-end cases run the real CLI in a subprocess, with HF_ENDPOINT, HF_HOME and
VLMDUO_HOME in its environment before huggingface_hub is imported. In-process cases
rely on vlmduo.models.hub reading those variables on every call (huggingface_hub's own
constants are read once, at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import default_sigint
from hub_server import FakeHub, fake_gguf

from vlmduo.errors import DiskSpaceError, OfflineError, UsageError
from vlmduo.models import hub
from vlmduo.models.registry import load_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_A = fake_gguf(400_000, 1)
MODEL_A_Q8 = fake_gguf(200_000, 2)
MMPROJ_A = fake_gguf(150_000, 3)
MODEL_B = fake_gguf(300_000, 4)
MMPROJ_B = fake_gguf(100_000, 5)
TOKEN = "hf_test_secret"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


USER_REGISTRY = f"""
[models.tiny-a]
repo = "test-org/tiny-a-GGUF"
file = "tiny-a-Q4_K_M.gguf"
mmproj = "mmproj-tiny-a-F16.gguf"
sha256 = "{sha(MODEL_A)}"
thinking = true
role = "small"

[models.tiny-a-q8]
repo = "test-org/tiny-a-GGUF"
file = "tiny-a-Q8_0.gguf"
mmproj = "mmproj-tiny-a-F16.gguf"

[models.tiny-b]
repo = "test-org/tiny-b-GGUF"
file = "tiny-b-Q4_K_M.gguf"
mmproj = "mmproj-tiny-b-F16.gguf"
role = "large"

[models.bad-pin]
repo = "test-org/tiny-b-GGUF"
file = "tiny-b-Q4_K_M.gguf"
mmproj = "mmproj-tiny-b-F16.gguf"
mmproj_sha256 = "{"0" * 64}"

[models.gated]
repo = "test-org/gated-GGUF"
file = "gated-Q4_K_M.gguf"
mmproj = "mmproj-gated.gguf"

[models.missing-file]
repo = "test-org/tiny-a-GGUF"
file = "nope.gguf"
mmproj = "mmproj-tiny-a-F16.gguf"

[models.missing-repo]
repo = "test-org/nope-GGUF"
file = "nope.gguf"
mmproj = "mmproj-nope.gguf"

[pairs.tiny]
small = "tiny-a"
large = "tiny-b"
"""


@pytest.fixture(scope="session")
def server() -> Iterator[FakeHub]:
    fake = FakeHub().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_hub(server: FakeHub) -> Iterator[FakeHub]:
    server.reset()
    server.add_repo(
        "test-org/tiny-a-GGUF",
        {"tiny-a-Q4_K_M.gguf": MODEL_A, "tiny-a-Q8_0.gguf": MODEL_A_Q8, "mmproj-tiny-a-F16.gguf": MMPROJ_A},
    )
    server.add_repo(
        "test-org/tiny-b-GGUF", {"tiny-b-Q4_K_M.gguf": MODEL_B, "mmproj-tiny-b-F16.gguf": MMPROJ_B}
    )
    server.add_repo(
        "test-org/gated-GGUF", {"gated-Q4_K_M.gguf": MODEL_B, "mmproj-gated.gguf": MMPROJ_B}, token=TOKEN
    )
    yield server
    server.reset()


@pytest.fixture
def env(tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An isolated environment (also applied to this process) pointing at the fake Hub."""
    home = tmp_path / "vlmduo-home"
    home.mkdir()
    (home / "models.toml").write_text(USER_REGISTRY, encoding="utf-8")
    for key in list(os.environ):
        if key.startswith(("HF_", "HUGGINGFACE_")) or key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    values = {
        "HF_ENDPOINT": fake_hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "VLMDUO_HOME": str(home),
        "VLMDUO_CACHE": str(tmp_path / "vlmduo-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


def vlmduo(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; stdout and stderr captured separately."""
    return subprocess.run(
        [sys.executable, "-m", "vlmduo.cli.app", *args],
        cwd=REPO_ROOT,
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=120,
    )


def repo_dir(env: dict[str, str], repo: str) -> Path:
    return Path(env["HF_HOME"]) / "hub" / ("models--" + repo.replace("/", "--"))


def snapshot_file(env: dict[str, str], repo: str, filename: str) -> Path | None:
    found = list((repo_dir(env, repo) / "snapshots").glob(f"*/{filename}"))
    return found[0] if found else None


def models_json(env: dict[str, str]) -> dict[str, dict]:
    result = vlmduo(env, "models", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)["models"]}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


# --- pulling -------------------------------------------------------------------------


def test_pull_downloads_both_files_into_the_hf_cache(env: dict[str, str], fake_hub: FakeHub) -> None:
    result = vlmduo(env, "pull", "tiny-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "tiny-a" in result.stderr
    model = snapshot_file(env, "test-org/tiny-a-GGUF", "tiny-a-Q4_K_M.gguf")
    mmproj = snapshot_file(env, "test-org/tiny-a-GGUF", "mmproj-tiny-a-F16.gguf")
    assert model is not None and model.read_bytes() == MODEL_A
    assert mmproj is not None and mmproj.read_bytes() == MMPROJ_A
    # The standard layout: snapshot links into content-addressed blobs, a ref for main.
    assert model.resolve().parent.name == "blobs" and model.resolve().name == sha(MODEL_A)
    assert (repo_dir(env, "test-org/tiny-a-GGUF") / "refs" / "main").read_text() == model.parent.name
    assert not list(repo_dir(env, "test-org/tiny-a-GGUF").glob("blobs/*.incomplete"))
    gets = [r for r in fake_hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    assert len(gets) == 2 and all(r.range is None for r in gets)


def test_pull_pair_downloads_both_models(env: dict[str, str]) -> None:
    result = vlmduo(env, "pull", "--pair", "tiny")
    assert result.returncode == 0, result.stderr
    rows = models_json(env)
    assert rows["tiny-a"]["downloaded"] and rows["tiny-b"]["downloaded"]


def test_models_json_shows_what_is_downloaded(env: dict[str, str]) -> None:
    before = models_json(env)
    assert before["tiny-a"]["downloaded"] is False and before["tiny-a"]["size_on_disk"] == 0
    assert before["qwen3-vl-8b-instruct"]["source"] == "hub"  # shipped entries listed too
    assert vlmduo(env, "pull", "tiny-a").returncode == 0
    after = models_json(env)
    assert after["tiny-a"]["downloaded"] is True
    assert after["tiny-a"]["size_on_disk"] == len(MODEL_A) + len(MMPROJ_A)
    assert after["tiny-a-q8"]["downloaded"] is False  # shares the projector, not the model
    table = vlmduo(env, "models")
    assert table.returncode == 0 and "tiny-a" in table.stdout and "Pairs" in table.stdout


def test_with_files_present_no_network_request_at_all(env: dict[str, str], fake_hub: FakeHub) -> None:
    assert vlmduo(env, "pull", "tiny-a").returncode == 0
    fake_hub.requests.clear()
    assert vlmduo(env, "pull", "tiny-a").returncode == 0
    assert vlmduo(env, "models", "--json").returncode == 0
    # In this process too: HF_HOME and HF_ENDPOINT were set after huggingface_hub's import.
    model, mmproj = hub.ensure_files(load_registry().model("tiny-a"))
    assert model.read_bytes() == MODEL_A and mmproj.read_bytes() == MMPROJ_A
    assert fake_hub.requests == []


def test_resume_after_the_connection_is_cut(env: dict[str, str], fake_hub: FakeHub) -> None:
    fake_hub.cut["tiny-a-Q4_K_M.gguf"] = 150_000
    result = vlmduo(env, "pull", "tiny-a")
    assert result.returncode == 0, result.stderr
    model = snapshot_file(env, "test-org/tiny-a-GGUF", "tiny-a-Q4_K_M.gguf")
    assert model is not None and model.read_bytes() == MODEL_A
    ranges = [r.range for r in fake_hub.requests if r.method == "GET" and r.range]
    assert ranges == ["bytes=150000-"]


def test_interrupted_pull_exits_130_and_the_next_pull_resumes(env: dict[str, str], fake_hub: FakeHub) -> None:
    fake_hub.stall["tiny-a-Q4_K_M.gguf"] = 120_000
    partial = repo_dir(env, "test-org/tiny-a-GGUF") / "blobs" / f"{sha(MODEL_A)}.incomplete"
    process = subprocess.Popen(
        [sys.executable, "-m", "vlmduo.cli.app", "pull", "tiny-a"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert fake_hub.stalled.wait(timeout=60)
        deadline = time.monotonic() + 20
        while (not partial.exists() or partial.stat().st_size < 120_000) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        fake_hub.release.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert partial.stat().st_size == 120_000  # kept for the next pull
    result = vlmduo(env, "pull", "tiny-a")
    assert result.returncode == 0, result.stderr
    assert "bytes=120000-" in [r.range for r in fake_hub.requests]
    model = snapshot_file(env, "test-org/tiny-a-GGUF", "tiny-a-Q4_K_M.gguf")
    assert model is not None and model.read_bytes() == MODEL_A  # the pinned sha256 matched
    assert not partial.exists()


# --- errors: one line each, exit 1 ---------------------------------------------------


def test_checksum_mismatch_names_the_file_and_deletes_only_it(env: dict[str, str]) -> None:
    result = vlmduo(env, "pull", "bad-pin")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "checksum mismatch for mmproj-tiny-b-F16.gguf of 'bad-pin'" in line
    assert "Traceback" not in result.stderr
    blobs = repo_dir(env, "test-org/tiny-b-GGUF") / "blobs"
    assert not (blobs / sha(MMPROJ_B)).exists()
    assert not list(blobs.glob("*.incomplete"))
    model = snapshot_file(env, "test-org/tiny-b-GGUF", "tiny-b-Q4_K_M.gguf")
    assert model is not None and model.read_bytes() == MODEL_B  # the good file stays


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing-file", "file nope.gguf not found in test-org/tiny-a-GGUF"),
        ("missing-repo", "repository test-org/nope-GGUF not found"),
        ("gated", "test-org/gated-GGUF is gated"),
        ("tiny-aa", "unknown model 'tiny-aa'; did you mean tiny-a"),
    ],
)
def test_download_errors_are_one_line(env: dict[str, str], name: str, expected: str) -> None:
    result = vlmduo(env, "pull", name)
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert expected in line
    assert "Traceback" not in result.stderr and "Hint:" in result.stderr
    assert result.stdout == ""


def test_gated_repo_downloads_with_hf_token(env: dict[str, str], fake_hub: FakeHub) -> None:
    result = vlmduo(env, "pull", "gated", HF_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    heads = [r for r in fake_hub.requests if r.method == "HEAD"]
    assert heads and all(r.authorization == f"Bearer {TOKEN}" for r in heads)
    cdn = [r for r in fake_hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)  # the token stays on the Hub


def test_unreachable_hub(env: dict[str, str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = vlmduo(env, "pull", "tiny-a", HF_ENDPOINT=closed)
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert f"cannot reach {closed}" in line


def test_not_enough_disk_space_fails_before_downloading(
    env: dict[str, str], fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Usage:
        free = 1_000

    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(DiskSpaceError, match="not enough disk space") as caught:
        hub.ensure_files(load_registry().model("tiny-a"))
    assert "vlmduo pull tiny-a" in (caught.value.hint or "")
    assert [r.method for r in fake_hub.requests if not r.path.startswith("/api/")] == ["HEAD", "HEAD"]
    assert hub.cached_files(load_registry().model("tiny-a")) == (None, None)


# --- offline -------------------------------------------------------------------------


def test_offline_without_files_names_the_pull_command(env: dict[str, str], fake_hub: FakeHub) -> None:
    result = vlmduo(env, "pull", "tiny-a", HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "'tiny-a' is not downloaded and offline mode is on" in line
    assert "run: vlmduo pull tiny-a" in result.stderr
    assert fake_hub.requests == []
    with pytest.raises(OfflineError):
        hub.ensure_files(load_registry().model("tiny-a"), offline=True)


def test_offline_with_files_works_without_the_network(env: dict[str, str], fake_hub: FakeHub) -> None:
    assert vlmduo(env, "pull", "tiny-a").returncode == 0
    fake_hub.requests.clear()
    result = vlmduo(env, "pull", "tiny-a", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    model, _ = hub.ensure_files(load_registry().model("tiny-a"), offline=True)
    assert model.read_bytes() == MODEL_A
    assert fake_hub.requests == []


# --- rm ------------------------------------------------------------------------------


def test_rm_frees_the_files(env: dict[str, str]) -> None:
    assert vlmduo(env, "pull", "tiny-a").returncode == 0
    result = vlmduo(env, "rm", "tiny-a")
    assert result.returncode == 0, result.stderr
    assert "freed" in result.stderr
    assert not repo_dir(env, "test-org/tiny-a-GGUF").exists()
    assert models_json(env)["tiny-a"]["downloaded"] is False
    again = vlmduo(env, "rm", "tiny-a")
    assert again.returncode == 0 and "nothing to remove" in again.stderr


def test_rm_keeps_a_projector_another_entry_uses(env: dict[str, str]) -> None:
    assert vlmduo(env, "pull", "tiny-a", "tiny-a-q8").returncode == 0
    assert vlmduo(env, "rm", "tiny-a").returncode == 0
    assert snapshot_file(env, "test-org/tiny-a-GGUF", "tiny-a-Q4_K_M.gguf") is None
    rows = models_json(env)
    assert rows["tiny-a-q8"]["downloaded"] is True and rows["tiny-a"]["downloaded"] is False
    assert vlmduo(env, "rm", "tiny-a-q8").returncode == 0
    assert not repo_dir(env, "test-org/tiny-a-GGUF").exists()


def test_remove_returns_freed_bytes_in_process(env: dict[str, str]) -> None:
    registry = load_registry()
    hub.pull(["tiny-b"], registry=registry, progress=False)
    assert hub.entry_status(registry.model("tiny-b")).downloaded
    # bad-pin names the very same files, so with the registry they are kept for it.
    assert hub.remove(registry.model("tiny-b"), registry=registry) == 0
    assert hub.remove(registry.model("tiny-b")) == len(MODEL_B) + len(MMPROJ_B)
    assert hub.remove(registry.model("tiny-b")) == 0


def test_synthetic_entries_are_built_files_and_rm_deletes_them(env: dict[str, str]) -> None:
    from vlmduo.models.synthetic import synthetic_paths

    entry = load_registry().model("synthetic-small")
    assert hub.entry_status(entry).downloaded is False
    paths = synthetic_paths(entry.name, entry.synthetic or {})
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"GGUF" + b"\0" * 96)
    status = hub.entry_status(entry)
    assert status.downloaded and status.size_bytes == 200
    assert hub.remove(entry) == 200
    assert not any(path.exists() for path in paths)


def test_local_entries_are_never_deleted(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.gguf").write_bytes(b"GGUF")
    home = Path(env["VLMDUO_HOME"])
    with (home / "models.toml").open("a") as handle:
        handle.write(f'[models.mine]\npath = "{tmp_path / "m.gguf"}"\nmmproj = "{tmp_path / "p.gguf"}"\n')
    entry = load_registry().model("mine")
    assert hub.ensure_files(entry) == (tmp_path / "m.gguf", tmp_path / "p.gguf")
    with pytest.raises(UsageError):
        hub.remove(entry)
    assert (tmp_path / "m.gguf").exists()


def test_pull_needs_a_name(env: dict[str, str]) -> None:
    result = vlmduo(env, "pull")
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["Error: name at least one model, or a pair with --pair"]
