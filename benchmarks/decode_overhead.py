"""Decode overhead of vlmduo's engine vs llama-cpp-python's bare low-level loop (issue 2, "Speed").

What is measured, on synthetic GGUF models built into the vlmduo cache
(``vlmduo.models.synthetic.ensure_built``, nothing is downloaded):

* ``baseline``: the minimal loop a C program would run, written against
  llama-cpp-python's low-level bindings: ``llama_sampler_sample`` with a greedy
  sampler, then ``llama_decode`` of a one-token ``llama_batch_get_one`` batch,
  N times. It ignores end-of-generation tokens, so it always runs exactly N.
* ``vlmduo``: ``Session.stream(max_tokens=N)``, greedy, ``logprobs=False``
  (the default), its events collected in a list.
* ``vlmduo+logprobs``: the same with ``logprobs=True`` (what the reasoning and
  answer streams of the pipeline use: one log-softmax over the vocabulary per
  token).

All three decode N tokens after the same cached prompt prefix, in the same
llama.cpp context (same model, threads, KV cache), so only the Python layer
differs. ``Session.stream`` stops at an end-of-generation token; the script
picks a prompt after which greedy decoding emits none within N tokens and
checks that every variant generated exactly N tokens (and the same ones).

The variants are interleaved (A/B/C, the order rotated every repetition) and
repeated; the table reports median tokens/s and, as the ratio, the median of
the per-repetition ratios vlmduo/baseline (robust to a noisy, shared machine:
compare ratios, not absolute times). Each loop also reads the clock once per
token (both loops alike), which gives a second, burst-insensitive estimate:
1 / the median time between consecutive tokens.

Two model sizes: a tiny one (``SyntheticSpec`` defaults), where the per-token
overhead shows most, and a larger one. By default llama.cpp runs one thread:
that is the tiny model's fastest setting (so the Python layer's share is the
largest: the strictest test) and the steadiest on a shared machine, where
multi-threaded decode of a tiny model swings several-fold with the neighbours'
load as llama.cpp's threads wait for each other. The tiny model is also run with
all cores (vlmduo's default setting). ``--threads`` changes the one-thread runs.

Last, it shows that a second ``ask`` in the same process pays no model load:
``vlmduo.api.load_model`` twice on the same ``ResolvedModel`` (the second call
returns the cached model and 0.0 ms), and two ``ask`` calls fed those load times.

Run from the repository root:

    python benchmarks/decode_overhead.py              # defaults: N=256, 30 / 5 repetitions
    python benchmarks/decode_overhead.py --tokens 128 --reps 9 --reps-larger 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmduo import api  # noqa: E402
from vlmduo.agents.local import Agent  # noqa: E402
from vlmduo.duo.pipeline import AskOptions, ask, make_question  # noqa: E402
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.session import Session
from vlmduo.engine.settings import EngineSettings  # noqa: E402
from vlmduo.media.images import synthetic_image  # noqa: E402
from vlmduo.models import synthetic

# Tiny: SyntheticSpec defaults. Larger: 1024 wide, 8 layers. synthetic.vocabulary()
# has duplicate pieces past index 2294 (llama.cpp aborts on such a vocabulary), so
# the larger model uses n_vocab=2048 rather than a realistic 32000.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    "larger": {"n_vocab": 2048, "n_embd": 1024, "n_layer": 8, "n_ff": 2816, "n_head": 16, "n_head_kv": 8},
}
QUESTION = "What is in the picture? Describe the objects and count them."
# Text appended after the cached prompt before each run (it also recomputes the
# last logits); the first one after which greedy decoding runs N tokens is used.
SUFFIXES = ("", " The", " There are", " I see", " First,", " In the image", " Let me count")
VARIANTS = ("baseline", "vlmduo", "vlmduo+logprobs")


@dataclass
class Runs:
    """Per variant, one value per repetition: tokens/s over the whole run (``tps``),
    tokens/s from the median gap between tokens (``gap_tps``), tokens generated."""

    tps: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    gap_tps: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    counts: dict[str, set[int]] = field(default_factory=lambda: {v: set() for v in VARIANTS})


def baseline_decode(model: VisionLanguageModel, n_tokens: int, stamps: list[float]) -> list[int]:
    """llama-cpp-python's minimal loop: greedy sample, decode one token, N times (EOG ignored).

    ``stamps`` gets a ``perf_counter`` reading per token, as the vlmduo loop below does.
    """
    import llama_cpp

    ctx = model.default_context._ctx
    sample = llama_cpp.llama_sampler_sample
    decode = llama_cpp.llama_decode
    clock = time.perf_counter
    sampler = llama_cpp.llama_sampler_init_greedy()
    buf = (llama_cpp.llama_token * 1)()
    batch = llama_cpp.llama_batch_get_one(buf, 1)  # positions follow the KV cache
    tokens: list[int] = []
    try:
        for _ in range(n_tokens):
            token = sample(sampler, ctx, -1)
            tokens.append(token)
            buf[0] = token
            if decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            stamps.append(clock())
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return tokens


def vlmduo_decode(session: Session, n_tokens: int, logprobs: bool, stamps: list[float]) -> list[int]:
    """vlmduo's streaming decode (``Session.stream``), one ``perf_counter`` reading per token."""
    clock = time.perf_counter
    tokens: list[int] = []
    for event in session.stream(n_tokens, logprobs=logprobs):
        tokens.append(event.token)
        stamps.append(clock())
    return tokens


def make_runner(
    model: VisionLanguageModel, session: Session, base: int, suffix: str, n_tokens: int
) -> Callable[[str], tuple[float, list[int], float]]:
    """A function that resets the KV cache to the prompt, then times one variant.

    It returns the run's wall time (s), its tokens, and its median time between
    consecutive tokens (s), an estimate that bursts of noise barely move.
    """

    def run(variant: str) -> tuple[float, list[int], float]:
        session.rewind(base)
        session.append(suffix or "\n", stage="setup")  # fresh logits for the first sample
        stamps: list[float] = []
        start = time.perf_counter()
        if variant == "baseline":
            tokens = baseline_decode(model, n_tokens, stamps)
        else:
            tokens = vlmduo_decode(session, n_tokens, variant == "vlmduo+logprobs", stamps)
        elapsed = time.perf_counter() - start
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        return elapsed, tokens, statistics.median(gaps) if gaps else elapsed

    return run


def count_eog(model: VisionLanguageModel, tokens: list[int]) -> int:
    """How many end-of-generation tokens a (baseline) run produced."""
    import llama_cpp

    return sum(1 for t in tokens if llama_cpp.llama_vocab_is_eog(model._vocab, t))


def bench_model(label: str, model: VisionLanguageModel, n_tokens: int, reps: int) -> tuple[Runs, str, bool]:
    """Interleave the variants ``reps`` times on ``model``; returns runs, suffix used, tokens identical."""
    session = model.session()
    session.prefill(model.render_prompt(QUESTION, image=False), reserve=n_tokens + 16)
    base = session.n_past
    chosen = None
    for suffix in SUFFIXES:
        run = make_runner(model, session, base, suffix, n_tokens)
        toks = run("vlmduo")[1]
        if len(toks) == n_tokens:
            chosen = suffix
            break
    if chosen is None:
        print(f"[{label}] no prompt found that decodes {n_tokens} tokens without EOG", file=sys.stderr)
        chosen = SUFFIXES[0]
    run = make_runner(model, session, base, chosen, n_tokens)
    reference: dict[str, list[int]] = {}
    for variant in VARIANTS:  # warm-up, and the token sequences to compare
        reference[variant] = run(variant)[1]
    identical = all(reference[v] == reference["baseline"] for v in VARIANTS)
    if count_eog(model, reference["baseline"]):
        print(f"[{label}] warning: the baseline generated an EOG token", file=sys.stderr)
    runs = Runs()
    for i in range(reps):
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        for variant in order:
            elapsed, tokens, gap = run(variant)
            runs.tps[variant].append(len(tokens) / elapsed)
            runs.gap_tps[variant].append(1.0 / gap)
            runs.counts[variant].add(len(tokens))
    return runs, chosen, identical


def _paired(values: list[float], base: list[float]) -> float:
    """Median of the per-repetition ratios values/base."""
    return statistics.median(a / b for a, b in zip(values, base, strict=True))


def print_table(label: str, params: dict[str, int], runs: Runs, suffix: str, identical: bool) -> None:
    """One block of the results table for a model."""
    spec = synthetic.SyntheticSpec.from_params(params)
    shape = f"n_vocab={spec.n_vocab} n_embd={spec.n_embd} n_layer={spec.n_layer} n_ff={spec.n_ff}"
    base, gap_base = runs.tps["baseline"], runs.gap_tps["baseline"]
    print(f"\nmodel {label}: {shape}")
    print(f"  prompt suffix {suffix!r}; {len(base)} repetitions per variant, interleaved")
    print(f"  generated tokens identical across variants: {'yes' if identical else 'NO'}")
    print(
        f"  {'variant':<16}{'tokens':>7}{'median tok/s':>13}{'min':>9}{'max':>9}{'ratio':>7}"
        f"{'+us/tok':>9} | {'gap tok/s':>10}{'ratio':>7}"
    )
    for variant in VARIANTS:
        tps, gap = runs.tps[variant], runs.gap_tps[variant]
        counts = ",".join(str(c) for c in sorted(runs.counts[variant]))
        ratio = _paired(tps, base)
        extra_us = (1.0 / ratio - 1.0) / statistics.median(base) * 1e6
        print(
            f"  {variant:<16}{counts:>7}{statistics.median(tps):>13.1f}{min(tps):>9.1f}{max(tps):>9.1f}"
            f"{ratio:>7.3f}{extra_us:>+9.1f} | "
            f"{statistics.median(gap):>10.1f}{_paired(gap, gap_base):>7.3f}"
        )
    lp = _paired(runs.tps["vlmduo+logprobs"], runs.tps["vlmduo"])
    lp_gap = _paired(runs.gap_tps["vlmduo+logprobs"], runs.gap_tps["vlmduo"])
    print(f"  logprobs=True / logprobs=False throughput: {lp:.3f} (gap-based {lp_gap:.3f})")


def load(label: str, params: dict[str, int], settings: EngineSettings) -> tuple[api.ResolvedModel, float]:
    """Build (once, into the cache) and load a synthetic model through the API's model cache."""
    model_path, mmproj_path = synthetic.ensure_built(f"bench-decode-{label}", params)
    resolved = api.ResolvedModel(f"bench-{label}", model_path, mmproj_path)
    _, load_ms = api.load_model(resolved, settings)
    return resolved, load_ms


def second_ask_check(resolved: api.ResolvedModel, settings: EngineSettings, first_ms: float) -> None:
    """Load the same model again and run two asks: the second pays no load."""
    model, second_ms = api.load_model(resolved, settings)
    again, _ = api.load_model(resolved, settings)
    print("\nsecond ask in the same process (vlmduo.api.load_model on the same ResolvedModel):")
    print(f"  first load_model:  {first_ms:9.3f} ms")
    print(f"  second load_model: {second_ms:9.3f} ms   (same object: {'yes' if model is again else 'no'})")
    agent = Agent(model)
    question = make_question("Is there a red car? yes or no", synthetic_image(96, 72, seed=3), "yesno")
    options = AskOptions(mode="large", max_answer_tokens=4, image_cache=False)
    for i, load_ms in enumerate((first_ms, second_ms), start=1):
        result = ask(question, options, large=agent, load_ms={agent.name: load_ms})
        assert result.large is not None
        print(
            f"  ask #{i} (mode large): timings_ms load={result.large.timings_ms['load']:.3f} "
            f"total={result.timings_ms['total']:.3f} critical_path={result.timings_ms['critical_path']:.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded per run (N)")
    parser.add_argument("--reps", type=int, default=30, help="repetitions per variant, tiny model")
    parser.add_argument("--reps-larger", type=int, default=5, help="repetitions per variant, larger model")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the main runs")
    args = parser.parse_args(argv)

    import llama_cpp

    n_ctx = max(1024, args.tokens + 256)
    cores = os.cpu_count() or 1
    # (shape, threads, repetitions): None threads = all cores, vlmduo's default.
    configs = [
        ("tiny", args.threads, args.reps),
        ("tiny", None, args.reps),
        ("larger", args.threads, args.reps_larger),
    ]
    print("decode_overhead: vlmduo Session.stream vs llama-cpp-python low-level loop")
    print(
        f"llama-cpp-python {llama_cpp.__version__}; os.cpu_count()={cores}; "
        f"N={args.tokens} tokens per run; greedy; same llama.cpp context for all variants"
    )
    print(
        "columns: tokens = tokens generated per run; median/min/max tok/s over whole runs; "
        "ratio = median of per-repetition\n  ratios variant/baseline; +us/tok = extra time per token "
        "vs baseline implied by that ratio; gap tok/s = 1 / median\n  time between consecutive tokens "
        "within a run (insensitive to bursts of machine noise), with its ratio"
    )
    first: tuple[api.ResolvedModel, EngineSettings, float] | None = None
    for label, threads, reps in configs:
        settings = EngineSettings(n_ctx=n_ctx, n_threads=threads)
        resolved, load_ms = load(label, SHAPES[label], settings)
        if first is None:
            first = (resolved, settings, load_ms)
        model, _ = api.load_model(resolved, settings)
        runs, suffix, identical = bench_model(label, model, args.tokens, reps)
        print_table(f"{label}, {settings.threads()} thread(s)", SHAPES[label], runs, suffix, identical)
    assert first is not None
    second_ask_check(*first)


if __name__ == "__main__":
    main()
