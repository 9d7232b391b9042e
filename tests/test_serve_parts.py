"""The server's pure parts, table-tested: durations, pair keys and the lock, discovery,
the engine queue, the OpenAI request mapping and the stream relay."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vlmduo.errors import Cancelled, UsageError
from vlmduo.serve import runtime
from vlmduo.serve.host import EngineQueue, QueueFull
from vlmduo.serve.openai_api import ApiError, StreamRelay, mode_of, parse_chat


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMDUO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "run"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("90", 90.0),
        ("0", 0.0),
        ("-1", None),
        ("250ms", 0.25),
    ],
)
def test_keep_alive_durations(text, seconds):
    assert runtime.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["five minutes", "5 m", "m5", "", "5mm"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError):
        runtime.parse_duration(text)


def test_the_same_pair_spelled_two_ways_has_one_key(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    a = {"small": ("m.gguf", None), "large": ("big", None)}
    b = {"small": (str(model), None), "large": ("big", None)}
    other = {"small": (str(model), None), "large": ("bigger", None)}
    assert runtime.pair_key(a) == runtime.pair_key(b) != runtime.pair_key(other)


def test_a_second_lock_on_a_pair_is_refused_and_freed_with_the_first():
    with runtime.pair_lock("k1"):
        with pytest.raises(runtime.AlreadyServing), runtime.pair_lock("k1"):
            pass
        with runtime.pair_lock("k2"):  # another pair: fine
            pass
    with runtime.pair_lock("k1"):  # released
        pass


def _record(key="k", state="ready", pid=None, **kw):
    refs = {"small": ["s", None], "large": ["l", None]}
    values = dict(host="127.0.0.1", port=1, pair="p", refs=refs, models={}, engine={"n_ctx": 1})
    values.update(kw)
    return runtime.ServerRecord(key=key, pid=pid or os.getpid(), state=state, **values)


def test_find_server_matches_models_and_settings_and_explains_a_mismatch():
    runtime.write_record(_record())
    refs = {"small": ("s", None), "large": ("l", None)}
    assert runtime.find_server(refs, ("small", "large"), {"n_ctx": 1}).record is not None
    # Only the roles the mode needs must match.
    assert runtime.find_server({"small": ("x", None), "large": ("l", None)}, ("large",), {"n_ctx": 1}).record
    assert (
        runtime.find_server({"small": ("x", None), "large": ("l", None)}, ("small",), {"n_ctx": 1}).record
        is None
    )
    missed = runtime.find_server(refs, ("small", "large"), {"n_ctx": 2})
    assert missed.record is None and "n_ctx 1 there, 2 here" in missed.note


def test_records_of_dead_servers_are_ignored():
    runtime.write_record(_record(pid=2**22 + 12345))  # no such process
    assert runtime.live_records() == []


def test_an_ask_waits_for_a_server_that_is_still_loading():
    runtime.write_record(_record(state="loading"))
    refs = {"small": ("s", None), "large": ("l", None)}

    def get_ready():
        time.sleep(0.3)
        runtime.write_record(_record(state="ready"))

    threading.Thread(target=get_ready).start()
    found = runtime.find_server(refs, ("small", "large"), {"n_ctx": 1}, wait_s=30)
    assert found.record is not None and found.record.state == "ready"


def test_a_server_that_never_gets_ready_is_not_waited_for_forever():
    runtime.write_record(_record(state="loading"))
    refs = {"small": ("s", None), "large": ("l", None)}
    assert runtime.find_server(refs, ("small", "large"), {"n_ctx": 1}, wait_s=0.2).record is None


# -- the engine queue ----------------------------------------------------------------
def test_queue_runs_one_at_a_time_first_come_first_served():
    queue = EngineQueue(max_waiting=8)
    order, running = [], []
    tickets = [queue.admit() for _ in range(4)]

    def work(i):
        with queue.turn(tickets[i]):
            running.append(i)
            assert len(running) == 1
            order.append(i)
            time.sleep(0.01)
            running.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in reversed(range(4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3]


def test_queue_full_is_refused_at_once():
    queue = EngineQueue(max_waiting=1)
    running = queue.admit()
    with queue.turn(running):
        queue.admit()
        with pytest.raises(QueueFull):
            queue.admit()


def test_a_cancelled_waiter_gives_up_its_place():
    queue = EngineQueue(max_waiting=2)
    first, second, third = queue.admit(), queue.admit(), queue.admit()
    cancel = threading.Event()
    errors = []

    def wait_second():
        try:
            with queue.turn(second, cancel):
                pass
        except Cancelled as exc:
            errors.append(exc)

    with queue.turn(first):
        waiter = threading.Thread(target=wait_second)
        waiter.start()
        cancel.set()
        waiter.join(10)
    assert errors and queue.waiting == 1
    with queue.turn(third):  # next in line despite the withdrawn place before it
        pass


# -- the OpenAI request --------------------------------------------------------------
def _body(**kw):
    return {"model": "p:duo", "messages": [{"role": "user", "content": "Is it red?"}], **kw}


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ({}, "fmt", "auto"),
        ({"response_format": {"type": "text"}}, "fmt", "auto"),
        ({"response_format": {"type": "yesno"}}, "fmt", "yesno"),
        ({"vlmduo": {"format": "number"}}, "fmt", "number"),
        ({"max_tokens": 5}, "max_answer_tokens", 5),
        ({"max_completion_tokens": 6, "max_tokens": 5}, "max_answer_tokens", 6),
        ({"temperature": 0.7}, "temperature", 0.7),
        ({"seed": 42}, "seed", 42),
        ({}, "temperature", None),  # each model card's sampling unless asked
        ({"vlmduo": {"think_budget": 32, "policy": "always"}}, "think_budget", 32),
    ],
)
def test_request_fields_map_onto_ask_options(extra, field, value):
    assert getattr(parse_chat(_body(**extra), "p").options, field) == value


@pytest.mark.parametrize(
    ("model", "mode"), [("p:duo", "duo"), ("p", "duo"), ("small", "small"), ("p:large-think", "large-think")]
)
def test_model_names(model, mode):
    assert mode_of(model, "p") == mode


@pytest.mark.parametrize("model", ["q:duo", "p:medium", None, 3, "gpt-4o"])
def test_unknown_models_are_404(model):
    with pytest.raises(ApiError) as info:
        mode_of(model, "p")
    assert info.value.status == 404 and info.value.code == "model_not_found"


def test_system_messages_are_ignored_and_text_parts_joined():
    body = _body(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Is it"}, {"type": "text", "text": "red?"}],
            },
        ]
    )
    request = parse_chat(body, "p")
    assert request.question == "Is it\nred?" and request.image_url is None


# -- the stream relay ----------------------------------------------------------------
def test_relay_streams_reasoning_and_trimmed_final_content():
    sent = []
    relay = StreamRelay("large", live=True, sink=lambda kind, text: sent.append((kind, text)))
    for piece in ["  ", "Hello", " ", "world", "\n"]:
        relay.on_text("large", "answer", piece)
    assert "".join(t for k, t in sent if k == "content") == "Hello world"
    assert relay.remainder("Hello world") == ""
    relay.on_text("small", "reason", "think")
    relay.on_text("small", "reason", "</think>")
    assert sent[-1] == ("reasoning", "think")


def test_relay_in_duo_streams_only_the_transfer_and_sends_the_rest_at_the_end():
    sent = []
    relay = StreamRelay("duo", live=True, sink=lambda kind, text: sent.append((kind, text)))
    relay.on_text("large", "answer", "stage one answer")  # may be replaced: not streamed
    assert sent == []
    assert relay.remainder("final") == "final"
    relay.on_text("large", "transfer", "final")
    assert sent == [("content", "final")] and relay.remainder("final") == ""


def test_relay_holds_constrained_answers_for_the_end():
    sent = []
    relay = StreamRelay("large", live=False, sink=lambda kind, text: sent.append((kind, text)))
    relay.on_text("large", "answer", "A. cat")
    assert sent == [] and relay.remainder("A") == "A"
