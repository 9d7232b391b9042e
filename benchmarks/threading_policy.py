"""Threading policies for llama.cpp's OpenMP thread teams, measured side by side.

libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when llama.cpp's
library loads, so every policy runs in a fresh child process with that
environment. Each child measures, on Qwen3-VL-shaped fixtures (built into the
vlmduo cache, nothing downloaded):

* ``decode``: tokens/s of a thin C-API loop (greedy sampler + one
  ``llama_decode`` per token, through llama-cpp-python's bindings) and of
  vlmduo's ``Session.stream``, same model, context and prompt, at each thread
  count; interleaved inside the child.
* ``duo``: stage 1 of a duo ask (policy always), the two agents concurrent (the
  cores split between them) and sequential.

The parent interleaves policies and repetitions (order rotated) and prints
medians with their min-max. Policies: libgomp's default (spin a while, then
sleep), ``PASSIVE`` (sleep at once: what vlmduo 0.1 set for every process at
import), and ``GOMP_SPINCOUNT=10000`` (a short spin).

llama.cpp's own thread pool: run this script with the python of an environment
whose llama-cpp-python is built without OpenMP (``CMAKE_ARGS=-DGGML_OPENMP=OFF
pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python``);
the policy rows are then all the same pool. On 2 cores its decode was as close
to the thin loop as OpenMP's, and its duo stage 1 was 6x slower concurrent and
28x slower sequential (a pool made per graph, whose barrier spins).

    python benchmarks/threading_policy.py                 # 3 repetitions
    python benchmarks/threading_policy.py --reps 5 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

POLICIES = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "SPIN=10000": {"GOMP_SPINCOUNT": "10000"},
}
SMALL = {"family": "qwen3-vl", "variant": "thinking", "n_embd": 128, "n_layer": 2, "seed": 1}
LARGE = {
    "family": "qwen3-vl",
    "variant": "instruct",
    "n_embd": 512,
    "n_layer": 8,
    "n_ff": 1536,
    "n_head": 8,
    "n_head_kv": 4,
    "head_dim": 64,
    "seed": 2,
}
QUESTION = "Is there a cat in the picture?"


def _model(name: str, params: dict, n_threads: int):
    from vlmduo.engine.model import VisionLanguageModel
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.models import synthetic

    model, mmproj = synthetic.ensure_built(name, params)
    return VisionLanguageModel(model, mmproj, EngineSettings(n_ctx=2048, n_threads=n_threads), name=name)


def thin_loop(context, n_tokens: int) -> float:
    """Tokens/s of the minimal loop a C program would run (end-of-generation ignored)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_greedy()
    buf = (llama_cpp.llama_token * 1)()
    batch = llama_cpp.llama_batch_get_one(buf, 1)
    start = time.perf_counter()
    try:
        for _ in range(n_tokens):
            buf[0] = llama_cpp.llama_sampler_sample(sampler, context._ctx, -1)
            if llama_cpp.llama_decode(context._ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return n_tokens / (time.perf_counter() - start)


def child_decode(n_tokens: int, threads: list[int]) -> dict:
    """Thin loop vs vlmduo stream, per thread count, three interleaved runs each."""
    from vlmduo.media.images import synthetic_image

    model = _model("bench-large", LARGE, max(threads))
    image = synthetic_image(128, 96, seed=3)
    prompt = model.render_prompt(QUESTION, image=True)
    out: dict[str, list[float]] = {}
    for n in threads:
        context = model.default_context
        with context.threads(n):
            for _ in range(3):
                session = context.session()
                session.prefill(prompt, image)
                base = session.n_past
                out.setdefault(f"thin_{n}t", []).append(thin_loop(context, n_tokens))
                session = context.session()  # the thin loop moved the KV cache on
                session.prefill(prompt, image)
                assert session.n_past == base
                start = time.perf_counter()
                generated = len([e for e in session.stream(n_tokens)])
                tps = generated / (time.perf_counter() - start)
                out.setdefault(f"vlmduo_{n}t", []).append(tps)
    return {k: statistics.median(v) for k, v in out.items()}


def child_duo(budget: int) -> dict:
    """Stage 1 of a duo ask, concurrent and sequential, three interleaved runs each."""
    from vlmduo.agents.local import Agent
    from vlmduo.duo.pipeline import AskOptions, ask, make_question
    from vlmduo.media.images import synthetic_image

    cores = os.cpu_count() or 1
    small = Agent(_model("bench-small", SMALL, cores), thinking=True)
    large = Agent(_model("bench-large", LARGE, cores))
    question = make_question(QUESTION, synthetic_image(128, 96, seed=3), "auto")
    out: dict[str, list[float]] = {}
    for _ in range(3):
        for sequential in (False, True):
            options = AskOptions(
                policy="always", think_budget=budget, sequential=sequential, image_cache=False
            )
            result = ask(question, options, small=small, large=large)
            key = "seq" if sequential else "conc"
            out.setdefault(f"stage1_{key}", []).append(result.timings_ms["stage1"])
            out.setdefault(f"total_{key}", []).append(result.timings_ms["total"])
            assert result.small is not None
            out.setdefault(f"reason_{key}", []).append(result.small.tokens["generated"])
    return {k: statistics.median(v) for k, v in out.items()}


def run_child(kind: str, policy: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(args.tokens)]
    cmd += ["--budget", str(args.budget), "--threads", *map(str, args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=128, help="the small agent's reasoning tokens")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--child", choices=("decode", "duo"))
    args = parser.parse_args()
    if args.child == "decode":
        print(json.dumps(child_decode(args.tokens, args.threads)))
        return
    if args.child == "duo":
        print(json.dumps(child_duo(args.budget)))
        return
    names = list(POLICIES)
    results: dict[str, dict[str, list[float]]] = {p: {} for p in names}
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for policy in order:
            for kind in ("decode", "duo"):
                for key, value in run_child(kind, policy, args).items():
                    results[policy].setdefault(key, []).append(value)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    print(f"threading_policy: {os.cpu_count()} cores, {args.reps} reps (each a median of 3), decode of")
    print(
        f"{args.tokens} tokens on a Qwen3-VL-shaped 512x8 F16 fixture; duo small 128x2, budget {args.budget}"
    )
    print("tokens/s (median, min-max)        ratio vlmduo/thin")
    for policy in names:
        r = results[policy]
        for n in args.threads:
            thin, ours = r[f"thin_{n}t"], r[f"vlmduo_{n}t"]
            ratios = [a / b for a, b in zip(ours, thin, strict=True)]
            print(
                f"  {policy:<11} {n}t  thin {_fmt(thin)}  vlmduo {_fmt(ours)}  "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            )
    print("duo stage 1 ms (median, min-max)")
    for policy in names:
        r = results[policy]
        conc, seq = r["stage1_conc"], r["stage1_seq"]
        ratio = statistics.median(s / c for s, c in zip(seq, conc, strict=True))
        print(f"  {policy:<11} concurrent {_fmt(conc)}  sequential {_fmt(seq)}  seq/conc {ratio:.2f}")


if __name__ == "__main__":
    main()
