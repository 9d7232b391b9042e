"""Tables and help at 80 columns and in a pipe: names whole, nothing cut with an ellipsis."""

from __future__ import annotations

import io
import re

import pytest
from conftest import run_cli
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from vlmduo.agents.base import AgentResult
from vlmduo.cli.eval_cmd import category_tables, summary_tables
from vlmduo.cli.render import (
    Column,
    bar_chart,
    escape_controls,
    fitted_tables,
    pack_columns,
    print_tables,
    show_reasoning,
    timing_table,
)
from vlmduo.duo.pipeline import AskResult
from vlmduo.study.eval_run import EvalOutcome
from vlmduo.study.evaluation import ConfigSummary, Score, TokenStats

COMMANDS = ("ask", "models", "pull", "rm", "doctor", "eval", "bench")


def render(*renderables, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, highlight=False, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def widest(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


def pipe_env(isolated_env: dict[str, str]) -> dict[str, str]:
    """As a user's shell with stdout and stderr redirected: no COLUMNS, so rich takes 80."""
    return {k: v for k, v in isolated_env.items() if k not in ("COLUMNS", "LINES")}


# --- the fitting itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "width", "keys", "expected"),
    [
        ([10, 5, 5], 80, 1, [[0, 1, 2]]),  # fits: one table
        ([20, 30, 30], 60, 1, [[0, 1], [0, 2]]),  # 20+2+30+2+30 = 86 > 60: split, name repeated
        ([20, 30, 30, 5], 60, 1, [[0, 1], [0, 2, 3]]),
        ([20, 70], 60, 1, [[0, 1]]),  # a column wider than the room still gets its own table
        ([10, 10, 30, 30], 60, 2, [[0, 1, 2], [0, 1, 3]]),  # two key columns repeated
        ([10], 80, 1, [[0]]),
    ],
)
def test_pack_columns(widths, width, keys, expected):
    assert pack_columns(widths, width, keys) == expected


def test_fitted_tables_keep_every_name_whole_where_a_plain_table_cuts():
    names = [f"qwen3-vl-{n}b-{kind}" for n in (2, 4, 8) for kind in ("thinking", "instruct")]
    headers = ("name", "role", "thinking", "size", "memory", "downloaded", "verified", "repo")
    rows = [[name, "small", "yes", "~1.6 GB", "~2.5 GB", "no", "yes", f"Qwen/{name}-GGUF"] for name in names]
    plain = Table()
    for header in headers:
        plain.add_column(header)
    for row in rows:
        plain.add_row(*row)
    # Negative control: rich alone cuts the names at 80 columns.
    assert "…" in render(plain) and not all(name in render(plain) for name in names)
    columns = [Column(h, justify="right" if h in ("size", "memory") else "left") for h in headers]
    text = render(*fitted_tables("Models", columns, rows, width=80))
    assert "…" not in text and widest(text) <= 80
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
        assert f"Qwen/{name}-GGUF" in text
    assert text.count("name ") == 2  # split in two, the name column repeated


def test_numbers_are_right_aligned():
    rows = [["a", "1.5 GB"], ["b", "12.5 GB"]]
    text = render(*fitted_tables(None, [Column("n"), Column("size", justify="right")], rows, width=80))
    lines = [line.rstrip() for line in text.splitlines()]
    assert len({len(line) for line in lines}) == 1  # every number ends in the same column


def test_bar_chart_shrinks_to_fit_and_keeps_labels():
    rows = [("duo/confidence/surprisal", 1200.0, "1200.0 ms"), ("small", 600.0, "600.0 ms")]
    text = render(bar_chart("Latency", rows, width=60), width=60)
    assert widest(text) <= 60 and "duo/confidence/surprisal" in text and "…" not in text


# --- eval and ask tables --------------------------------------------------------------


def _summary(config: str, categories: dict[str, Score]) -> ConfigSummary:
    return ConfigSummary(
        config=config,
        n=200,
        n_correct=150,
        accuracy=0.75,
        categories=categories,
        small_tokens=TokenStats(200, 257.0, 257.0) if "duo" in config or config == "small" else None,
        large_tokens=TokenStats(200, 1.0, 1.0),
        latency_p50_ms=1001.6,
        latency_p90_ms=12080.6,
        routes={"transfer": 120, "agree": 80} if config.startswith("duo") else {},
        mean_transferred_tokens=64.0 if config.startswith("duo") else None,
        n_errors=0,
    )


def test_eval_tables_at_80_columns_cut_no_header_and_no_config():
    categories = {f"category_{i:02d}_recognition": Score(10, 7, 0.7) for i in range(20)}
    configs = ["small", "large", "large-think", "duo/verify/steps", "duo/confidence/surprisal"]
    outcome = EvalOutcome(
        dataset="mmbench_dev_en",
        results_path="r.jsonl",
        configs=configs,
        n_items=200,
        bad_items=[],
        n_run=1000,
        n_skipped=0,
        n_errors=0,
        interrupted=False,
        summaries=[_summary(c, categories) for c in configs],
    )
    console = Console(file=io.StringIO(), width=80, highlight=False, color_system=None)
    print_tables(console, summary_tables(outcome, 80))
    print_tables(console, category_tables(outcome, 80))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in text and widest(text) <= 80
    for header in ("config", "accuracy", "errors", "p50", "p90", "mean/med", "routes", "transferred"):
        assert header in text, header
    for config in configs:
        assert config in text
    for category in categories:
        assert category in text
    assert "12.08 s" in text and "transfer:120 agree:80" in text


def _agent(model: str) -> AgentResult:
    return AgentResult(
        model=model,
        answer="A",
        reasoning="step one\x1b[2J\x07 then\u202eevil\nstep two",
        tokens={"prompt": 57, "image": 1200, "generated": 257},
        timings_ms={"load": 1200.0, "image": 8.0, "encode": 780.0, "prefill": 70.0, "decode": 18100.0},
    )


def _result() -> AskResult:
    return AskResult(
        answer="A",
        mode="duo",
        policy="verify",
        route="transfer",
        format="choice",
        small=_agent("Qwen3VL-2B-Thinking-Q4_K_M"),
        large=_agent("Qwen3VL-8B-Instruct-Q4_K_M"),
        transferred={"selector": "steps", "tokens": 12, "text": "kept\x1b]0;title\x07 part"},
        timings_ms={"stage1": 19000.0, "total": 21000.0, "critical_path": 19500.0, "process": 21600.0},
    )


def test_timing_table_fits_80_columns_with_the_model_names_whole():
    text = render(timing_table(_result()))
    assert widest(text) <= 80 and "…" not in text
    assert "Qwen3VL-2B-Thinking-Q4_K_M" in text and "Qwen3VL-8B-Instruct-Q4_K_M" in text
    assert re.search(r"^process\s+21\.60 s", text, re.M)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("line\nnext\ttab", "line\nnext\ttab"),
        ("clear\x1b[2J", "clear\\x1b[2J"),
        ("bell\x07", "bell\\x07"),
        ("c1\x9b", "c1\\x9b"),
        ("rtl\u202eoverride", "rtl\\u202eoverride"),
        ("café 🐈", "café 🐈"),
    ],
)
def test_escape_controls(raw, shown):
    assert escape_controls(raw) == shown


def test_reasoning_reaches_the_terminal_with_controls_escaped():
    console = Console(file=io.StringIO(), width=200, highlight=False, color_system=None)
    show_reasoning(console, _result())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text and "\\x1b]0;title\\x07" in text and "\\u202e" in text


# --- the real commands, at 80 columns and in a pipe -----------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_wraps_cleanly_at_80_columns(isolated_env, command):
    out = run_cli([command, "--help"], {**isolated_env, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "…" not in text and widest(text) <= 80
    for option in _long_options(command):  # each whole, at the start of its row
        assert re.search(rf"│ (?:\*\s+)?{re.escape(option)}\s", text), option


def _long_options(command: str) -> list[str]:
    import typer

    from vlmduo.cli.app import app

    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return [opt for param in params for opt in param.opts if opt.startswith("--")]


def test_long_options_are_found():
    # The help test above checks these names; make sure it has them to check.
    assert {"--confidence-threshold", "--image-max-tokens", "--debug"} <= set(_long_options("ask"))


def test_root_help_documents_debug(isolated_env):
    out = run_cli(["--help"], {**isolated_env, "COLUMNS": "80"})
    assert out.returncode == 0 and "--debug" in out.stdout.decode()


@pytest.mark.parametrize("env_columns", ["80", None])
def test_models_shows_every_name_repo_and_file_whole(isolated_env, env_columns):
    env = pipe_env(isolated_env) if env_columns is None else {**isolated_env, "COLUMNS": env_columns}
    out = run_cli(["models"], env)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "…" not in text and widest(text) <= 80
    for name in ("qwen3-vl-2b-thinking", "qwen3-vl-2b-instruct", "qwen3-vl-8b-instruct", "synthetic-small"):
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    for piece in (
        "Qwen/Qwen3-VL-2B-Thinking-GGUF",
        "Qwen3VL-2B-Thinking-Q4_K_M.gguf",
        "mmproj-Qwen3VL-2B-Thinking-Q8_0.gguf",
        "ggml-org/SmolVLM2-500M-Video-Instruct-GGUF",
        "mmproj-SmolVLM2-500M-Video-Instruct-Q8_0.gguf",
    ):
        assert piece in text, piece
    assert "verified: yes when" in text
    assert re.search(r"^default\s+qwen3-vl-2b-thinking\s+qwen3-vl-8b-instruct", text, re.M)


def test_ask_table_on_redirected_stderr_fits_80_columns(isolated_env, image_file, small_files, large_files):
    args = [
        "ask", str(image_file), "Is it a cat?",
        "--small", str(small_files.model), "--small-mmproj", str(small_files.mmproj),
        "--large", str(large_files.model), "--large-mmproj", str(large_files.mmproj),
        "--think-budget", "16",
    ]  # fmt: skip
    out = run_cli(args, pipe_env(isolated_env))
    assert out.returncode == 0, out.stderr.decode()
    text = out.stderr.decode()
    assert "…" not in text and widest(text) <= 80
    for stage in ("load", "decode", "total", "process"):
        assert re.search(rf"^{stage}\s", text, re.M), stage
    assert re.search(r"^stage\s+small\s+large", text, re.M)
