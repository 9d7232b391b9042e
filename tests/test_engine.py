"""The engine on real GGUF files through llama.cpp: stages, KV prefix reuse, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import ContextOverflowError, ModelError, ProjectorMismatchError
from vlmduo.models.synthetic import SyntheticSpec, build


def test_prefill_counts_and_stage_timings(small_model, small_files, image):
    session = small_model.session()
    prompt = small_model.render_prompt("How many cats?", image=True)
    session.prefill(prompt, image)
    assert session.n_image_tokens == small_files.spec.image_tokens
    text_tokens = small_model.tokenize(prompt.replace(small_model.marker, ""), special=True)
    # libmtmd splits around the marker, so allow a token of difference at the seams.
    assert abs(session.n_prompt_tokens - len(text_tokens)) <= 2
    for stage in ("image", "encode", "prefill"):
        assert session.times.get(stage) > 0.0, stage
    assert session.n_past == session.n_prompt_tokens + session.n_image_tokens


def test_stream_yields_tokens_with_logprobs(small_model, image):
    session = small_model.session()
    session.prefill(small_model.render_prompt("Describe it.", image=True), image)
    events = list(session.stream(12, logprobs=True))
    assert 0 < len(events) <= 12
    assert all(e.logprob is not None and e.logprob <= 0.0 for e in events)
    assert [e.token for e in events] == session.last.tokens
    assert session.times.get("decode") > 0.0
    elapsed = [e.elapsed_ms for e in events]
    assert elapsed == sorted(elapsed)


def _stream_with_logits(session, n, **kwargs):
    """Each streamed event beside the logits its token was sampled from."""
    steps, logits = [], session.logits()
    for event in session.stream(n, logprobs=True, **kwargs):
        steps.append((event, logits))
        logits = session.logits()
    return steps


def _log_softmax_at(logits, token, allowed=None):
    import numpy as np

    pool = logits.astype(np.float64) if allowed is None else logits.astype(np.float64)[allowed]
    top = pool.max()
    return float(logits[token]) - (top + float(np.log(np.exp(pool - top).sum())))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_raw_distribution_without_a_grammar(small_model, image, temperature):
    session = small_model.session()
    session.prefill(small_model.render_prompt("Describe it.", image=True), image)
    from vlmduo.engine.sampling import SamplerSettings

    sampler = SamplerSettings(temperature=temperature, seed=4)
    steps = _stream_with_logits(session, 6, sampler=sampler)
    assert steps
    for event, logits in steps:
        assert event.logprob == pytest.approx(_log_softmax_at(logits, event.token), abs=2e-4)
        # The model's input matters: the distribution is not uniform.
        assert abs(event.logprob + float(np.log(small_model.n_vocab))) > 1e-2


def test_logprobs_under_a_grammar_are_renormalised_over_what_it_allows(small_model, image):
    # The tokens that are exactly one of the letters: all the grammar allows at first.
    letters = [t for t in range(small_model.n_vocab) if small_model.piece(t) in (b"A", b"B", b"C", b"D")]
    assert len(letters) >= 4  # byte-fallback tokens spell them too
    session = small_model.session()
    session.prefill(small_model.render_prompt("Which letter?", image=True), image)
    steps = _stream_with_logits(session, 2, grammar='root ::= "A" | "B" | "C" | "D"')
    ((event, logits),) = steps
    assert event.token in letters
    expected = _log_softmax_at(logits, event.token, allowed=letters)
    assert event.logprob == pytest.approx(expected, abs=2e-4)
    # Negative control: under the raw distribution the same token is far less likely.
    assert _log_softmax_at(logits, event.token) < expected - 1.0
    # Then the grammar allows only the end (the vocabulary's end-of-generation tokens).
    assert -1e-3 < session.last.end_logprob <= 0.0


def test_an_interrupt_inside_the_probe_is_not_lost(small_model, image, monkeypatch):
    # The probe runs as a ctypes callback, which would print and drop a Ctrl-C
    # raised in it, then report the previous step's probability.
    import math

    from vlmduo.engine import sampling

    class InterruptOnThirdLog:
        calls = 0

        def __getattr__(self, name):
            return getattr(math, name)

        def log(self, x):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return math.log(x)

    session = small_model.session()
    session.prefill(small_model.render_prompt("Describe it.", image=True), image)
    monkeypatch.setattr(sampling, "math", InterruptOnThirdLog())
    with pytest.raises(KeyboardInterrupt):
        session.generate(6, logprobs=True)
    assert len(session.last.logprobs) == 2  # two steps were reported, the third raised
    monkeypatch.undo()
    session = small_model.session()  # the model stays usable
    session.prefill(small_model.render_prompt("Describe it.", image=True), image)
    assert len(session.generate(6, logprobs=True).logprobs) > 2


def test_continuation_after_cached_prefix_matches_fresh_run(small_model, image):
    prompt = small_model.render_prompt("What is in the picture?", image=True)
    suffix = "The picture shows two red cars and a tree. So"
    cached = small_model.session()
    cached.prefill(prompt, image)
    prefix_end = cached.n_past
    encode_before = cached.times.get("encode")
    cached.generate(8)  # a first answer, to be thrown away like the duo pipeline does
    cached.rewind(prefix_end)
    n_new = cached.append(suffix, stage="transfer_prefill")
    continued = cached.generate(16).tokens

    fresh = small_model.session()
    fresh.prefill(prompt + suffix, image)
    assert continued == fresh.generate(16).tokens
    # Only the new tokens were prefilled; the image was not encoded again.
    assert n_new == len(small_model.tokenize(suffix, special=True))
    assert cached.times.get("encode") == encode_before
    assert cached.n_image_tokens == fresh.n_image_tokens


def test_grammar_constrains_output(small_model, image):
    session = small_model.session()
    session.prefill(small_model.render_prompt("Pick one.", image=True), image)
    gen = session.generate(8, grammar='root ::= "A" | "B" | "C"')
    assert gen.text in {"A", "B", "C"}
    assert gen.stop_reason == "eog"


def test_stop_token_ends_stream_without_feeding_it(small_model):
    session = small_model.session()
    session.prefill(small_model.render_prompt("Think.", image=False))
    first = session.generate(1)
    stop_id = first.tokens[0]
    session2 = small_model.session()
    session2.prefill(small_model.render_prompt("Think.", image=False))
    before = session2.n_past
    gen = session2.generate(10, stop_tokens=(stop_id,))
    assert gen.stop_reason == "stop" and gen.tokens == [stop_id]
    assert session2.n_past == before  # the stop token was not decoded into the KV cache


def test_question_without_image(small_model):
    session = small_model.session()
    session.prefill(small_model.render_prompt("Say something.", image=False))
    assert session.n_image_tokens == 0
    assert session.generate(4).tokens


def test_context_overflow_is_caught_before_llama_cpp(small_files, image):
    model = VisionLanguageModel(small_files.model, small_files.mmproj, EngineSettings(n_ctx=64))
    session = model.session()
    long_question = "Why? " * 80
    with pytest.raises(ContextOverflowError, match=r"context holds \d+"):
        session.prefill(model.render_prompt(long_question, image=True), image)
    with pytest.raises(ContextOverflowError):
        session.prefill(model.render_prompt("Hi", image=True), image, reserve=1000)


def test_projector_width_mismatch_is_refused_before_loading(tmp_path, small_files):
    bad = SyntheticSpec(proj_embd=96)
    build(bad, tmp_path / "unused.gguf", tmp_path / "wide-mmproj.gguf")
    with pytest.raises(ProjectorMismatchError, match="96-wide"):
        VisionLanguageModel(small_files.model, tmp_path / "wide-mmproj.gguf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, src: None, "not found"),
        (lambda p, src: p.write_text("hello, not a model"), "not a GGUF file"),
        (lambda p, src: p.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "truncated"),
        (lambda p, src: p.write_bytes(b"GGUF\x03\x00"), "corrupt or truncated"),
        (lambda p, src: p.mkdir(), "directory"),
    ],
)
def test_bad_model_files_are_one_line_errors(tmp_path, small_files, make, message):
    path = tmp_path / "model.gguf"
    make(path, small_files.model)
    with pytest.raises(ModelError, match=message) as info:
        VisionLanguageModel(path, small_files.mmproj)
    assert "\n" not in info.value.message


def test_projector_passed_as_model_is_refused(small_files):
    with pytest.raises(ModelError, match="projector"):
        VisionLanguageModel(small_files.mmproj, small_files.mmproj)


def test_second_load_in_process_is_free(small_files):
    from vlmduo.api import ResolvedModel, load_model

    resolved = ResolvedModel("cached", small_files.model, small_files.mmproj)
    settings = EngineSettings(n_ctx=512)
    first, first_ms = load_model(resolved, settings)
    second, second_ms = load_model(resolved, settings)
    assert first is second
    assert first_ms > 0.0 and second_ms == 0.0


def test_list_only_chat_template_gets_flattened_text(tmp_path):
    from vlmduo.engine import chat

    # A template that only accepts a list of parts (string content raises).
    template = (
        "{% for m in messages %}{% if m['content'] is string %}"
        "{{ raise_exception('parts only') }}{% endif %}"
        "{% for part in m['content'] %}[{{ part['text'] }}]{% endfor %}{% endfor %}"
    )
    assert chat.render(template, "<__media__>\nQ?") == "[<__media__>\nQ?]"
    string_only = "{% for m in messages %}{{ m['content'] + '|' }}{% endfor %}"
    assert chat.render(string_only, "<__media__>\nQ?") == "<__media__>\nQ?|"


def test_model_without_projector_refuses_images(small_files, tmp_path):
    lone = tmp_path / "lone.gguf"
    shutil.copy(small_files.model, lone)
    model = VisionLanguageModel(Path(lone), None, EngineSettings(n_ctx=512))
    with pytest.raises(ModelError, match="cannot see images"):
        model.render_prompt("What is it?", image=True)


@pytest.mark.parametrize("n_vocab", [2295, 32000, 152000])
def test_synthetic_vocabulary_is_unique_and_loads(tmp_path, n_vocab):
    from vlmduo.models.synthetic import vocabulary

    pieces, scores, types = vocabulary(n_vocab)
    assert len(pieces) == len(set(pieces)) == len(scores) == len(types) == n_vocab
    if n_vocab == 32000:  # a realistic vocabulary size loads through llama.cpp (no abort)
        spec = SyntheticSpec(n_vocab=n_vocab, n_embd=64, n_ff=64, n_head=4, n_head_kv=2)
        build(spec, tmp_path / "m.gguf", tmp_path / "p.gguf")
        model = VisionLanguageModel(tmp_path / "m.gguf", tmp_path / "p.gguf", EngineSettings(n_ctx=256))
        assert model.n_vocab == n_vocab


def test_an_endless_fixture_never_ends_a_greedy_generation(tmp_path, image):
    """``endless = true`` (the interrupt tests' models): every token llama.cpp treats as an
    end of generation, and ``</think>``, has a row that can never win an argmax."""
    from vlmduo.models import fixtures

    def load(endless: bool) -> VisionLanguageModel:
        params = {"family": "qwen3-vl", "variant": "thinking", "seed": 1, "endless": endless}
        paths = tmp_path / f"m{endless}.gguf", tmp_path / f"p{endless}.gguf"
        fixtures.build(params, *paths, name="endless")
        return VisionLanguageModel(*paths, EngineSettings(n_ctx=2048, n_threads=2), name="endless")

    model = load(True)
    endings = {model.token_id("</think>")} | {t for t in range(model.n_vocab) if model.is_eog(t)}
    session = model.session()
    session.prefill(model.render_prompt("Is it a cat?", image=True), image)
    for _ in range(3):  # the ending rows sit below the largest logit at every step
        logits = session.logits()
        assert max(logits[t] for t in endings) < logits.max()
        session.generate(1)
    generation = session.generate(600, stop_tokens=[model.token_id("</think>")])
    assert generation.stop_reason == "length" and not endings & set(generation.tokens)
    model.close()
    # Negative control: the same model without the flag has an ending row above the mean.
    plain = load(False)
    session = plain.session()
    session.prefill(plain.render_prompt("Is it a cat?", image=True), image)
    logits = session.logits()
    regular = [t for t in range(plain.n_vocab) if t not in endings]
    assert max(logits[t] for t in endings) > float(np.mean(logits[regular]))
    plain.close()


# --- sampling: the model cards' samplers, in llama.cpp's chain -------------------------


def _sampled(model, image, sampler, n=24):
    session = model.session()
    session.prefill(model.render_prompt("Describe it.", image=True), image)
    return session.generate(n, sampler=sampler).tokens


def test_a_seeded_sampler_is_reproducible_and_the_seed_matters(small_model, image):
    from vlmduo.engine.sampling import SamplerSettings

    card = SamplerSettings(temperature=1.0, top_p=0.95, top_k=20, min_p=0.0, seed=7)
    first = _sampled(small_model, image, card)
    assert _sampled(small_model, image, card) == first
    assert (
        _sampled(small_model, image, SamplerSettings(temperature=1.0, top_p=0.95, top_k=20, seed=8)) != first
    )


def test_top_k_one_is_greedy_and_temperature_zero_is_greedy(small_model, image):
    from vlmduo.engine.sampling import GREEDY, SamplerSettings

    greedy = _sampled(small_model, image, GREEDY)
    assert _sampled(small_model, image, SamplerSettings(temperature=1.5, top_k=1, seed=3)) == greedy
    assert _sampled(small_model, image, SamplerSettings(temperature=0.0, top_k=50, seed=3)) == greedy
    # Negative control: a hot, wide sampler leaves the greedy path.
    assert (
        _sampled(small_model, image, SamplerSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0))
        != greedy
    )


def test_a_presence_penalty_reaches_llama_cpp(small_model, image):
    from vlmduo.engine.sampling import SamplerSettings

    # Near-greedy (top_k 1 after the penalties): penalties make tokens already generated
    # less attractive, so the same 40 steps repeat fewer tokens than without them.
    def repeats(sampler: SamplerSettings) -> int:
        tokens = _sampled(small_model, image, sampler, n=40)
        return len(tokens) - len(set(tokens))

    plain = repeats(SamplerSettings(temperature=1.0, top_k=1))
    penalised = repeats(SamplerSettings(temperature=1.0, top_k=1, presence_penalty=2.0, repeat_penalty=1.5))
    assert plain > 0 and penalised < plain
