"""Options checked before any work: usage errors (exit 2) that say what was asked and what
is possible; the error form; the process clock."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import run_cli

from vlmduo.cli import checks
from vlmduo.errors import UsageError


@pytest.mark.parametrize(
    ("mode", "policy", "given", "refused"),
    [
        ("duo", "verify", {"policy", "selector", "transfer_budget", "sequential", "think_budget"}, None),
        ("large", "verify", {"policy"}, "--policy has no effect with --mode large"),
        ("small", "verify", {"selector"}, "--selector has no effect with --mode small"),
        ("large-think", "verify", {"selector"}, "--selector has no effect"),
        ("large", "verify", {"sequential"}, "--sequential has no effect"),
        # Budgets are caps: one on tokens the mode never generates holds trivially.
        ("large", "verify", {"think_budget", "transfer_budget", "max_answer_tokens"}, None),
        ("large-think", "verify", {"think_budget", "show_reasoning_flag"}, None),
        ("large", "verify", {"show_reasoning_flag"}, "--show-reasoning has no effect with --mode large"),
        (
            "duo",
            "verify",
            {"confidence_threshold"},
            "--confidence-threshold has no effect with --policy verify",
        ),
        ("duo", "confidence", {"confidence_threshold"}, None),
        (
            "small",
            "verify",
            {"confidence_threshold"},
            "--confidence-threshold has no effect with --mode small",
        ),
        # The models name a pair, as --pair does: any mode takes what it needs from them.
        ("small", "verify", {"small", "large", "small_mmproj", "large_mmproj", "pair"}, None),
        ("large", "verify", set(), None),
    ],
)
def test_options_apply_to_the_mode(mode, policy, given, refused):
    if refused is None:
        checks.applicable(mode, policy, given)
        return
    with pytest.raises(UsageError, match=refused) as caught:
        checks.applicable(mode, policy, given)
    # What is possible, in the message and again as the way out in the hint.
    assert caught.value.exit_code == 2 and "it applies to --" in caught.value.message
    assert (caught.value.hint or "").startswith("drop --")


@pytest.mark.parametrize(
    ("ctx", "threads", "refused"),
    [
        (4096, None, None),
        (256, 1, None),
        (300, 4, None),
        (4096, 0, "--threads 0: a model needs at least 1 thread"),
        (4096, -3, "--threads -3"),
        (64, None, "--ctx 64 is below llama.cpp's minimum context of 256 tokens"),
        (255, None, "--ctx 255"),
    ],
)
def test_engine_options(ctx, threads, refused):
    if refused is None:
        checks.engine(ctx=ctx, threads=threads)
        return
    with pytest.raises(UsageError, match=refused):
        checks.engine(ctx=ctx, threads=threads)


@pytest.mark.parametrize(
    ("question", "fmt", "refused"),
    [
        ("Which animal? A. cat B. dog", "choice", False),
        ("Which animal?\nA) cat\nB) dog", "choice", False),
        ("How many cats are there?", "choice", True),
        ("How many cats are there?", "number", False),
        ("How many cats are there?", "auto", False),
    ],
)
def test_choice_needs_options(question, fmt, refused):
    if not refused:
        checks.question_format(question, fmt)
        return
    with pytest.raises(UsageError, match="--format choice needs lettered options"):
        checks.question_format(question, fmt)


@pytest.mark.parametrize(
    ("image_max", "image_min", "refused"),
    [(None, None, None), (512, 64, None), (0, None, "--image-max-tokens 0"), (64, 128, "above")],
)
def test_image_token_limits(image_max, image_min, refused):
    if refused is None:
        checks.image_tokens(image_max_tokens=image_max, image_min_tokens=image_min)
        return
    with pytest.raises(UsageError, match=refused):
        checks.image_tokens(image_max_tokens=image_max, image_min_tokens=image_min)


def test_quiet_and_show_reasoning_conflict():
    checks.output(quiet=False, show_reasoning=True)
    checks.output(quiet=True, show_reasoning=False)
    with pytest.raises(UsageError, match="--quiet"):
        checks.output(quiet=True, show_reasoning=True)


# --- through the real command line: exit 2 before any work ----------------------------


@pytest.mark.parametrize(
    ("extra", "question", "needle"),
    [
        (["--threads", "0"], "Is it a cat?", "--threads 0"),
        (["--threads", "-3"], "Is it a cat?", "--threads -3"),
        (["--ctx", "64"], "Is it a cat?", "llama.cpp's minimum context of 256"),
        (["--format", "choice"], "How many cats?", "--format choice needs lettered options"),
        (
            ["--mode", "large", "--policy", "always"],
            "Is it a cat?",
            "--policy has no effect with --mode large",
        ),
        (["--show-reasoning", "-q"], "Is it a cat?", "--quiet"),
        (["--thread", "2"], "Is it a cat?", "No such option: --thread"),  # click's own, same form
        (["--ctx", "many"], "Is it a cat?", "Invalid value for '--ctx'"),
    ],
)
def test_usage_errors_come_before_any_work(tmp_path, isolated_env, extra, question, needle):
    # The image does not exist and the default pair is not downloaded (offline): a check
    # that ran after any work would fail on those instead, with exit 1.
    out = run_cli(["ask", str(tmp_path / "missing.jpg"), question, *extra], isolated_env)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert out.stdout == b""
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), err
    assert needle in lines[0]
    assert "╭" not in err and "Traceback" not in err


def test_without_the_checks_the_same_command_fails_later(tmp_path, isolated_env):
    # Negative control of the test above: a valid command reaches the image and fails there.
    out = run_cli(["ask", str(tmp_path / "missing.jpg"), "Is it a cat?", "--threads", "1"], isolated_env)
    assert out.returncode == 1 and "image not found" in out.stderr.decode()


def test_no_arguments_prints_the_help(isolated_env):
    out = run_cli([], isolated_env)
    assert b"Usage" in out.stdout and b"Traceback" not in out.stderr


# --- the process clock ---------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_process_clock_counts_from_the_interpreter_start():
    # Sleep before vlmduo is imported: a clock started by vlmduo's own code would miss it.
    code = (
        "import time; time.sleep(0.4); "
        "from vlmduo.cli.clock import process_ms; from vlmduo.cli import STARTED; "
        "ms, origin = process_ms(); print(origin, ms, (time.perf_counter() - STARTED) * 1000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    origin, process, since_import = out.stdout.split()
    assert origin == "start"
    assert float(process) >= 400.0 > float(since_import)
