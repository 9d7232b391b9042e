"""Speed of the duo pipeline on a synthetic small/large pair (issue 3, "Speed").

The pair is built into the vlmduo cache with ``vlmduo.models.synthetic.ensure_built``
(nothing is downloaded): small n_embd=256 n_layer=4, large n_embd=1024 n_layer=8,
same vocabulary, so the large model costs many times more per token.

What is measured, each repetition interleaving every variant (medians reported;
on a shared, noisy machine compare the ratios, not absolute times):

* Per-token costs of each model, through the engine, with every core (the
  threads the pipeline gives the transfer step and ``large-think``): prefill =
  time of ``Session.append`` of a ~64-token text after the cached image+question
  prompt, divided by its tokens; decode = ``Session.stream`` of 64 tokens,
  divided by 64. Timed as the pipeline times its own stages (``Session.times``
  around the llama.cpp calls, ``Generation.decode_ms``). Decode is also
  measured with one thread, the small agent's share of a 2-core machine when
  both agents run at once.
* (a) The transfer step of ``duo`` with policy ``always`` (every question goes
  through the transfer): measured ``transfer_prefill + answer_decode`` (from
  ``AskResult.timings_ms``) divided by the prediction ``prefill_tokens x large
  prefill/token + answer_tokens x large decode/token``. ``prefill_tokens`` is
  ``result.transferred["prefill_tokens"]`` (the selected reasoning plus the cue,
  all the large model prefilled). ``answer_tokens`` is the number of tokens the
  large model generated (each one ``llama_decode``) in the transfer step:
  ``result.transferred["answer_tokens"]`` where the pipeline reports it,
  checked against a count of the ``progress`` callbacks of phase ``"transfer"``
  (one per streamed token); that count alone where the key is absent. The
  large model's prefill and decode costs of the prediction are measured right
  after each ask (as above, 16 decoded tokens), so that machine noise hits both
  sides alike. Target <= 1.2.
* (b) ``duo`` (concurrent stage 1) wall time (``timings_ms["total"]``; no load
  time is passed in, so total is the wall time of stage 1 + selection +
  transfer) against ``large-think`` with the same ``think_budget`` (the large
  model reasons the same number of tokens itself), next to the per-token
  decode cost ratio large/small. Both agents' reasoning lengths are printed:
  the question is chosen so that neither stops before the budget. With two or
  more budgets, straight lines through the smallest and largest project the
  speedup to longer reasoning (labelled as a projection, not a measurement).
* (c) Stage 1 concurrent vs ``--sequential`` (``AskOptions.sequential``):
  ``timings_ms["stage1"]`` and total, with ``os.cpu_count()`` and the threads
  each agent gets (concurrent: half the cores each; sequential: all of them).

Run from the repository root:

    python benchmarks/duo_speed.py                 # defaults: 5 repetitions, budgets 64 and 256
    python benchmarks/duo_speed.py --reps 3 --budgets 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmduo import api  # noqa: E402
from vlmduo.agents.base import Question
from vlmduo.agents.local import Agent  # noqa: E402
from vlmduo.duo.pipeline import AskOptions, AskResult, ask, make_question  # noqa: E402
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.settings import EngineSettings  # noqa: E402
from vlmduo.media.images import LoadedImage, synthetic_image  # noqa: E402
from vlmduo.models import synthetic

# Same vocabulary for both (synthetic.vocabulary() repeats pieces past index
# 2294, which llama.cpp refuses, so 2048 rather than a real model's 32k+).
SMALL = {"n_vocab": 2048, "n_embd": 256, "n_layer": 4, "n_ff": 704, "n_head": 4, "n_head_kv": 2, "seed": 1}
LARGE = {"n_vocab": 2048, "n_embd": 1024, "n_layer": 8, "n_ff": 2816, "n_head": 16, "n_head_kv": 8, "seed": 2}
QUESTIONS = (
    "Which vehicle is left of the tree? A. car B. bus C. bike D. truck",
    "What color is the largest object? A. red B. blue C. green D. white",
    "Where is the dog? A. on the table B. under the chair C. next to the car D. in the water",
    "How many people are there in the picture? A. one B. two C. three D. four",
)
FILLER = "the red car is left of the blue bus and two people stand next to the green tree "
N_PER_TOKEN = 64  # tokens decoded (and at least as many appended) to measure per-token costs


@dataclass
class Samples:
    """Named lists of per-repetition values."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        """Record one value under ``key``."""
        self.values.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        """Median of ``key``'s values."""
        return statistics.median(self.values[key])

    def span(self, key: str) -> str:
        """``min..max`` of ``key``'s values."""
        vals = self.values[key]
        return f"{min(vals):.2f}..{max(vals):.2f}"


def per_token_costs(
    model: VisionLanguageModel, question: Question, n_decode: int = N_PER_TOKEN
) -> tuple[float, float, int]:
    """(prefill ms/token, decode ms/token, tokens prefilled) after the image+question prompt."""
    session = model.session()
    session.prefill(model.render_prompt(question.text, image=True), question.image)
    text = FILLER
    while model.count_tokens(text) < N_PER_TOKEN:
        text += FILLER
    n = session.append(text, stage="bench_prefill")
    prefill = session.times.get("bench_prefill") / n
    gen = session.generate(n_decode)
    decode = gen.decode_ms / max(1, len(gen.tokens))
    return prefill, decode, n


class TransferCounter:
    """A ``progress`` callback counting the large agent's tokens in the transfer step."""

    def __init__(self, large_name: str) -> None:
        self.large_name = large_name
        self.tokens = 0

    def __call__(self, agent: str, phase: str, count: int) -> None:
        if agent == self.large_name and phase == "transfer":
            self.tokens = max(self.tokens, count)


def run_duo(
    question: Question, small: Agent, large: Agent, budget: int, sequential: bool
) -> tuple[AskResult, int]:
    """One ``duo`` ask with policy ``always``; returns it and the transfer step's answer tokens."""
    counter = TransferCounter(large.name)
    options = AskOptions(
        mode="duo", policy="always", think_budget=budget, sequential=sequential, image_cache=False
    )
    result = ask(question, options, small=small, large=large, progress=counter)
    if result.route != "transfer" or result.transferred is None:
        raise RuntimeError(f"expected route transfer, got {result.route}")
    reported = result.transferred.get("answer_tokens")
    if reported is not None and reported != counter.tokens:
        raise RuntimeError(f"answer tokens: pipeline reports {reported}, progress counted {counter.tokens}")
    return result, counter.tokens


def run_large_think(question: Question, large: Agent, budget: int) -> AskResult:
    """One ``large-think`` ask: the large model reasons ``budget`` tokens itself."""
    return ask(question, AskOptions(mode="large-think", think_budget=budget, image_cache=False), large=large)


def chain_ms(timings: dict[str, float]) -> float:
    """An agent's own stage-1 work: image + encode + prefill + decode."""
    return sum(timings.get(stage, 0.0) for stage in ("image", "encode", "prefill", "decode"))


def reasoning_tokens(result: AskResult, which: str) -> int:
    """Tokens an agent reasoned (its recorded reasoning pieces)."""
    agent = result.small if which == "small" else result.large
    return len(agent.reasoning_pieces) if agent is not None else 0


def pick_question(image: LoadedImage, small: Agent, large: Agent, budget: int) -> Question:
    """The first question after which both agents reason the whole budget (no early EOG)."""
    for text in QUESTIONS:
        q = make_question(text, image, "auto")
        duo, _ = run_duo(q, small, large, budget, sequential=False)
        think = run_large_think(q, large, budget)
        if reasoning_tokens(duo, "small") == budget and reasoning_tokens(think, "large") == budget:
            return q
    print("warning: no question keeps both agents reasoning the whole budget", file=sys.stderr)
    return make_question(QUESTIONS[0], image, "auto")


def load(label: str, params: dict[str, int], settings: EngineSettings) -> Agent:
    """Build (once, into the cache) and load one synthetic model as an agent."""
    model_path, mmproj_path = synthetic.ensure_built(f"bench-duo-{label}", params)
    model, _ = api.load_model(api.ResolvedModel(f"bench-{label}", model_path, mmproj_path), settings)
    return Agent(model)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the interleaved repetitions, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of every variant")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[64, 256], help="think budgets (tokens) to compare"
    )
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    budgets: list[int] = args.budgets
    settings = EngineSettings(n_ctx=2048)
    small = load("small", SMALL, settings)
    large = load("large", LARGE, settings)
    image = synthetic_image(96, 72, seed=3)

    print("duo_speed: duo pipeline on a synthetic pair (policy always, selector steps, transfer budget 64)")
    print(
        f"os.cpu_count()={cores}; stage 1 threads per agent: concurrent {max(1, cores // 2)}, "
        f"sequential {cores}; transfer step, large-think and per-token costs: {cores}"
    )
    for label, spec in (("small", SMALL), ("large", LARGE)):
        s = synthetic.SyntheticSpec.from_params(spec)
        print(f"  {label}: n_vocab={s.n_vocab} n_embd={s.n_embd} n_layer={s.n_layer} n_ff={s.n_ff}")
    question = pick_question(image, small, large, max(budgets))
    print(f"question ({question.fmt}): {question.text!r}; image 96x72 synthetic; {args.reps} repetitions")

    samples = Samples()

    def costs() -> None:
        for agent, label in ((small, "small"), (large, "large")):
            with agent.model.default_context.threads(1):
                samples.add(f"{label}_decode_1t", per_token_costs(agent.model, question)[1])
            prefill, decode, n = per_token_costs(agent.model, question)
            samples.add(f"{label}_prefill", prefill)
            samples.add(f"{label}_decode", decode)
            samples.add(f"{label}_prefill_n", n)

    def duo(budget: int, sequential: bool) -> Callable[[], None]:
        def go() -> None:
            result, answer_tokens = run_duo(question, small, large, budget, sequential)
            tag = f"{'seq' if sequential else 'conc'}{budget}"
            t = result.timings_ms
            assert result.transferred is not None
            samples.add(f"{tag}_total", t["total"])
            samples.add(f"{tag}_stage1", t["stage1"])
            samples.add(f"{tag}_after", t["select"] + t["transfer_prefill"] + t["answer_decode"])
            samples.add(f"{tag}_critical", t["critical_path"])
            samples.add(f"{tag}_reason", reasoning_tokens(result, "small"))
            if not sequential:
                assert result.small is not None and result.large is not None
                samples.add(f"{tag}_small_chain", chain_ms(result.small.timings_ms))
                samples.add(f"{tag}_large_chain", chain_ms(result.large.timings_ms))
                # The prediction's costs, measured right after the ask (same threads),
                # so that machine noise hits measurement and prediction alike.
                prefill, decode, _ = per_token_costs(large.model, question, n_decode=16)
                n_prefill = result.transferred["prefill_tokens"]
                samples.add("answer_reported", float("answer_tokens" in result.transferred))
                measured = t["transfer_prefill"] + t["answer_decode"]
                predicted = n_prefill * prefill + answer_tokens * decode
                for key, value in (
                    ("prefill_ms", t["transfer_prefill"]),
                    ("decode_ms", t["answer_decode"]),
                    ("prefill_n", n_prefill),
                    ("answer_n", answer_tokens),
                    ("measured", measured),
                    ("predicted", predicted),
                    ("ratio", measured / predicted),
                ):
                    samples.add(f"xfer{budget}_{key}", value)

        return go

    def think(budget: int) -> Callable[[], None]:
        def go() -> None:
            result = run_large_think(question, large, budget)
            samples.add(f"think{budget}_total", result.timings_ms["total"])
            samples.add(f"think{budget}_reason", reasoning_tokens(result, "large"))

        return go

    variants: list[Callable[[], None]] = [costs]
    for budget in budgets:
        variants += [duo(budget, False), duo(budget, True), think(budget)]
    start = time.perf_counter()
    for rep in range(args.reps):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant()
    elapsed = time.perf_counter() - start
    report(samples, budgets, cores, elapsed)


def report(samples: Samples, budgets: list[int], cores: int, elapsed: float) -> None:
    """Print the three tables."""
    m = samples.med
    print("\nper-token costs (ms/token, median over repetitions)")
    print(
        f"  {'model':<7}{f'prefill {cores}t':>12}{'(tokens)':>10}{f'decode {cores}t':>11}"
        f"{'decode range':>15}{'decode 1t':>11}{'decode range':>15}"
    )
    for label in ("small", "large"):
        print(
            f"  {label:<7}{m(f'{label}_prefill'):>12.3f}{m(f'{label}_prefill_n'):>10.0f}"
            f"{m(f'{label}_decode'):>11.3f}{samples.span(f'{label}_decode'):>15}"
            f"{m(f'{label}_decode_1t'):>11.3f}{samples.span(f'{label}_decode_1t'):>15}"
        )
    decode_ratio = m("large_decode") / m("small_decode")
    decode_ratio_1t = m("large_decode_1t") / m("small_decode_1t")
    prefill_ratio = m("large_prefill") / m("small_prefill")
    print(
        f"  cost ratio large/small: decode {decode_ratio:.1f}x ({cores} threads), "
        f"{decode_ratio_1t:.1f}x (1 thread); prefill {prefill_ratio:.1f}x ({cores} threads)"
    )

    print("\n(a) transfer step vs prediction (duo, policy always, concurrent stage 1); target <= 1.2")
    print(
        f"  {'budget':>6}{'prefill tok':>12}{'answer tok':>11}{'prefill ms':>11}{'decode ms':>10}"
        f"{'measured':>10}{'predicted':>10}{'ratio':>7}{'ratio range':>14}"
    )
    for b in budgets:
        print(
            f"  {b:>6}{m(f'xfer{b}_prefill_n'):>12.0f}{m(f'xfer{b}_answer_n'):>11.0f}"
            f"{m(f'xfer{b}_prefill_ms'):>11.2f}{m(f'xfer{b}_decode_ms'):>10.2f}"
            f"{m(f'xfer{b}_measured'):>10.2f}{m(f'xfer{b}_predicted'):>10.2f}"
            f"{m(f'xfer{b}_ratio'):>7.2f}{samples.span(f'xfer{b}_ratio'):>14}"
        )
    source = (
        'result.transferred["answer_tokens"],\n   equal to the progress count in every ask'
        if min(samples.values["answer_reported"]) == 1.0
        else "counted from the progress callback"
    )
    print(
        f"  (prefill tok: result.transferred['prefill_tokens']; answer tok: {source};\n"
        "   each ask's prediction uses the large model's prefill and decode costs measured right after it;\n"
        "   ratio: median of the per-ask ratios measured/predicted)"
    )

    print("\n(b) duo vs large-think, same reasoning length (wall ms, median)")
    print(
        f"  {'budget':>6}{'reasoned s/l':>13}{'duo ms':>9}{'stage1':>8}{'small':>7}{'large':>7}{'after':>7}"
        f"{'large-think ms':>15}{'speedup':>9}{'cost ratio':>15}"
    )
    for b in budgets:
        speedup = m(f"think{b}_total") / m(f"conc{b}_total")
        reasoned = f"{m(f'conc{b}_reason'):.0f}/{m(f'think{b}_reason'):.0f}"
        print(
            f"  {b:>6}{reasoned:>13}{m(f'conc{b}_total'):>9.1f}{m(f'conc{b}_stage1'):>8.1f}"
            f"{m(f'conc{b}_small_chain'):>7.1f}{m(f'conc{b}_large_chain'):>7.1f}"
            f"{m(f'conc{b}_after'):>7.1f}{m(f'think{b}_total'):>15.1f}{speedup:>8.1f}x"
            f"{f'{decode_ratio_1t:.1f}x / {decode_ratio:.1f}x':>15}"
        )
    print(
        "  (reasoned s/l: tokens the small agent (duo) / the large agent (large-think) reasoned;\n"
        "   duo = stage1 + after (select + transfer prefill + answer decode); small, large: each agent's\n"
        "   own stage-1 work (image+encode+prefill+decode), run at once on 1 thread each;\n"
        "   speedup = large-think / duo wall time; cost ratio = large/small decode per token,\n"
        f"   1 thread / {cores} threads)"
    )
    if len(budgets) >= 2:
        project(samples, min(budgets), max(budgets))

    print(f"\n(c) stage 1 concurrent vs sequential, os.cpu_count()={cores} (wall ms, median)")
    print(
        f"  {'budget':>6}{'conc stage1':>12}{'seq stage1':>11}{'seq/conc':>9}"
        f"{'conc total':>11}{'seq total':>10}{'critical path':>14}"
    )
    for b in budgets:
        print(
            f"  {b:>6}{m(f'conc{b}_stage1'):>12.1f}{m(f'seq{b}_stage1'):>11.1f}"
            f"{m(f'seq{b}_stage1') / m(f'conc{b}_stage1'):>9.2f}"
            f"{m(f'conc{b}_total'):>11.1f}{m(f'seq{b}_total'):>10.1f}{m(f'conc{b}_critical'):>14.1f}"
        )
    print("  (seq/conc > 1: running the agents at once is faster; critical path = perfect-overlap bound)")
    print(f"\nmeasured part took {elapsed:.0f} s")


def project(samples: Samples, lo: int, hi: int) -> None:
    """Extrapolate (b) to longer reasoning from straight lines through the two budgets.

    Per reasoning token, large-think costs the slope of its wall time; duo's small
    agent the slope of its own stage-1 work (measured while the large one ran
    beside it). Duo = max(small's work, large's stage-1 work) + the transfer step.
    """
    m = samples.med
    think_slope = (m(f"think{hi}_total") - m(f"think{lo}_total")) / (hi - lo)
    think_fixed = m(f"think{hi}_total") - hi * think_slope
    small_slope = (m(f"conc{hi}_small_chain") - m(f"conc{lo}_small_chain")) / (hi - lo)
    small_fixed = m(f"conc{hi}_small_chain") - hi * small_slope
    large_chain = m(f"conc{hi}_large_chain")
    # Everything in duo's wall time beyond the longer stage-1 chain (mostly the transfer step).
    rest = m(f"conc{hi}_total") - max(m(f"conc{hi}_small_chain"), large_chain)
    if small_slope <= 0 or think_slope <= 0:
        return
    parts = []
    for budget in (1024, 4096, 16384):
        duo = max(small_fixed + budget * small_slope, large_chain) + rest
        parts.append(f"{budget}: {(think_fixed + budget * think_slope) / duo:.1f}x")
    crossover = (large_chain - small_fixed) / small_slope
    print(
        f"  projection (a model, not a measurement; lines through budgets {lo} and {hi}):\n"
        f"   per reasoning token large-think {think_slope:.2f} ms, duo's small agent {small_slope:.3f} ms;\n"
        f"   the large agent's stage 1 ({large_chain:.0f} ms) is duo's critical path up to ~{crossover:.0f} "
        f"reasoning tokens;\n   projected speedup at budget {', '.join(parts)}; "
        f"limit {think_slope / small_slope:.1f}x"
    )


if __name__ == "__main__":
    main()
