"""The server with scripted agents: the OpenAI API, errors, the queue, disconnects, idle unload.

Each test runs a real uvicorn server on 127.0.0.1 (a free port) in a thread, over
``vlmduo.agents.scripted.ScriptedAgent``s, and talks to it over HTTP: with the official
``openai`` client where a caller of the API would, with httpx where the request
must be malformed on purpose. Every server is torn down; every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from PIL import Image

from vlmduo.agents.scripted import ScriptedAgent
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import EngineError
from vlmduo.serve import server as serve_server
from vlmduo.serve.app import AppConfig, create_app
from vlmduo.serve.host import PairHost, PairSpec
from vlmduo.serve.wire import Limits

openai = pytest.importorskip("openai")

PAIR = "scripted"
QUESTION = "Which animal is it? A. cat B. dog C. bird D. fish"


def png_bytes(width: int = 32, height: int = 24) -> bytes:
    """A PNG with noise in it (so it does not compress to nothing)."""
    from vlmduo.media.images import synthetic_image

    img = synthetic_image(width, height, seed=1)
    out = io.BytesIO()
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, image: str | None = None) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": parts}]


class Agents:
    """A loader of scripted agents that counts its loads."""

    def __init__(self, **scripts: dict) -> None:
        self.small = ScriptedAgent("small", thinking=True)
        self.large = ScriptedAgent("large")
        self.small.enqueue(**scripts.get("small", {"answer": "A"}))
        self.large.enqueue(**scripts.get("large", {"answer": "A", "probability": 0.9}))
        self.loads = 0

    def __call__(self):
        self.loads += 1
        return {"small": self.small, "large": self.large}, {"small": 5.0, "large": 7.0}


@contextmanager
def running(
    agents: Agents, *, keep_alive_s: float | None = None, max_waiting: int = 8, **config
) -> Iterator[tuple[str, PairHost]]:
    """A server over ``agents`` on a free loopback port, for the block."""
    import uvicorn

    spec = PairSpec(PAIR, {"small": ("s", None), "large": ("l", None)}, EngineSettings())
    host = PairHost(spec, keep_alive_s=keep_alive_s, max_waiting=max_waiting, loader=agents)
    host.load()
    host.start_idle_watch()
    sock = serve_server.bind("127.0.0.1", 0)
    app = create_app(host, AppConfig(**config))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", host
    finally:
        host.close()
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=30
    )


# -- the OpenAI API ----------------------------------------------------------------
def test_models_lists_the_modes_of_the_pair():
    with running(Agents()) as (url, _):
        models = client(url).models.list()
        assert [m.id for m in models] == [
            f"{PAIR}:duo",
            f"{PAIR}:small",
            f"{PAIR}:large",
            f"{PAIR}:large-think",
        ]
        assert models.data[0].vlmduo == {"pair": PAIR, "mode": "duo", "small": "small", "large": "large"}
        assert client(url).models.retrieve(f"{PAIR}:large").id == f"{PAIR}:large"


@pytest.mark.parametrize("model", [f"{PAIR}:duo", "duo", PAIR])
def test_chat_completion_answers_with_timings_route_and_transfer(model):
    agents = Agents(
        small={"answer": "A", "reasoning": "It has whiskers. So A."},
        large={"answer": "B", "probability": 0.3, "transfer_answer": "A"},
    )
    with running(agents) as (url, _):
        reply = client(url).chat.completions.create(
            model=model, messages=user(QUESTION, data_uri(png_bytes()))
        )
    assert reply.object == "chat.completion" and reply.model == f"{PAIR}:duo"
    assert reply.choices[0].message.content == "A"
    assert reply.choices[0].message.reasoning_content == "It has whiskers. So A."
    extra = reply.vlmduo
    assert extra["route"] == "transfer" and extra["transferred"]["text"]
    assert {"total", "critical_path", "stage1"} <= set(extra["timings_ms"])
    assert extra["small"]["timings_ms"]["load"] == 0.0  # loaded before serving
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0


def test_request_options_map_onto_the_ask():
    agents = Agents(large={"answer": "yes", "probability": 0.9})
    with running(agents) as (url, _):
        reply = client(url).chat.completions.create(
            model=f"{PAIR}:large",
            messages=user("Is it red?"),
            max_tokens=3,
            temperature=0.5,
            seed=7,
            response_format={"type": "short"},
            extra_body={"vlmduo": {"policy": "always"}},
        )
    assert reply.vlmduo["mode"] == "large" and reply.vlmduo["format"] == "short"
    assert reply.choices[0].message.content == "yes"


def test_stream_sends_chunks_then_the_vlmduo_object_and_usage():
    agents = Agents(small={"answer": "A", "reasoning": "one two three"}, large={"answer": "A"})
    with running(agents) as (url, _):
        stream = client(url).chat.completions.create(
            model=PAIR, messages=user(QUESTION), stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "A"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(final) == 1 and final[0].vlmduo["route"] == "agree"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_an_error_inside_a_stream_reaches_the_client_as_an_error():
    agents = Agents(large={"answer": "A", "errors": {"answer": EngineError("the engine broke")}})
    with running(agents) as (url, _):
        with pytest.raises(openai.APIError, match="the engine broke"):
            list(client(url).chat.completions.create(model=f"{PAIR}:large", messages=user("Q?"), stream=True))


# -- errors: 4xx in OpenAI's shape, and the server goes on ------------------------------
def _post(url: str, body: bytes | dict, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=kw.pop("timeout", 30), **kw)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"model": "gpt-4o", "messages": user("Q?")}, 404, "model_not_found"),
        ({"model": PAIR, "messages": user("Q?", data_uri(b"GIF89a not really"))}, 400, "invalid_image"),
        ({"model": PAIR, "messages": user("Q?", data_uri(png_bytes(200, 200)))}, 413, "image_too_large"),
        ({"model": PAIR, "messages": user("Q?", "/etc/passwd")}, 400, "invalid_image_url"),
        ({"model": PAIR, "messages": user("Q?", "file:///etc/passwd")}, 400, "invalid_image_url"),
        ({"model": PAIR, "messages": user("Q?", "https://example.com/a.png")}, 400, "url_images_disabled"),
        ({"model": PAIR, "messages": user("Q?", "data:image/png,abc")}, 400, "invalid_image"),
        ({"model": PAIR, "messages": []}, 400, None),
        ({"model": PAIR, "messages": [*user("Q?"), {"role": "assistant", "content": "A"}]}, 400, None),
        ({"model": PAIR, "messages": user("Q?", data_uri(png_bytes())) * 1, "n": 2}, 400, None),
        ({"model": PAIR, "messages": user("Q?"), "response_format": {"type": "json_object"}}, 400, None),
        ({"model": PAIR, "messages": user("Q?"), "temperature": -1}, 400, None),
        ({"model": PAIR, "messages": user("Q?"), "vlmduo": {"policy": "sometimes"}}, 400, "invalid_value"),
        ({"model": PAIR, "messages": user("Q?"), "vlmduo": {"colour": "red"}}, 400, None),
        ({"model": PAIR, "messages": user("   ")}, 400, "invalid_value"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(body, status, code):
    limits = Limits(max_image_bytes=4096)
    with running(Agents(), limits=limits) as (url, _):
        response = _post(url, body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] and ("code" in error and "param" in error)
        if code is not None:
            assert error["code"] == code
        ok = client(url).chat.completions.create(model=PAIR, messages=user(QUESTION, data_uri(png_bytes())))
        assert ok.choices[0].message.content == "A"


def test_two_images_in_one_request_are_refused():
    two = user("Q?", data_uri(png_bytes()))
    two[0]["content"].append({"type": "image_url", "image_url": {"url": data_uri(png_bytes())}})
    with running(Agents()) as (url, _):
        response = _post(url, {"model": PAIR, "messages": two})
    assert response.status_code == 400 and "one image" in response.json()["error"]["message"]


def test_a_body_over_the_cap_is_413_and_unknown_paths_are_json():
    with running(Agents(), limits=Limits(max_body_bytes=1000)) as (url, _):
        big = _post(url, {"model": PAIR, "messages": user("x" * 2000)})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        missing = httpx.get(url + "/v2/nothing", timeout=10)
        assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
        wrong = httpx.get(url + "/v1/chat/completions", timeout=10)
        assert wrong.status_code == 405 and wrong.json()["error"]


def test_api_key_is_required_on_every_endpoint_but_health():
    with running(Agents(), api_key="s3cret") as (url, _):
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret").models.list().data


# -- the native endpoint ---------------------------------------------------------------
def test_native_endpoint_returns_exactly_the_ask_json_object():
    from vlmduo.serve.wire import native_request

    body = native_request(QUESTION, png_bytes(), "photo.png", 1.5, _options(), engine={})
    body["engine"] = None
    with running(Agents()) as (url, _):
        response = _post(url, body, path="/api/ask")
        assert response.status_code == 200
        data = response.json()
        keys = ["answer", "mode", "policy", "route", "format", "small", "large", "transferred", "timings_ms"]
        assert list(data) == keys
        # An image that is not one reads as in-process, under the name the client gave.
        bad = native_request(QUESTION, b"not an image", "notes.txt", 0.0, _options(), engine={})
        bad["engine"] = None
        error = _post(url, bad, path="/api/ask").json()["error"]
        assert error["message"] == "not an image (or a format Pillow cannot read): notes.txt"
        assert error["exit_code"] == 1


def test_native_endpoint_refuses_other_engine_settings():
    from vlmduo.serve.wire import native_request

    body = native_request(QUESTION, None, "", 0.0, _options(), engine={"n_ctx": 1})
    with running(Agents(), engine={"n_ctx": 4096}) as (url, _):
        response = _post(url, body, path="/api/ask")
    assert response.status_code == 409 and response.json()["error"]["code"] == "engine_mismatch"


def _options():
    from vlmduo.duo.pipeline import AskOptions

    return AskOptions()


@pytest.mark.parametrize(
    "fields",
    [{"policy": "sometimes"}, {"think_budget": -1}, {"colour": "red"}],
)
def test_both_endpoints_refuse_a_bad_option_alike_and_as_the_cli(fields, isolated_env):
    from conftest import run_cli

    native = {"question": QUESTION, "image": None, "options": fields}
    chat = {"model": PAIR, "messages": user(QUESTION), "vlmduo": fields}
    with running(Agents()) as (url, _):
        a = _post(url, native, path="/api/ask").json()["error"]
        b = _post(url, chat).json()["error"]
    assert (a["code"], a["exit_code"], a.get("hint")) == (b["code"], b["exit_code"], b.get("hint"))
    assert a["exit_code"] == 2 and a["code"] == "invalid_value"
    if "colour" not in fields:  # an option the CLI has: its words and its exit code
        flag = "--" + next(iter(fields)).replace("_", "-")
        cli = run_cli(
            ["ask", "example", QUESTION, "--pair", "synthetic", flag, str(next(iter(fields.values())))],
            isolated_env,
        )
        assert cli.returncode == a["exit_code"]
        assert a["message"] == b["message"] and a["message"] in cli.stderr.decode()


# -- load: the queue, disconnects, idle unload ------------------------------------------
def test_beyond_the_queue_requests_get_429_and_the_rest_are_answered():
    agents = Agents(large={"answer": "A", "delays": {"answer": 1.5}})
    results: list[int] = []

    def ask(url: str) -> None:
        body = {"model": f"{PAIR}:large", "messages": user("Q?")}
        results.append(_post(url, body).status_code)

    with running(agents, max_waiting=1) as (url, host):
        first = threading.Thread(target=ask, args=(url,))
        first.start()
        _until(lambda: host.queue.busy)
        second = threading.Thread(target=ask, args=(url,))
        second.start()
        _until(lambda: host.queue.waiting == 1)
        third = _post(url, {"model": f"{PAIR}:large", "messages": user("Q?")})
        first.join(30)
        second.join(30)
    assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
    assert sorted(results) == [200, 200]


def test_a_client_that_disconnects_cancels_its_ask():
    agents = Agents(small={"answer": "A", "delays": {"reason": 60.0}}, large={"answer": "A"})
    with running(agents) as (url, host):
        with pytest.raises(httpx.ReadTimeout):
            _post(url, {"model": f"{PAIR}:small", "messages": user("Q?")}, timeout=0.5)
        _until(lambda: "reason" in agents.small.cancelled and not host.queue.busy)
        agents.small.enqueue(answer="B")
        again = client(url).chat.completions.create(model=f"{PAIR}:small", messages=user(QUESTION))
    assert again.choices[0].message.content == "B"


def test_a_stream_that_disconnects_cancels_its_ask():
    agents = Agents(small={"answer": "A", "delays": {"reason": 60.0}}, large={"answer": "A"})
    body = {"model": f"{PAIR}:small", "messages": user("Q?"), "stream": True}
    with running(agents) as (url, host):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        _until(lambda: "reason" in agents.small.cancelled and not host.queue.busy)


def test_idle_models_are_unloaded_and_reloaded_on_the_next_request():
    agents = Agents(large={"answer": "A"})
    with running(agents, keep_alive_s=0.2) as (url, host):
        _until(lambda: not host.loaded)
        status = httpx.get(url + "/api/status", timeout=10).json()
        assert status["state"] == "unloaded" and status["models"] == {"small": "small", "large": "large"}
        reply = client(url).chat.completions.create(model=f"{PAIR}:large", messages=user("Q?"))
        assert agents.loads == 2
        assert reply.vlmduo["large"]["timings_ms"]["load"] == 7.0  # this request paid the reload


def test_keep_alive_forever_never_unloads():
    host = PairHost(
        PairSpec(PAIR, {}, EngineSettings()), keep_alive_s=None, loader=Agents(), unloader=lambda a: None
    )
    host.load()
    assert not host.unload_if_idle(now=time.monotonic() + 10**9) and host.loaded


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
