"""The real command line, run as a user's shell would: exit codes, stdout, stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from vlmduo.models.synthetic import SyntheticSpec, build


@pytest.fixture
def model_args(small_files, large_files) -> list[str]:
    return [
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
        "--think-budget", "24",
    ]  # fmt: skip


def _no_traceback(stderr: bytes) -> None:
    assert b"Traceback" not in stderr


def test_default_output_answer_on_stdout_table_on_stderr(image_file, model_args, isolated_env):
    out = run_cli(["ask", str(image_file), "Which? A. cat B. dog", *model_args], isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() in {"A", "B"}
    err = out.stderr.decode()
    for stage in ("load", "image", "encode", "prefill", "decode", "total"):
        assert stage in err
    # llama.cpp's own log lines stay off the terminal.
    assert "llama_model_loader" not in err and "clip_model_loader" not in err
    _no_traceback(out.stderr)


def test_json_is_exactly_one_object_with_the_contract_keys(image_file, model_args, isolated_env):
    out = run_cli(
        ["ask", str(image_file), "Is it a cat?", *model_args, "--json", "--policy", "always"], isolated_env
    )
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)  # the whole stdout is one JSON document
    assert set(data) >= {
        "answer",
        "mode",
        "policy",
        "route",
        "format",
        "small",
        "large",
        "transferred",
        "timings_ms",
    }
    assert data["mode"] == "duo" and data["policy"] == "always" and data["route"] == "transfer"
    assert data["format"] == "yesno"
    for agent in (data["small"], data["large"]):
        assert set(agent) >= {"model", "answer", "reasoning", "tokens", "timings_ms"}
        assert set(agent["tokens"]) == {"prompt", "image", "generated", "cached"}
        assert set(agent["timings_ms"]) >= {"load", "image", "encode", "prefill", "decode"}
    assert set(data["transferred"]) >= {"selector", "tokens", "text"}
    assert set(data["timings_ms"]) >= {
        "total",
        "critical_path",
        "select",
        "transfer_prefill",
        "answer_decode",
        "process",
    }
    # The process figure holds everything else: the interpreter's start, imports, loading.
    assert data["timings_ms"]["process"] > data["timings_ms"]["total"] > 0
    assert out.stderr == b""


@pytest.mark.parametrize("mode", ["small", "large", "large-think"])
def test_quiet_prints_only_the_answer(image_file, model_args, isolated_env, mode):
    out = run_cli(["ask", str(image_file), "How many cats?", *model_args, "--mode", mode, "-q"], isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    float(out.stdout.decode().strip())
    assert out.stderr == b""


def test_image_from_stdin(image_file, model_args, isolated_env):
    out = run_cli(
        ["ask", "-", "Is it raining?", *model_args, "--mode", "large", "-q"],
        isolated_env,
        stdin=image_file.read_bytes(),
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip().lower() in {"yes", "no"}


def test_show_reasoning_goes_to_stderr(image_file, model_args, isolated_env):
    out = run_cli(
        ["ask", str(image_file), "Is it a cat?", *model_args, "--policy", "always", "--show-reasoning"],
        isolated_env,
    )
    assert out.returncode == 0
    assert "[small reasoning]" in out.stderr.decode() and "[transferred" in out.stderr.decode()
    assert "[small reasoning]" not in out.stdout.decode()


def test_show_reasoning_beside_json_keeps_stdout_one_object(image_file, model_args, isolated_env):
    args = ["ask", str(image_file), "Is it a cat?", *model_args, "--json", "--show-reasoning"]
    out = run_cli(args, isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    json.loads(out.stdout)
    assert "[small reasoning]" in out.stderr.decode()


def _bad_mmproj(tmp_path, small_files):
    build(SyntheticSpec(proj_embd=96), tmp_path / "x.gguf", tmp_path / "wrong-mmproj.gguf")
    return tmp_path / "wrong-mmproj.gguf"


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("missing image", 1, "image not found"),
        ("not an image", 1, "not an image"),
        ("empty question", 2, "question is empty"),
        ("bad mode", 2, "unknown mode"),
        ("missing model", 1, "model file not found"),
        ("not gguf", 1, "not a GGUF file"),
        ("mismatched projector", 1, "not a pair"),
        ("context too small", 1, "context holds"),
        ("unknown registry name", 1, "unknown model"),
    ],
)
def test_errors_are_one_line_with_exit_codes(
    tmp_path, image_file, small_files, model_args, isolated_env, case, code, needle
):
    args = ["ask", str(image_file), "Is it a cat?", *model_args]
    if case == "missing image":
        args[1] = str(tmp_path / "nope.jpg")
    elif case == "not an image":
        (tmp_path / "notes.txt").write_text("hello")
        args[1] = str(tmp_path / "notes.txt")
    elif case == "empty question":
        args[2] = "  "
    elif case == "bad mode":
        args += ["--mode", "fast"]
    elif case == "missing model":
        args[args.index("--small") + 1] = str(tmp_path / "missing.gguf")
    elif case == "not gguf":
        (tmp_path / "fake.gguf").write_text("not a model")
        args[args.index("--small") + 1] = str(tmp_path / "fake.gguf")
    elif case == "mismatched projector":
        args[args.index("--small-mmproj") + 1] = str(_bad_mmproj(tmp_path, small_files))
    elif case == "context too small":
        args += ["--ctx", "300", "--think-budget", "400"]
    elif case == "unknown registry name":
        args[args.index("--small") + 1] = "no-such-model"
    out = run_cli(args, isolated_env)
    err = out.stderr.decode()
    assert out.returncode == code, err
    assert needle.lower() in err.lower()
    assert out.stdout == b""
    _no_traceback(out.stderr)
    # The documented form: one Error line, then at most one Hint line, nothing else.
    lines = err.splitlines()
    assert lines[0].startswith("Error: ") and len(lines) <= 2, lines
    assert all(line.startswith("Hint: ") for line in lines[1:]), lines


def test_debug_shows_the_traceback(tmp_path, model_args, isolated_env):
    out = run_cli(
        ["ask", str(tmp_path / "nope.png"), "Q?", *model_args], {**isolated_env, "VLMDUO_DEBUG": "1"}
    )
    assert out.returncode == 1 and b"Traceback" in out.stderr


def test_help_has_examples(isolated_env):
    out = run_cli(["ask", "--help"], isolated_env)
    assert out.returncode == 0 and b"Examples" in out.stdout and b"--think-budget" in out.stdout


def test_doctor_self_test_on_synthetic_models(isolated_env):
    out = run_cli(["doctor", "--json"], {**isolated_env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr.decode()
    data = json.loads(out.stdout)
    assert data["ok"] and data["self_test"]["route"] == "transfer"
    assert data["backend"] in {"CPU", "CUDA", "Metal", "Vulkan"} or "+" in data["backend"]
    assert data["offline"] is True
    assert data["versions"]["llama-cpp-python"] != "not installed"


OMP = "CPU : AVX2 = 1 | OPENMP = 1 |"


@pytest.mark.parametrize(
    ("info", "env", "expected"),
    [
        (OMP, {}, "GOMP_SPINCOUNT=300000 (libgomp's default, 100 while busy)"),
        (OMP, {"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE (yours)"),
        (OMP, {"GOMP_SPINCOUNT": "1000"}, "GOMP_SPINCOUNT=1000 (yours, 100 while busy)"),
        (OMP, {"GOMP_SPINCOUNT": "10"}, "GOMP_SPINCOUNT=10 (yours, 10 while busy)"),
        ("CPU : AVX2 = 1 |", {}, "ggml thread pool"),
    ],
)
def test_doctor_threading_policy_line(info, env, expected):
    from vlmduo.engine.backend import threading_policy

    line = threading_policy(info, env)
    assert expected in line and "fewer while other programs keep cores busy" in line


def test_doctor_threading_policy_line_when_told_to_keep_the_threads():
    from vlmduo.engine.backend import threading_policy

    line = threading_policy(OMP, {"VLMDUO_FIXED_THREADS": "1"})
    assert "GOMP_SPINCOUNT=300000 (libgomp's default)" in line and "while busy" not in line
    assert "whatever the load" in line and "fewer" not in line


@pytest.mark.parametrize("mode", ["duo", "large"])
def test_an_ask_process_imports_only_what_it_uses(image_file, model_args, isolated_env, mode):
    # The start-up work of issue 9, held without a timing threshold: llama-cpp-python's
    # high-level API (and numpy) costs about 110 ms, urllib 15 ms (for URLs only).
    args = ["ask", str(image_file), "Which? A. cat B. dog", *model_args, "--mode", mode, "-q"]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vlmduo", *args], env=isolated_env, capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.decode().splitlines() if "|" in line}
    assert "vlmduo.engine" in imported and "jinja2" in imported  # the probe sees imports
    unused = {"numpy", "llama_cpp.llama", "llama_cpp.llama_chat_format", "urllib.request", "http.client"}
    assert not imported & unused


def test_importing_vlmduo_leaves_the_environment_alone(isolated_env):
    # A library must not change its host's process state at import.
    code = (
        "import os; before = dict(os.environ); import vlmduo, vlmduo.api, vlmduo.engine; "
        "print(before == dict(os.environ))"
    )
    env = {k: v for k, v in isolated_env.items() if k != "OMP_WAIT_POLICY"}  # 0.1 set it at import
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
