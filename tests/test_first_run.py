"""A first run that tells the truth: the shipped example picture, doctor's account of the
pair, and errors that name every missing model and the ways to go on."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import FakeHub, fake_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]

REGISTRY = """
[models.tiny-a]
repo = "test-org/tiny-a-GGUF"
file = "tiny-a-Q4_K_M.gguf"
mmproj = "mmproj-tiny-a-F16.gguf"
size_gb = 1.5
role = "small"

[models.tiny-b]
repo = "test-org/tiny-b-GGUF"
file = "tiny-b-Q4_K_M.gguf"
mmproj = "mmproj-tiny-b-F16.gguf"
size_gb = 2.5
role = "large"

[models.missing-file]
repo = "test-org/tiny-a-GGUF"
file = "nope.gguf"
mmproj = "mmproj-tiny-a-F16.gguf"

[models.gated]
repo = "test-org/gated-GGUF"
file = "gated-Q4_K_M.gguf"
mmproj = "mmproj-gated.gguf"

[pairs.tiny]
small = "tiny-a"
large = "tiny-b"

[pairs.gated]
small = "tiny-a"
large = "gated"

[pairs.broken]
small = "tiny-a"
large = "missing-file"
"""


@pytest.fixture(scope="module")
def hub_server() -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_repo(
        "test-org/tiny-a-GGUF",
        {"tiny-a-Q4_K_M.gguf": fake_gguf(40_000, 1), "mmproj-tiny-a-F16.gguf": fake_gguf(20_000, 2)},
    )
    fake.add_repo(
        "test-org/tiny-b-GGUF",
        {"tiny-b-Q4_K_M.gguf": fake_gguf(30_000, 3), "mmproj-tiny-b-F16.gguf": fake_gguf(10_000, 4)},
    )
    fake.add_repo(
        "test-org/gated-GGUF",
        {"gated-Q4_K_M.gguf": fake_gguf(30_000, 5), "mmproj-gated.gguf": fake_gguf(10_000, 6)},
        token="hf_secret",
    )
    yield fake
    fake.stop()


@pytest.fixture
def env(isolated_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No HF_HUB_OFFLINE, a user registry with a tiny pair, a Hub that nothing answers."""
    home = Path(isolated_env["VLMDUO_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(REGISTRY, encoding="utf-8")
    env = {
        k: v
        for k, v in isolated_env.items()
        if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) and not k.lower().endswith("_proxy")
    }
    env.update(HF_ENDPOINT=_closed_port(), NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def doctor(env: dict[str, str], *args: str) -> dict:
    out = run_cli(["doctor", "--json", "--no-self-test", *args], env)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)["pair"]


# --- the shipped example --------------------------------------------------------------


def test_the_example_picture_is_package_data():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert '"example.png"' in pyproject
    assert (REPO_ROOT / "vlmduo" / "media" / "example.png").stat().st_size > 1000


def test_readme_first_run_asks_about_the_example(isolated_env):
    readme = (REPO_ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("<!-- test-command -->", 1)[0]
    command = next(line for line in setup.splitlines() if line.startswith("python3 -m venv"))
    assert "vlmduo doctor && vlmduo ask example " in command and "photo.jpg" not in command
    # The same question runs as written on the synthetic pair (no download here).
    question = command.split("vlmduo ask example ", 1)[1]
    args = ["ask", "example", json.loads(question), "--pair", "synthetic", "--think-budget", "16", "-q"]
    out = run_cli(args, isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() and out.stderr == b""


# --- doctor: is the pair there, is the Hub there, what next ---------------------------


def test_doctor_offline_says_the_pair_is_missing_and_how_to_get_it(isolated_env):
    pair = doctor(isolated_env)  # isolated_env has HF_HUB_OFFLINE=1
    assert pair["pair"] == "default" and pair["ready"] is False
    assert [m["name"] for m in pair["models"]] == ["qwen3-vl-2b-thinking", "qwen3-vl-8b-instruct"]
    assert all(m["downloaded"] is False for m in pair["models"])
    assert pair["hub"].startswith("not checked: offline")
    commands = [step["command"] for step in pair["next"]]
    assert commands[0] == "HF_HUB_OFFLINE=0 vlmduo pull --pair default"
    assert "--pair synthetic" in commands[1]


def test_doctor_with_the_hub_unreachable(env):
    pair = doctor(env, "--pair", "tiny")
    assert pair["endpoint"] == env["HF_ENDPOINT"]  # HF_ENDPOINT honoured
    assert pair["hub"].startswith("unreachable")
    assert pair["next"][0]["command"] == "vlmduo pull --pair tiny"
    assert "HF_ENDPOINT" in pair["next"][0]["note"]


def test_doctor_with_the_hub_reachable(env, hub_server):
    pair = doctor({**env, "HF_ENDPOINT": hub_server.url}, "--pair", "tiny")
    assert pair["hub"] == "reachable" and [m["hub"] for m in pair["models"]] == ["found", "found"]
    assert pair["next"][0]["command"] == "vlmduo pull --pair tiny"
    assert "~4.0 GB" in pair["next"][0]["note"]


def test_doctor_says_which_file_the_hub_lacks(env, hub_server):
    pair = doctor({**env, "HF_ENDPOINT": hub_server.url}, "--pair", "broken")
    assert pair["hub"] == "reachable"
    assert pair["models"][1]["hub"].startswith("not found: HTTP 404")
    assert "[models.missing-file]" in pair["next"][0]["note"]


def test_doctor_says_which_model_needs_a_token(env, hub_server):
    pair = doctor({**env, "HF_ENDPOINT": hub_server.url}, "--pair", "gated")
    assert pair["models"][0]["hub"] == "found" and pair["models"][1]["hub"].startswith("needs a token")
    assert pair["next"][0]["command"] == "HF_TOKEN=hf_... vlmduo pull --pair gated"


def test_doctor_when_the_pair_is_downloaded(env, hub_server):
    env = {**env, "HF_ENDPOINT": hub_server.url}
    assert run_cli(["pull", "--pair", "tiny", "-q"], env).returncode == 0
    pair = doctor(env, "--pair", "tiny")
    assert pair["ready"] is True
    assert pair["next"] == [
        {
            "command": 'vlmduo ask example "How many red circles are there?" --pair tiny',
            "note": "the pair is ready",
        }
    ]


def test_doctor_text_prints_each_command_on_one_line(isolated_env):
    out = run_cli(["doctor", "--no-self-test"], {**isolated_env, "COLUMNS": "60"})
    text = out.stdout.decode()
    assert "next: HF_HUB_OFFLINE=0 vlmduo pull --pair default\n" in text
    assert 'or: vlmduo ask example "How many red circles are there?" --pair synthetic\n' in text


# --- errors that name every missing model and the ways to go on -----------------------


def _error_and_hint(stderr: bytes) -> tuple[str, str]:
    lines = stderr.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), lines
    return lines[0], lines[1]


def test_offline_ask_names_both_models_and_every_way_on(isolated_env):
    out = run_cli(["ask", "example", "How many red circles are there?"], isolated_env)
    assert out.returncode == 1
    error, hint = _error_and_hint(out.stderr)
    assert "'qwen3-vl-2b-thinking' and 'qwen3-vl-8b-instruct' are not downloaded" in error
    assert "vlmduo pull --pair default" in hint
    assert "--pair synthetic" in hint and ".gguf" in hint and "--small-mmproj" in hint


def test_offline_ask_in_one_mode_names_its_model_only(isolated_env):
    out = run_cli(["ask", "example", "How many?", "--mode", "large"], isolated_env)
    error, hint = _error_and_hint(out.stderr)
    assert "'qwen3-vl-8b-instruct' is not downloaded" in error and "thinking" not in error
    assert "vlmduo pull qwen3-vl-8b-instruct" in hint and "--large PATH.gguf" in hint


def test_offline_pull_of_a_pair_names_both(isolated_env):
    out = run_cli(["pull", "--pair", "default"], isolated_env)
    error, hint = _error_and_hint(out.stderr)
    assert "'qwen3-vl-2b-thinking' and 'qwen3-vl-8b-instruct' are not downloaded" in error
    assert "HF_HUB_OFFLINE" in hint


def test_download_failure_from_ask_names_what_is_missing_and_the_other_ways(env):
    out = run_cli(["ask", "example", "How many?", "--pair", "tiny"], env)
    assert out.returncode == 1
    error, hint = _error_and_hint(out.stderr)
    assert f"cannot reach {env['HF_ENDPOINT']}" in error
    assert "still missing: tiny-a and tiny-b" in hint and "--pair synthetic" in hint
    assert "run it again" in hint


@pytest.mark.parametrize("command", [["pull", "missing-file"], ["ask", "example", "Q?", "--pair", "broken"]])
def test_no_hint_repeats_the_command_that_failed(env, hub_server, command):
    out = run_cli(command, {**env, "HF_ENDPOINT": hub_server.url})
    assert out.returncode == 1
    error, hint = _error_and_hint(out.stderr)
    assert "not found" in error
    assert "vlmduo pull" not in hint and "run it again" not in hint
    assert "[models.missing-file]" in hint
