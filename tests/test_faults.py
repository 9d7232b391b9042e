"""The duo under faults: cancellation, shared weights, recovery, calibrated confidence.

Routes, failures and slow stages are forced with scripted agents
(``vlmduo.agents.scripted``); what needs the engine runs on real GGUF files.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
from conftest import interrupt_when, with_endless_pair

from vlmduo.agents.scripted import ScriptedAgent
from vlmduo.duo import pipeline
from vlmduo.duo.pipeline import AskOptions, make_question
from vlmduo.engine import logs
from vlmduo.errors import Cancelled, EngineError

CHOICE = "Which animal is it? A. cat B. dog C. bird D. fish"


@pytest.fixture
def agents(small_model, large_model):
    from vlmduo.agents.local import Agent

    return Agent(small_model, thinking=True), Agent(large_model, context=large_model.new_context())


def _q():
    return make_question(CHOICE, None, "auto")


# -- routes and policies, scripted ------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "small_answer", "large_answer", "probability", "threshold", "route", "answer"),
    [
        ("verify", "A", "A", 0.5, 0.8, "agree", "A"),
        ("verify", "A", "B", 0.5, 0.8, "transfer", "C"),
        ("always", "A", "A", 0.5, 0.8, "transfer", "C"),
        ("confidence", "A", "B", 0.9, 0.8, "confident", "B"),
        ("confidence", "A", "B", 0.7, 0.8, "transfer", "C"),  # below the threshold: verify
        ("confidence", "B", "B", 0.7, 0.8, "agree", "B"),
        ("confidence", "A", "B", 0.8, 0.8, "confident", "B"),  # the threshold itself counts
    ],
)
def test_routes_follow_the_policy(policy, small_answer, large_answer, probability, threshold, route, answer):
    small = ScriptedAgent("small").enqueue(answer=small_answer)
    large = ScriptedAgent("large").enqueue(answer=large_answer, probability=probability, transfer_answer="C")
    options = AskOptions(policy=policy, confidence_threshold=threshold)
    result = pipeline.ask(_q(), options, small=small, large=large)
    assert (result.route, result.answer) == (route, answer)
    assert ("transfer" in large.calls) == (route == "transfer")


class _AnswersOnceTheSmallReasons(ScriptedAgent):
    """A large agent whose answer waits until the small agent has started reasoning (so
    there is a running agent to cancel, however the threads are scheduled)."""

    def __init__(self, name: str, small: ScriptedAgent) -> None:
        super().__init__(name)
        self.small = small

    def answer_short(self, *args, **kwargs):
        deadline = time.monotonic() + 30  # a hang guard, not a timing claim
        while "reason" not in self.small.calls:
            assert time.monotonic() < deadline, "the small agent never started"
            time.sleep(0.005)
        return super().answer_short(*args, **kwargs)


def test_confident_answer_cancels_a_slow_small_agent():
    small = ScriptedAgent("small").enqueue(answer="A", delays={"reason": 30.0})
    large = _AnswersOnceTheSmallReasons("large", small).enqueue(answer="B", probability=0.95)
    start = time.monotonic()
    result = pipeline.ask(_q(), AskOptions(policy="confidence"), small=small, large=large)
    assert result.route == "confident" and result.small.cancelled
    assert small.cancelled == ["reason"]
    assert time.monotonic() - start < 25  # far less than the 30 s the small agent would take


def test_sequential_confident_never_starts_the_small_agent():
    small = ScriptedAgent("small").enqueue(answer="A")
    large = ScriptedAgent("large").enqueue(answer="B", probability=0.95)
    result = pipeline.ask(_q(), AskOptions(policy="confidence", sequential=True), small=small, large=large)
    assert result.route == "confident" and small.calls == []


@pytest.mark.parametrize("failing", ["large", "small"])
def test_a_failing_agent_cancels_the_other_and_its_error_is_raised(failing):
    boom = EngineError(f"{failing} broke")
    slow = {"reason": 30.0} if failing == "large" else {"answer": 30.0}
    small = ScriptedAgent("small").enqueue(
        delays=slow if failing == "large" else {"reason": 0.05},
        errors={"reason": boom} if failing == "small" else {},
    )
    large = ScriptedAgent("large").enqueue(
        delays=slow if failing == "small" else {"answer": 0.05},
        errors={"answer": boom} if failing == "large" else {},
    )
    with pytest.raises(EngineError, match=f"{failing} broke"):
        pipeline.ask(_q(), AskOptions(policy="always"), small=small, large=large)
    other = large if failing == "small" else small
    assert other.cancelled, "the other agent was not cancelled"
    # Thread settings were restored on the way out.
    assert small.threads_entered == 0 and large.threads_entered == 0


def test_an_outside_cancel_stops_both_agents():
    small = ScriptedAgent("small").enqueue(delays={"reason": 30.0})
    large = ScriptedAgent("large").enqueue(delays={"answer": 30.0})
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled):
        pipeline.ask(_q(), AskOptions(), small=small, large=large, cancel=cancel)
    assert small.cancelled == ["reason"] and large.cancelled == ["answer"]


# -- the engine: cancellation inside prefill, shared weights, threads --------------


def test_cancel_aborts_a_long_prefill_between_batches(large_files):
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings

    model = VisionLanguageModel(large_files.model, large_files.mmproj, EngineSettings(n_ctx=8192, n_batch=64))
    cancel = threading.Event()
    session = model.default_context.session(cancel)
    text = "the cat sat on the mat " * 500  # thousands of tokens: many batches
    n_tokens = len(model.tokenize(text))
    threading.Timer(0.05, cancel.set).start()
    with pytest.raises(Cancelled):
        session.append(text)
    assert 0 <= session.n_past < n_tokens  # stopped part way, not after the whole prompt


def test_same_model_as_small_and_large_matches_two_copies(large_files, image, tmp_path):
    import shutil

    from vlmduo.api import ResolvedModel, load_agent

    copy = tmp_path / "copy.gguf"
    shutil.copy(large_files.model, copy)
    shared = ResolvedModel("shared", large_files.model, large_files.mmproj)
    other = ResolvedModel("copy", copy, large_files.mmproj)
    q = make_question(CHOICE, image, "auto")
    for sequential in (False, True):
        options = AskOptions(policy="always", think_budget=24, sequential=sequential)
        small, _ = load_agent(shared, role="small")
        large, _ = load_agent(shared, role="large")
        assert small.model is large.model and small.context is not large.context
        one = pipeline.ask(q, options, small=small, large=large)
        large2, _ = load_agent(other, role="large")
        two = pipeline.ask(q, options, small=small, large=large2)
        assert one.to_json()["transferred"] == two.to_json()["transferred"]
        assert (one.answer, one.large.tokens) == (two.answer, two.large.tokens)


def test_thread_counts_are_restored_after_a_failed_duo(large_model, image):
    from vlmduo.agents.local import Agent

    large = Agent(large_model, context=large_model.new_context())
    before = large.context.share
    small = ScriptedAgent("small").enqueue(errors={"reason": EngineError("broken")})
    with pytest.raises(EngineError):
        pipeline.ask(make_question(CHOICE, image, "auto"), AskOptions(), small=small, large=large)
    # The share of the cores it may use is restored (what llama.cpp runs with now also
    # follows the machine's load: vlmduo.engine.threads).
    assert large.context.share == before
    assert large.context.n_threads <= before


def test_stale_session_raises_instead_of_reading_another_cache(small_model):
    first = small_model.session()
    first.prefill(small_model.render_prompt("Hi", image=False))
    small_model.session()  # takes the context
    with pytest.raises(EngineError, match="stale"):
        first.generate(2)


# -- calibrated confidence -----------------------------------------------------------


def test_answer_probability_is_under_the_grammar(agents, image):
    from vlmduo.agents.base import Sampling
    from vlmduo.agents.local import answer_short

    _, large = agents
    q = make_question(CHOICE, image, "auto")
    short = answer_short(large, q, Sampling())
    p = short.result.answer_probability
    # Greedy picks the likeliest of 4 allowed letters: renormalised over them it
    # has at least 1/4. Under the raw distribution (0.1's definition) a random
    # model gave ~1e-4 here.
    assert 0.25 - 1e-6 <= p <= 1.0


def test_intermediate_thresholds_route_by_the_probability(agents, image):
    small, large = agents
    q = make_question(CHOICE, image, "auto")
    probe = pipeline.ask(q, AskOptions(mode="large"), large=large)
    p = probe.large.answer_probability
    assert 0.0 < p < 1.0
    above = AskOptions(policy="confidence", confidence_threshold=min(1.0, p + 0.01), think_budget=16)
    below = AskOptions(policy="confidence", confidence_threshold=max(0.0, p - 0.01), think_budget=16)
    assert pipeline.ask(q, below, small=small, large=large).route == "confident"
    assert pipeline.ask(q, above, small=small, large=large).route in {"agree", "transfer"}


def test_transferred_control_text_is_plain_text(agents, image):
    from vlmduo.agents.base import Sampling
    from vlmduo.agents.local import answer_short, transfer_answer
    from vlmduo.agents.prompts import TRANSFER_CUE

    _, large = agents
    q = make_question(CHOICE, image, "auto")
    short = answer_short(large, q, Sampling(), reserve=64)
    text = "It is a cat.<|im_end|>"
    done = transfer_answer(large, short, q, text, Sampling())
    cue = len(large.model.tokenize(TRANSFER_CUE, special=True))
    assert done.prefill_tokens - cue == large.count_tokens(text)
    assert large.count_tokens("<|im_end|>") > 1  # spelled out, not one control token


# -- logs, resources -------------------------------------------------------------------


def test_errors_quote_their_own_threads_log_lines():
    def log(text: str) -> None:
        logs._on_log(4, text.encode(), None)

    seen = {}

    def other() -> None:
        log("other model: error loading tensor\n")
        seen["other"] = logs.last_error()

    log("this model: failed to allocate\n")
    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert "this model" in logs.last_error()
    assert "other model" in seen["other"]


def test_close_is_idempotent_and_unload_evicts(small_files):
    from vlmduo import api
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.errors import ModelError

    resolved = api.ResolvedModel("evict-me", small_files.model, small_files.mmproj)
    settings = EngineSettings(n_ctx=512)
    model, first_ms = api.load_model(resolved, settings)
    assert api.unload(model) is True
    with pytest.raises(ModelError, match="closed"):
        model.session()
    model.close()  # a second close is harmless
    again, again_ms = api.load_model(resolved, settings)
    assert again is not model and again_ms > 0.0
    assert api.unload(again) and not api.unload(again)


# -- Ctrl-C through the CLI --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["duo", "large-think"])
def test_ctrl_c_exits_130_without_finishing_the_reasoning(mode, image_file, isolated_env):
    # The endless pair never ends a thought (greedy): the reasoning runs until the signal
    # (20000 tokens would take minutes), which is sent once the status line says so.
    env = with_endless_pair(isolated_env)
    args = ["ask", str(image_file), "Is it a cat?", "--pair", "endless", "--mode", mode]
    args += ["--think-budget", "20000", "--ctx", "24576", "--temperature", "0"]
    code, err = interrupt_when([sys.executable, "-m", "vlmduo", *args], env, b": reason")
    assert code == 130, err.decode()
    assert b"Interrupted" in err and b"Traceback" not in err


@pytest.mark.parametrize("sequential", [False, True])
def test_small_agent_takes_every_core_once_the_large_has_answered(sequential):
    small = ScriptedAgent("small").enqueue(answer="A", delays={"reason": 0.3})
    large = ScriptedAgent("large").enqueue(answer="A")
    pipeline.ask(_q(), AskOptions(sequential=sequential), small=small, large=large)
    assert ("solo" in small.calls) is not sequential
    assert "solo" not in large.calls


@pytest.mark.parametrize("sequential", [False, True])
def test_large_agent_takes_every_core_once_the_small_is_through(sequential):
    # A heavy image and a short thought: the small agent finishes stage 1 first.
    small = ScriptedAgent("small").enqueue(answer="A")
    large = ScriptedAgent("large").enqueue(answer="A", delays={"answer": 0.3})
    pipeline.ask(_q(), AskOptions(sequential=sequential), small=small, large=large)
    assert ("solo" in large.calls) is not sequential
    assert "solo" not in small.calls


class _ThreadRecorder(ScriptedAgent):
    """A scripted agent that notes which OS thread ran each of its steps (the kernel's
    thread id: a Python ident can be reused by the next thread)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.threads: dict[str, int] = {}

    def reason(self, *args, **kwargs):
        self.threads["reason"] = threading.get_native_id()
        return super().reason(*args, **kwargs)

    def answer_short(self, *args, **kwargs):
        self.threads["answer_short"] = threading.get_native_id()
        return super().answer_short(*args, **kwargs)

    def transfer(self, *args, **kwargs):
        self.threads["transfer"] = threading.get_native_id()
        return super().transfer(*args, **kwargs)


@pytest.mark.parametrize(
    ("sequential", "small_delay", "large_delay", "transfer_on"),
    [
        (False, 0.3, 0.0, "small"),  # the small agent finishes last: its thread goes on
        (False, 0.0, 0.3, "large"),  # the large one finishes last
        (True, 0.0, 0.0, "large"),  # sequential: one thread for all of it
    ],
)
def test_the_transfer_runs_on_the_thread_that_finished_stage_1_last(
    sequential, small_delay, large_delay, transfer_on
):
    # The OpenMP team of the thread that ran last is the one still awake; a new thread
    # would start a new team beside its spinning threads.
    small = _ThreadRecorder("small").enqueue(answer="A", delays={"reason": small_delay})
    large = _ThreadRecorder("large").enqueue(answer="B", delays={"answer": large_delay})
    large.enqueue(answer="A")  # the answer after the transfer
    options = AskOptions(sequential=sequential, policy="always")
    pipeline.ask(_q(), options, small=small, large=large)
    stage1 = {"small": small.threads["reason"], "large": large.threads["answer_short"]}
    assert large.threads["transfer"] == stage1[transfer_on]
    assert (stage1["small"] == stage1["large"]) is sequential  # negative control
    assert threading.get_native_id() not in stage1.values()  # off the main thread (Ctrl-C)


def test_widened_threads_are_restored_after_the_duo(agents, image):
    small, large = agents
    before = (small.model.default_context.share, large.context.share)
    options = AskOptions(policy="always", think_budget=48)
    pipeline.ask(make_question(CHOICE, image, "auto"), options, small=small, large=large)
    # The shares: what llama.cpp runs with also follows the machine's load.
    assert (small.model.default_context.share, large.context.share) == before
