"""Remote agents against a real server vlmduo did not write: llama.cpp's llama-server.

The server is built from the llama.cpp vendored in llama-cpp-python's sdist
(scripts/build_llama_server.sh; tests/llama_server.py finds it) and serves the
Qwen3-VL-shaped synthetic models with their projectors on 127.0.0.1. Without
the binary these tests skip with the command that builds it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from pathlib import Path
from unittest import mock

import pytest
from conftest import run_cli
from llama_server import BUILD_HINT, LlamaServer, find_binary, free_port

from vlmduo.agents.base import Question, Sampling
from vlmduo.agents.remote import RemoteAgent, parse_ref
from vlmduo.agents.remote.agent import image_uri
from vlmduo.answers.formats import parse_options
from vlmduo.errors import RemoteError
from vlmduo.media.images import synthetic_image
from vlmduo.models import registry, synthetic

QUESTION = "Which shape is shown? A. circle B. square C. triangle"
BINARY = find_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason=f"no llama-server binary; {BUILD_HINT}")


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic pair built once into a cache the CLI subprocesses share."""
    cache = tmp_path_factory.mktemp("vlmduo-cache")
    models = registry.load_registry().models
    with mock.patch.dict(os.environ, {"VLMDUO_CACHE": str(cache)}):
        for name in ("synthetic-small", "synthetic-large"):
            synthetic.ensure_built(name, models[name].synthetic or {})
    return cache


def _files(cache: Path, name: str) -> tuple[Path, Path]:
    with mock.patch.dict(os.environ, {"VLMDUO_CACHE": str(cache)}):
        return synthetic.synthetic_paths(name, registry.load_registry().models[name].synthetic or {})


def _server(cache: Path, name: str, tmp: Path, **kwargs) -> LlamaServer:
    assert BINARY is not None
    model, mmproj = _files(cache, name)
    return LlamaServer(BINARY, model, mmproj, alias=name, log_path=tmp / f"{name}.log", **kwargs)


@pytest.fixture(scope="session")
def large_server(synthetic_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """synthetic-large on llama-server, one slot, for the whole session."""
    with _server(synthetic_cache, "synthetic-large", tmp_path_factory.mktemp("llama-server")) as server:
        yield server


@pytest.fixture
def cli_env(isolated_env: dict[str, str], synthetic_cache: Path) -> dict[str, str]:
    env = dict(isolated_env, VLMDUO_CACHE=str(synthetic_cache))
    env.pop("VLMDUO_API_KEY", None)
    return env


def _question(seed: int = 3) -> Question:
    return Question(QUESTION, synthetic_image(96, 72, seed=seed), "choice", parse_options(QUESTION))


def test_duo_local_small_remote_large_transfer_served_from_the_prefix_cache(
    large_server: LlamaServer, cli_env: dict[str, str], image_file: Path
) -> None:
    args = ["ask", str(image_file), QUESTION, "--small", "synthetic-small"]
    args += ["--large", f"{large_server.url}#synthetic-large", "--policy", "always", "--json"]
    args += ["--think-budget", "24", "--transfer-budget", "16", "--ctx", "2048"]
    done = run_cli(args, cli_env)
    assert done.returncode == 0, done.stderr.decode()
    data = json.loads(done.stdout)
    assert data["route"] == "transfer" and data["answer"] in {"A", "B", "C"}
    large, transferred = data["large"], data["transferred"]
    assert large["server"] == {
        "endpoint": large_server.url,
        "kind": "llama-server",
        "model": "synthetic-large",
        "requests": 1,
        "attempts": 1,
    }
    assert large["constrained"] is True and transferred["constrained"] is True
    assert large["timings_ms"]["prefill"] > 0 and large["timings_ms"]["request"] > 0
    # The second request's image and question came from the server's prefix cache:
    # everything but the transferred text and the cue was cached.
    assert transferred["cached_tokens"] > 0
    assert transferred["cached_tokens"] + transferred["prefill_tokens"] == transferred["prompt_tokens"]
    assert transferred["cached_tokens"] >= large["tokens"]["prompt"] - 1
    assert done.stderr == b""  # --json: nothing on stderr, no re-encode warning


def test_the_cache_count_falls_when_the_image_differs(large_server: LlamaServer) -> None:
    """Negative control: the same transfer with an image the server has never seen."""
    agent = RemoteAgent(parse_ref(f"{large_server.url}#synthetic-large"))
    question = _question(3)
    short = agent.answer_short(question, Sampling(max_answer_tokens=2))
    hit = agent.transfer(short, question, "It has three corners.", Sampling(max_answer_tokens=2))
    unseen = copy.deepcopy(short.user)
    unseen["content"][0]["image_url"]["url"] = image_uri(synthetic_image(96, 72, seed=99))[0]
    miss = agent.transfer(
        dataclasses.replace(short, user=unseen),
        question,
        "It has three corners.",
        Sampling(max_answer_tokens=2),
    )
    assert hit.details["prompt_tokens"] == miss.details["prompt_tokens"]  # same shape, other pixels
    assert hit.details["cached_tokens"] >= short.result.tokens["prompt"] - 1
    # Only the template's text before the image matched: the image and question were encoded anew.
    assert miss.details["cached_tokens"] < short.result.tokens["prompt"] // 2
    assert miss.prefill_tokens > hit.prefill_tokens


def test_remote_thinking_small_agent_reasons_then_answers(synthetic_cache: Path, tmp_path: Path) -> None:
    """synthetic-small (Qwen3-VL Thinking template) on the server: reasoning, then the closed
    thought continued to a constrained answer that the prefix cache serves."""
    with _server(synthetic_cache, "synthetic-small", tmp_path) as server:
        ref = dataclasses.replace(parse_ref(f"{server.url}#synthetic-small"), thinking=True)
        agent = RemoteAgent(ref)
        result = agent.reason(_question(), Sampling(max_answer_tokens=2), 16, reasoning_logprobs=True)
        plain = agent.reason(_question(), Sampling(max_answer_tokens=2), 16)
    assert plain.reasoning and "</think>" not in plain.reasoning and "<think>" not in plain.reasoning
    assert plain.reasoning_logprobs == [] and "".join(plain.reasoning_pieces).strip() == plain.reasoning
    assert result.answer in {"A", "B", "C"} and result.constrained is True
    assert result.server["requests"] == 2 and result.tokens["generated"] >= 2
    assert len(result.reasoning_pieces) == len(result.reasoning_logprobs) > 0
    assert "</think>" not in "".join(result.reasoning_pieces)
    assert result.tokens["cached"] > 0  # the answer request reused the reasoning request's prefix


def test_wrong_model_name_is_one_line(large_server: LlamaServer, cli_env: dict[str, str], image_file: Path):
    done = run_cli(
        ["ask", str(image_file), QUESTION, "--mode", "large", "--large", f"{large_server.url}#nope"], cli_env
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1 and done.stdout == b""
    assert f"Error: model 'nope' is not served at {large_server.url}" in stderr
    assert "it serves: synthetic-large" in stderr and "Traceback" not in stderr


def test_endpoint_down_is_one_line(cli_env: dict[str, str], image_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = run_cli(["ask", str(image_file), QUESTION, "--mode", "large", "--large", f"{url}#m"], cli_env)
    stderr = done.stderr.decode()
    assert done.returncode == 1
    assert stderr.splitlines()[0] == f"Error: cannot reach {url}: connection refused"


def test_api_key(synthetic_cache: Path, tmp_path: Path, cli_env: dict[str, str], image_file: Path) -> None:
    with _server(synthetic_cache, "synthetic-large", tmp_path, api_key="s3cret") as server:
        args = [
            "ask",
            str(image_file),
            QUESTION,
            "--mode",
            "large",
            "--large",
            f"{server.url}#synthetic-large",
        ]
        refused = run_cli(args, cli_env)
        wrong = run_cli(args, dict(cli_env, VLMDUO_API_KEY="nope"))
        allowed = run_cli(args, dict(cli_env, VLMDUO_API_KEY="s3cret"))
    assert refused.returncode == 1 and "refused the request (HTTP 401)" in refused.stderr.decode()
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr.decode()
    assert allowed.returncode == 0, allowed.stderr.decode()
    assert allowed.stdout.decode().strip() in {"A", "B", "C"}


def _wait_busy(server: LlamaServer, worker: threading.Thread) -> None:
    while worker.is_alive() and not server.busy():
        worker.join(0.05)
    assert worker.is_alive(), "the request ended before the server was seen working"


def test_server_killed_mid_request(synthetic_cache: Path, tmp_path: Path) -> None:
    server = _server(synthetic_cache, "synthetic-large", tmp_path, ctx=8192).start()
    agent = RemoteAgent(parse_ref(f"{server.url}#synthetic-large"))
    outcome: list[BaseException | object] = []

    def reason() -> None:
        try:
            outcome.append(agent.reason(_question(), Sampling(), 8000))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=reason)
    worker.start()
    try:
        _wait_busy(server, worker)
        server.kill()
        worker.join(60)
    finally:
        server.stop()
    assert isinstance(outcome[0], RemoteError)
    assert "was lost mid-request" in outcome[0].message or "cannot reach" in outcome[0].message


def test_cancel_closes_the_request_and_the_server_stops(synthetic_cache: Path, tmp_path: Path) -> None:
    with _server(synthetic_cache, "synthetic-large", tmp_path, ctx=8192) as server:
        agent = RemoteAgent(parse_ref(f"{server.url}#synthetic-large"))
        cancel = threading.Event()
        outcome: list = []
        worker = threading.Thread(
            target=lambda: outcome.append(agent.reason(_question(), Sampling(), 8000, cancel=cancel))
        )
        worker.start()
        _wait_busy(server, worker)
        cancel.set()
        worker.join(60)
        # The server saw the client go and stopped generating: its slot is free for the next request.
        for _ in range(2400):  # a hang guard (2 minutes), not a timing check
            if not server.busy():
                break
            threading.Event().wait(0.05)
        assert not server.busy(), "the server kept generating for a client that left"
        log = server.log_path.read_text(errors="replace")
    assert outcome[0].cancelled is True and outcome[0].answer is None
    assert outcome[0].tokens["generated"] == 0  # no reply was read
    assert "cancel" in log.lower() or "closed" in log.lower()


def test_eval_sends_items_concurrently_and_records_failures(
    large_server: LlamaServer, cli_env: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    rows = []
    for i in range(4):
        image = synthetic_image(64, 48, seed=10 + i)
        path = tmp_path / f"img{i}.png"
        Image.frombytes("RGB", (image.width, image.height), image.rgb).save(path)
        rows.append(
            {"image": str(path), "question": "Which shape?", "options": ["circle", "square"], "answer": "A"}
        )
    dataset = tmp_path / "tiny.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["eval", str(dataset), "--modes", "large", "--concurrency", "2", "--json"]
    ok = run_cli(
        [*base, "--large", f"{large_server.url}#synthetic-large", "--results", str(tmp_path / "a.jsonl")],
        cli_env,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    summary = json.loads(ok.stdout)
    assert summary["n_run"] == 4 and summary["n_errors"] == 0
    down = f"http://127.0.0.1:{free_port()}/v1#m"
    failed = run_cli([*base, "--large", down, "--results", str(tmp_path / "b.jsonl")], cli_env)
    assert failed.returncode == 0, failed.stderr.decode()  # failed records, not a crash
    assert json.loads(failed.stdout)["n_errors"] == 4
    records = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert all("cannot reach" in r["error"] for r in records)
    local = run_cli([*base, "--large", "synthetic-large", "--results", str(tmp_path / "c.jsonl")], cli_env)
    assert local.returncode == 2 and "needs remote agents" in local.stderr.decode()


def test_doctor_checks_the_server(large_server: LlamaServer, cli_env: dict[str, str]) -> None:
    args = ["doctor", "--no-self-test", "--json", "--small", "synthetic-small"]
    done = run_cli([*args, "--large", f"{large_server.url}#synthetic-large"], cli_env)
    assert done.returncode == 0, done.stderr.decode()
    (endpoint,) = json.loads(done.stdout)["endpoints"]
    assert endpoint["ok"] and endpoint["server"] == "llama-server" and endpoint["vision"] is True
    bad = run_cli([*args, "--large", f"{large_server.url}#nope"], cli_env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["endpoints"][0]["model_listed"] is False
