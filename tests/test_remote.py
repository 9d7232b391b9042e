"""Remote agents against a recording stub: the exact request each server gets, and every failure.

The stub (tests/recording_server.py) records request bodies and answers from
canned replies. The field sets below are the servers' documented request
schemas, so a misspelled or unsupported field (which these servers ignore
silently) fails here:
- vLLM: ``ChatCompletionRequest`` (vllm/entrypoints/openai/protocol.py) and its
  extra parameters (structured_outputs since v0.12, continue_final_message,
  add_generation_prompt, chat_template_kwargs);
- SGLang: ``ChatCompletionRequest`` (python/sglang/srt/entrypoints/openai/protocol.py):
  regex, ebnf, continue_final_message, no add_generation_prompt;
- Ollama: ``ChatCompletionRequest`` of openai/openai.go (and docs/api/openai-compatibility);
- llama-server: tools/server/server-schema.cpp and server-common.cpp of the llama.cpp
  vendored in llama-cpp-python 0.3.36.
The real llama-server is tested in test_remote_llama_server.py.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import pytest
from recording_server import Canned, RecordingServer, completion

from vlmduo import api
from vlmduo.agents.base import Question, Sampling
from vlmduo.agents.prompts import TRANSFER_CUE
from vlmduo.agents.remote import RemoteAgent, parse_ref, servers
from vlmduo.agents.remote import agent as remote_agent
from vlmduo.agents.remote.agent import RemoteModel
from vlmduo.agents.remote.client import TokenLogprob
from vlmduo.agents.scripted import ScriptedAgent
from vlmduo.answers import grammars
from vlmduo.duo.pipeline import AskOptions, ask
from vlmduo.errors import Cancelled, RemoteError, UsageError
from vlmduo.media.images import synthetic_image

CHAT = "/v1/chat/completions"
COMMON = {"model", "messages", "max_tokens", "temperature", "seed", "stream", "stream_options", "logprobs"}
COMMON |= {"top_logprobs"}
DOCUMENTED = {
    "vllm": COMMON
    | {"structured_outputs", "continue_final_message", "add_generation_prompt", "chat_template_kwargs"},
    "sglang": COMMON | {"regex", "ebnf", "continue_final_message", "chat_template_kwargs"},
    "ollama": COMMON | {"response_format", "stop", "top_p"},
    "llama-server": COMMON
    | {"grammar", "json_schema", "cache_prompt", "continue_final_message", "add_generation_prompt"},
    "openai": COMMON | {"response_format"},
}
OWNERS = {
    "vllm": "vllm",
    "sglang": "sglang",
    "ollama": "library",
    "llama-server": "llamacpp",
    "openai": "org",
}
QUESTION = "Which shape is shown? A. circle B. square C. triangle"


def _question(fmt: str = "choice", text: str = QUESTION) -> Question:
    from vlmduo.answers.formats import parse_options

    return Question(text, synthetic_image(48, 32, seed=5), fmt, parse_options(text))


def _agent(stub: RecordingServer, **kwargs) -> RemoteAgent:
    ref = RemoteModel(name="remote", endpoint=stub.url, model=stub.model, **kwargs)
    return RemoteAgent(ref)


@pytest.mark.parametrize("server", sorted(DOCUMENTED))
def test_short_answer_then_transfer_fields_per_server(server: str) -> None:
    with RecordingServer(owned_by=OWNERS[server]) as stub:
        agent = _agent(stub)
        question = _question()
        short = agent.answer_short(question, Sampling(max_answer_tokens=4))
        agent.transfer(short, question, "The shape has three corners.", Sampling(max_answer_tokens=4))
    assert agent.server == server  # detected from /v1/models' owned_by
    first, second = stub.bodies()
    for body in (first, second):
        assert set(body) <= DOCUMENTED[server], set(body) - DOCUMENTED[server]
        assert body["model"] == "stub-model" and body["max_tokens"] == 4
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["logprobs"] is True and body["top_logprobs"] == 20
    # The transfer repeats the user message (image + question) byte for byte...
    assert json.dumps(second["messages"][0]) == json.dumps(first["messages"][0])
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    # ... and continues an assistant message holding the transferred text and the cue.
    assert second["messages"][1] == {
        "role": "assistant",
        "content": "The shape has three corners." + TRANSFER_CUE,
    }
    assert len(first["messages"]) == 1
    continuation = {k: second[k] for k in ("continue_final_message", "add_generation_prompt") if k in second}
    assert continuation == {
        "vllm": {"continue_final_message": True, "add_generation_prompt": False},
        "llama-server": {"continue_final_message": True, "add_generation_prompt": False},
        "sglang": {"continue_final_message": True},
    }.get(server, {})
    assert not any(k.startswith("guided_") for k in first)  # vLLM ignores those silently since v0.12


def test_constraint_fields_per_server() -> None:
    options = {"A": "circle", "B": "square", "C": "triangle"}
    assert servers.constraint_fields("llama-server", "choice", options) == {
        "grammar": grammars.grammar_for("choice", options)
    }
    # Each answer also with the space its token may carry (" B" is one Qwen token).
    assert servers.constraint_fields("vllm", "choice", options) == {
        "structured_outputs": {"choice": ["A", "B", "C", " A", " B", " C"]}
    }
    assert servers.constraint_fields("vllm", "number", None) == {
        "structured_outputs": {"regex": servers.answer_regex("number", None)}
    }
    assert servers.constraint_fields("sglang", "yesno", None) == {
        "regex": "(Yes|No|yes|no|\\ Yes|\\ No|\\ yes|\\ no)"
    }
    ollama = servers.constraint_fields("ollama", "choice", options)["response_format"]
    assert ollama["type"] == "json_schema"
    assert ollama["json_schema"]["schema"]["properties"]["answer"] == {
        "type": "string",
        "enum": ["A", "B", "C", " A", " B", " C"],
    }
    assert (
        servers.constraint_fields("openai", "yesno", None)["response_format"]["json_schema"]["strict"] is True
    )
    for server in DOCUMENTED:
        assert servers.constraint_fields(server, "free", None) == {}


ANSWERS = [
    *("0", "-12", "+3", "3.25", "1,234", "1,234,567", "45%", "3.", "012", "1.23456", "1234567890", "three"),
    *("cat", " cat", "red double decker bus", "café", "10:10", "$3.99", "St. Louis", "日本語", "x" * 80),
    *("", "  cat", "x" * 81, "a\nb", "Yes", " no", "YES", "maybe", "A", " B"),
]


@pytest.mark.parametrize("fmt", ["number", "short", "yesno"])
def test_answer_regex_accepts_what_the_grammar_accepts(fmt: str) -> None:
    """The remote agents' regular expressions and the local grammars: one language."""
    import re

    from test_grammars import matches

    pattern, grammar = servers.answer_regex(fmt, None), grammars.grammar_for(fmt, None)
    assert pattern is not None and grammar is not None
    for text in ANSWERS:
        assert bool(re.fullmatch(pattern, text)) == matches(grammar, text), (fmt, text)


def test_a_server_that_ignores_the_constraint_is_read_from_text() -> None:
    with RecordingServer(owned_by="vllm") as stub:
        stub.enqueue(CHAT, Canned(completion("Looking closely, the answer is B, the square.")))
        stub.enqueue(CHAT, Canned(completion("C")))
        agent = _agent(stub)
        question = _question()
        ignored = agent.answer_short(question, Sampling())
        obeyed = agent.answer_short(question, Sampling())
    assert ignored.result.answer == "B" and ignored.result.constrained is False
    assert ignored.result.to_json()["constrained"] is False
    assert obeyed.result.answer == "C" and obeyed.result.constrained is True


def test_json_schema_servers_answer_in_json() -> None:
    with RecordingServer(owned_by="library") as stub:
        stub.enqueue(CHAT, Canned(completion('{"answer": "B"}')), Canned(completion("B, I think")))
        agent = _agent(stub)
        first = agent.answer_short(_question(), Sampling())
        second = agent.answer_short(_question(), Sampling())
    assert agent.server == "ollama"
    assert (first.result.answer, first.result.constrained) == ("B", True)
    assert (second.result.answer, second.result.constrained) == ("B", False)


def _lp(token: str, logprob: float, top: dict[str, float]) -> dict:
    return {
        "token": token,
        "logprob": logprob,
        "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()],
    }


def test_answer_probability_is_renormalised_over_allowed_answers() -> None:
    a, b, junk = math.log(0.3), math.log(0.1), math.log(0.5)
    tokens = [_lp("A", a, {"the": junk, "A": a, "B": b, "C": math.log(0.05)}), _lp("", -0.1, {})]
    with RecordingServer(owned_by="llamacpp") as stub:
        stub.enqueue(CHAT, Canned(completion("A", logprobs=tokens)))
        short = _agent(stub).answer_short(_question(), Sampling())
    assert short.result.answer_probability == pytest.approx(0.3 / (0.3 + 0.1 + 0.05))


def test_answer_probability_counts_an_unlisted_answer_at_the_floor() -> None:
    # "C" is not among the listed alternatives: counted at the smallest listed probability.
    top = (("the", math.log(0.5)), ("B", math.log(0.1)), ("x", math.log(0.02)))
    tokens = [TokenLogprob("A", math.log(0.3), top)]
    prob = servers.answer_probability(tokens, "choice", {"A": "", "B": "", "C": ""})
    assert prob == pytest.approx(0.3 / (0.3 + 0.1 + 0.02))
    assert servers.answer_probability([], "choice", None) is None


def test_timings_and_cached_tokens_from_llama_server_fields() -> None:
    timings = {"cache_n": 30, "prompt_n": 12, "prompt_ms": 7.5, "predicted_n": 1, "predicted_ms": 2.25}
    usage = {"prompt_tokens": 42, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 30}}
    with RecordingServer(owned_by="llamacpp") as stub:
        stub.enqueue(CHAT, Canned(completion("A", usage=usage, timings=timings)))
        short = _agent(stub).answer_short(_question(), Sampling())
    data = short.result.to_json()
    assert data["timings_ms"]["prefill"] == 7.5 and data["timings_ms"]["decode"] == 2.25
    assert data["timings_ms"]["request"] > 0 and data["timings_ms"]["load"] == 0.0
    assert data["tokens"] == {"prompt": 42, "image": 0, "generated": 1, "cached": 30}
    assert data["server"]["kind"] == "llama-server" and data["server"]["requests"] == 1


def test_a_server_without_timings_reports_only_wall_time() -> None:
    with RecordingServer(owned_by="vllm") as stub:
        short = _agent(stub).answer_short(_question(), Sampling())
    timings = short.result.timings_ms
    assert "prefill" not in timings and "decode" not in timings and timings["request"] > 0
    assert short.result.tokens["cached"] is None  # vLLM says nothing without --enable-prompt-tokens-details


def test_transfer_reports_cached_tokens_and_warns_once_when_zero(caplog) -> None:
    remote_agent._warned.clear()
    zero = {"prompt_tokens": 60, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}
    hit = {"prompt_tokens": 60, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 48}}
    with RecordingServer(owned_by="vllm") as stub:
        stub.enqueue(CHAT, Canned(completion("A")), Canned(completion("B", usage=zero)))
        stub.enqueue(CHAT, Canned(completion("B", usage=zero)), Canned(completion("B", usage=hit)))
        agent = _agent(stub)
        question = _question()
        short = agent.answer_short(question, Sampling())
        with caplog.at_level(logging.WARNING, logger="vlmduo.agents.remote"):
            done = [agent.transfer(short, question, "three corners", Sampling()) for _ in range(3)]
    assert [d.details["cached_tokens"] for d in done] == [0, 0, 48]
    assert done[2].prefill_tokens == 12  # what the server prefilled anew
    warnings = [r for r in caplog.records if "re-encoded" in r.getMessage()]
    assert len(warnings) == 1


def test_duo_with_a_remote_large_agent_through_the_pipeline() -> None:
    small = ScriptedAgent("small").enqueue(answer="C", reasoning="Three corners means a triangle.")
    usage = {"prompt_tokens": 70, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 52}}
    with RecordingServer(owned_by="vllm") as stub:
        stub.enqueue(CHAT, Canned(completion("A")), Canned(completion("C", usage=usage)))
        large = _agent(stub)
        result = ask(_question(), AskOptions(policy="always"), small=small, large=large)
    data = result.to_json()
    assert data["route"] == "transfer" and data["answer"] == "C"
    assert data["transferred"]["cached_tokens"] == 52 and data["transferred"]["constrained"] is True
    assert data["large"]["server"]["kind"] == "vllm"
    assert data["timings_ms"]["critical_path"] >= data["transferred"]["request_ms"]


def test_remote_small_agent_reasons_then_answers_in_a_continuation() -> None:
    with RecordingServer(owned_by="sglang") as stub:
        stub.enqueue(
            CHAT, Canned(completion("It has three corners, so a triangle.")), Canned(completion("C"))
        )
        agent = _agent(stub)
        result = agent.reason(_question(), Sampling(max_answer_tokens=3), 50)
    first, second = stub.bodies()
    assert first["max_tokens"] == 50 and "regex" not in first
    # Reasoning samples as llama.cpp does by default (no card for a URL), the answer is greedy.
    assert (first["temperature"], first["top_p"], first["top_k"], first["min_p"]) == (0.8, 0.95, 40, 0.05)
    assert second["temperature"] == 0.0 and "top_p" not in second
    assert second["regex"] == "(A|B|C|\\ A|\\ B|\\ C)" and second["continue_final_message"] is True
    assert second["messages"][1]["content"] == "It has three corners, so a triangle.\n\nAnswer:"
    assert result.reasoning_truncated is False
    assert result.answer == "C" and result.reasoning == "It has three corners, so a triangle."
    assert "".join(result.reasoning_pieces) == result.reasoning
    assert result.server["requests"] == 2


def test_thinking_model_answers_after_an_empty_prefilled_thought() -> None:
    with RecordingServer(owned_by="vllm") as stub:
        agent = _agent(stub, thinking=True)
        question = _question()
        short = agent.answer_short(question, Sampling())
        agent.transfer(short, question, "three corners", Sampling())
    first, second = stub.bodies()
    assert first["messages"][1] == {"role": "assistant", "content": "<think>\n\n</think>\n\n"}
    assert first["continue_final_message"] is True
    assert second["messages"][1] == {"role": "assistant", "content": "<think>\nthree corners\n</think>\n\n"}


def test_model_check_and_server_detection() -> None:
    with RecordingServer(owned_by="vllm", model="org/Qwen3-VL-8B") as stub:
        with pytest.raises(RemoteError, match="model 'nope' is not served") as err:
            RemoteAgent(RemoteModel("x", stub.url, "nope")).connect()
        assert "org/Qwen3-VL-8B" in (err.value.hint or "")
        alone = RemoteAgent(RemoteModel("x", stub.url, None))  # URL without #model: the one listed
        alone.connect()
        assert alone.model == "org/Qwen3-VL-8B"
    assert servers.detect({"data": []}, {"server": "llama.cpp"}, "http://h:1/v1") == "llama-server"
    assert servers.detect({"data": []}, {}, "http://h:11434/v1") == "ollama"
    assert servers.detect({"data": [{"owned_by": "someone"}]}, {}, "http://h:1/v1") == "openai"


@pytest.mark.parametrize(
    ("canned", "match"),
    [
        (Canned({"error": {"message": "Invalid API Key"}}, status=401), r"refused the request \(HTTP 401\)"),
        (Canned({"error": {"message": "forbidden"}}, status=403), r"HTTP 403"),
        (Canned({"object": "error", "message": "The model `x` does not exist."}, status=404), r"HTTP 404"),
        (Canned({"error": {"message": "CUDA out of memory"}}, status=500), r"failed \(HTTP 500\): CUDA out"),
        (Canned({"error": {"message": "bad"}}, status=400), r"rejected the request \(HTTP 400\)"),
        (Canned({"id": "x", "choices": []}), r"replied without choices"),
        (Canned(raw=b"<html>proxy error</html>"), r"not JSON"),
        (
            Canned(events=[{"choices": [{"index": 0, "delta": {"content": "A"}}]}], cut=True),
            r"lost mid-reply",
        ),
        (Canned(events=[{"error": {"message": "out of memory"}}]), r"failed mid-reply: out of memory"),
        (
            Canned(events=['error: {"code": 500, "message": "context full"}']),
            r"failed mid-reply: context full",
        ),
        (Canned(events=["data: {not json"]), r"malformed event"),
    ],
)
def test_failures_are_one_line_remote_errors(canned: Canned, match: str) -> None:
    with RecordingServer() as stub:
        stub.enqueue(CHAT, canned)
        with pytest.raises(RemoteError, match=match) as err:
            _agent(stub).answer_short(_question(), Sampling())
    assert "\n" not in err.value.message and stub.url in err.value.message
    assert len(stub.bodies()) == 1  # not retried


def test_a_server_that_does_not_stream_is_read_whole_and_progress_is_told() -> None:
    told: list[tuple[str, str, int]] = []
    with RecordingServer() as stub:
        stub.enqueue(CHAT, Canned(raw=json.dumps(completion("B")).encode()), Canned(completion("C")))
        agent = _agent(stub)
        whole = agent.answer_short(_question(), Sampling())
        streamed = agent.answer_short(_question(), Sampling(), progress=lambda *a: told.append(a))
    assert whole.result.answer == "B" and streamed.result.answer == "C"
    assert ("remote", "answer", 1) in told  # one content chunk arrived


def test_a_5xx_mid_run_fails_the_transfer() -> None:
    with RecordingServer() as stub:
        stub.enqueue(CHAT, Canned(completion("A")), Canned({"error": {"message": "engine died"}}, status=500))
        agent = _agent(stub)
        short = agent.answer_short(_question(), Sampling())
        with pytest.raises(RemoteError, match="engine died"):
            agent.transfer(short, _question(), "text", Sampling())


def test_retries_429_and_503_only_with_backoff() -> None:
    with RecordingServer() as stub:
        stub.enqueue(
            CHAT,
            Canned({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"}),
            Canned({"error": {"message": "loading"}}, status=503),
            Canned(completion("B")),
        )
        agent = _agent(stub)
        agent.client.backoff_s = 0.01
        short = agent.answer_short(_question(), Sampling())
    assert short.result.answer == "B" and short.result.server["attempts"] == 3
    with RecordingServer() as stub:
        stub.enqueue(CHAT, *[Canned({"error": {"message": "busy"}}, status=503) for _ in range(4)])
        agent = _agent(stub)
        agent.client.backoff_s = 0.01
        with pytest.raises(RemoteError, match=r"busy \(HTTP 503 after 4 attempts\)"):
            agent.answer_short(_question(), Sampling())


def test_endpoint_down_and_timeout() -> None:
    with RecordingServer() as stub:
        url = stub.url
    with pytest.raises(RemoteError, match="cannot reach .*connection refused"):
        RemoteAgent(RemoteModel("x", url, "m")).connect()
    with RecordingServer() as stub:
        stub.enqueue(CHAT, Canned(completion("A"), delay_s=1.0))
        agent = RemoteAgent(RemoteModel("x", stub.url, stub.model, timeout=0.2))
        with pytest.raises(RemoteError, match=r"did not answer within 0.2 s"):
            agent.answer_short(_question(), Sampling())


def test_cancel_closes_the_request() -> None:
    with RecordingServer() as stub:
        stub.enqueue(CHAT, Canned(completion("A"), delay_s=30.0))
        agent = _agent(stub)
        agent.connect()
        cancel = threading.Event()
        threading.Timer(0.2, cancel.set).start()
        start = time.monotonic()
        with pytest.raises(Cancelled):
            agent.answer_short(_question(), Sampling(), cancel=cancel)
        # Negative control: the stub would have answered after 30 s; the request ended at the cancel.
        assert time.monotonic() - start < 29


def test_api_key_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MY_SERVER_KEY", "s3cret")
    with RecordingServer() as stub:
        RemoteAgent(RemoteModel("x", stub.url, stub.model, api_key_env="MY_SERVER_KEY")).connect()
        monkeypatch.delenv("MY_SERVER_KEY")
        RemoteAgent(RemoteModel("x", stub.url, stub.model, api_key_env="MY_SERVER_KEY")).connect()
    assert stub.requests[0].headers.get("Authorization") == "Bearer s3cret"
    assert "Authorization" not in stub.requests[1].headers


@pytest.mark.parametrize(
    ("ref", "endpoint", "model", "name"),
    [
        ("http://gpu:8000/v1#Qwen/Qwen3-VL-8B-Instruct", "http://gpu:8000/v1", "Qwen/Qwen3-VL-8B-Instruct",
         "Qwen3-VL-8B-Instruct"),
        ("http://127.0.0.1:8080#big", "http://127.0.0.1:8080/v1", "big", "big"),
        ("https://host/api/v1/", "https://host/api/v1", None, "host"),
    ],
)  # fmt: skip
def test_url_references(ref: str, endpoint: str, model: str | None, name: str) -> None:
    parsed = parse_ref(ref)
    assert (parsed.endpoint, parsed.model, parsed.name) == (endpoint, model, name)
    assert api.resolve(ref) == parsed
    with pytest.raises(UsageError, match="served remotely"):
        api.resolve(ref, mmproj="/x/mmproj.gguf")


def test_registry_entry_with_an_endpoint(tmp_path, monkeypatch) -> None:
    (tmp_path / "models.toml").write_text(
        '[models.gpu-large]\nendpoint = "http://gpu:8000/v1"\nmodel = "Qwen/Qwen3-VL-8B-Instruct"\n'
        'api_key_env = "GPU_KEY"\nserver = "vllm"\ntimeout = 60\n'
        '[models.bad]\nendpoint = "gpu:8000"\nmodel = "m"\n'
    )
    from vlmduo.models import registry

    with pytest.raises(Exception, match="must be an http"):
        registry.load_registry(tmp_path)
    (tmp_path / "models.toml").write_text(
        '[models.gpu-large]\nendpoint = "http://gpu:8000/v1"\nmodel = "Qwen/Qwen3-VL-8B-Instruct"\n'
        'api_key_env = "GPU_KEY"\nserver = "vllm"\ntimeout = 60\nthinking = false\n'
    )
    monkeypatch.setenv("VLMDUO_HOME", str(tmp_path))
    ref = api.resolve("gpu-large")
    assert ref == RemoteModel(
        "gpu-large", "http://gpu:8000/v1", "Qwen/Qwen3-VL-8B-Instruct", "vllm", "GPU_KEY", timeout=60.0
    )
    agent, load_ms = api.load_agent(ref)
    assert isinstance(agent, RemoteAgent) and load_ms == 0.0


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('endpoint = "http://h/v1"', "needs 'model'"),
        ('endpoint = "http://h/v1"\nmodel = "m"\nserver = "tgi"', "server must be one of"),
        ('endpoint = "http://h/v1"\nmodel = "m"\nrepo = "a/b"', "takes neither"),
        ('path = "/x.gguf"\nmmproj = "/y.gguf"\nmodel = "m"', "applies to a remote entry only"),
    ],
)
def test_registry_rejects_malformed_remote_entries(tmp_path, table: str, problem: str) -> None:
    from vlmduo.errors import RegistryError
    from vlmduo.models import registry

    (tmp_path / "models.toml").write_text(f"[models.r]\n{table}\n")
    with pytest.raises(RegistryError, match=problem):
        registry.load_registry(tmp_path)


def test_eval_keeps_several_remote_items_in_flight_and_isolates_failures(tmp_path) -> None:
    from PIL import Image

    from vlmduo.study.datasets import load_dataset
    from vlmduo.study.eval_run import EvalConfig, run_eval
    from vlmduo.study.evaluation import ResultsLog

    rows = []
    for i in range(6):
        image = synthetic_image(32, 32, seed=20 + i)
        Image.frombytes("RGB", (32, 32), image.rgb).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "Which?", "options": ["x", "y"], "answer": "A"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_dataset(tmp_path / "d.jsonl")
    replies = [Canned(completion("A"), delay_s=0.3) for _ in range(5)]
    replies.insert(2, Canned({"error": {"message": "engine died"}}, status=500, delay_s=0.3))
    with RecordingServer() as stub:
        stub.enqueue(CHAT, *replies)
        large = _agent(stub)
        log = ResultsLog(tmp_path / "results.jsonl")
        outcome = run_eval(dataset, [EvalConfig("large")], log, small=None, large=large, concurrency=3)
    assert outcome.n_run == 6 and outcome.n_errors == 1
    assert stub.max_active >= 2  # items overlapped on the server (sequential would be 1)
    errors = [r["error"] for r in log.records() if "error" in r]
    assert len(errors) == 1 and "engine died" in errors[0]  # the others were not cancelled by it
    with pytest.raises(UsageError, match="needs remote agents"):
        run_eval(dataset, [EvalConfig("large")], log, small=None, large=ScriptedAgent("local"), concurrency=2)


def test_timing_table_marks_the_remote_agent() -> None:
    from rich.console import Console

    from vlmduo.cli.render import timing_table

    small = ScriptedAgent("small").enqueue(answer="C", reasoning="Three corners.")
    usage = {"prompt_tokens": 70, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 52}}
    timings = {"cache_n": 52, "prompt_n": 18, "prompt_ms": 4.0, "predicted_n": 1, "predicted_ms": 1.0}
    with RecordingServer(owned_by="llamacpp") as stub:
        stub.enqueue(CHAT, Canned(completion("A", timings=timings)))
        stub.enqueue(CHAT, Canned(completion("C", usage=usage, timings=timings)))
        result = ask(_question(), AskOptions(policy="always"), small=small, large=_agent(stub))
    console = Console(record=True, width=120)
    console.print(timing_table(result))
    text = console.export_text()
    assert "large (remote)" in text and "small " in text
    assert "request" in text and "(52 cached)" in text and "transfer_request" in text


def test_doctor_checks_remote_endpoints() -> None:
    from vlmduo.doctor import check_endpoints

    with RecordingServer(owned_by="vllm") as stub:
        good = check_endpoints({"small": "synthetic-small", "large": f"{stub.url}#stub-model"})
        wrong = check_endpoints({"large": f"{stub.url}#nope"})
        stub.enqueue(CHAT, Canned({"error": {"message": "image input is not supported"}}, status=500))
        blind = check_endpoints({"large": f"{stub.url}#stub-model"})
    assert [e["role"] for e in good] == ["large"]  # the local model is not a server
    assert good[0]["ok"] and good[0]["vision"] and good[0]["server"] == "vllm"
    assert wrong[0]["reachable"] and not wrong[0]["model_listed"] and not wrong[0]["ok"]
    assert blind[0]["model_listed"] and not blind[0]["vision"] and "not supported" in blind[0]["error"]


def test_a_local_agent_beside_a_remote_one_keeps_all_its_cores() -> None:
    seen: list[bool] = []

    class Spy(ScriptedAgent):
        def stage1_threads(self, sequential: bool):
            seen.append(sequential)
            return super().stage1_threads(sequential)

    with RecordingServer() as stub:
        ask(_question(), AskOptions(), small=Spy("small").enqueue(answer="A"), large=_agent(stub))
    local = ScriptedAgent("local").enqueue(answer="A")
    ask(_question(), AskOptions(), small=Spy("small").enqueue(answer="A"), large=local)
    assert seen == [True, False]  # alone with a remote partner; sharing with a local one


def test_a_server_without_a_model_list_is_trusted_with_the_model_named() -> None:
    with RecordingServer() as stub:
        stub.enqueue("/v1/models", Canned({"error": {"message": "no route"}}, status=404))
        agent = _agent(stub)
        short = agent.answer_short(_question(), Sampling())
    assert short.result.answer == "A" and agent.server == "openai" and agent.model == "stub-model"
    assert "response_format" in stub.bodies()[0]  # the generic OpenAI constraint
