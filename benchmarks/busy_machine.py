"""The duo on a busy machine: every stage and whole ask, idle and with the cores taken.

The script makes its own outside load: one busy process per core (``while True:
pass``), started before and killed after each loaded run. Each measurement runs in a
fresh child process (libgomp reads its environment once, when llama.cpp loads), on a
heavy-vision Qwen3-VL-shaped pair built into the vlmduo cache (nothing downloaded), in
three settings:

- ``vlmduo``: what vlmduo does now (each context's threads, and the projector's, fitted
  to the cores other programs leave free; libgomp's default spin);
- ``spin-free``: the configured threads always, ``GOMP_SPINCOUNT=0`` (libgomp parks a
  waiting thread at once: the setting the issue compares against);
- ``before``: the configured threads always, libgomp's default spin (vlmduo 0.1's).

Per setting, load (idle, busy) and threads (1, 2): a duo ask with policy ``always``
(stage 1, each agent's chain, the large model's image encode, the transfer's prefill and
answer decode), a duo ask with policy ``confidence`` at threshold 0 (the large answer
ends it: the small agent's cancel), whole asks of modes small, large and large-think,
concurrent and sequential duo, and a thin C-API loop decoding on the large model with
the same threads (llama_sampler_sample + llama_decode, nothing else). Settings, loads
and repetitions are interleaved; medians of ``--reps`` child processes (at least 3), each
the median of its ``--inner`` runs. ``--serve`` also
starts ``vlmduo serve`` (in each setting) and times requests that alternate between duo,
small and large, idle and busy.

    python benchmarks/busy_machine.py                     # 3 processes x 3 runs
    python benchmarks/busy_machine.py --reps 3 --inner 3 --serve
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "vlmduo": {},
    "spin-free": {"GOMP_SPINCOUNT": "0", "VLMDUO_FIXED_THREADS": "1"},
    "before": {"VLMDUO_FIXED_THREADS": "1"},
}
SMALL = {
    "family": "qwen3-vl",
    "variant": "thinking",
    "n_embd": 256,
    "n_layer": 4,
    "n_ff": 768,
    "n_head": 4,
    "n_head_kv": 2,
    "head_dim": 64,
    "seed": 1,
}
# A heavy vision tower: the image encode costs several times the transfer.
LARGE = {
    "family": "qwen3-vl",
    "variant": "instruct",
    "n_embd": 512,
    "n_layer": 6,
    "n_ff": 1536,
    "n_head": 8,
    "n_head_kv": 4,
    "head_dim": 64,
    "v_embd": 256,
    "v_layer": 8,
    "v_ff": 1024,
    "v_head": 4,
    "seed": 2,
}
QUESTION = "Which shape is shown? A. circle B. square C. triangle"
BUDGET, TRANSFER = 64, 24


def child(n_threads: int, inner: int) -> dict[str, float]:
    """One setting's measurements (the environment is the setting's): each the median of
    ``inner`` runs of the sequence in this process (a stage of a few ms can lose a 10 ms
    time slice to the busy processes once)."""
    runs = [_sequence(n_threads) for _ in range(max(1, inner))]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


_AGENTS: dict[int, tuple] = {}


def _sequence(n_threads: int) -> dict[str, float]:
    """Every measurement once, on the pair loaded once per process."""
    from vlmduo import api
    from vlmduo.duo.pipeline import AskOptions
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.media.images import synthetic_image
    from vlmduo.models import synthetic

    settings = EngineSettings(n_ctx=4096, n_threads=n_threads)
    small_files, large_files = (
        synthetic.ensure_built("busy-small", SMALL),
        synthetic.ensure_built("busy-large", LARGE),
    )
    if n_threads not in _AGENTS:
        _AGENTS[n_threads] = (
            api.load_agent(str(small_files[0]), small_files[1], settings, role="small")[0],
            api.load_agent(str(large_files[0]), large_files[1], settings, role="large")[0],
        )
    small, large = _AGENTS[n_threads]
    image = synthetic_image(224, 224, seed=3)
    out: dict[str, float] = {}

    def ask(tag: str, **options: object) -> dict:
        options.setdefault("temperature", 0.0)
        options.setdefault("think_budget", BUDGET)
        options.setdefault("image_cache", False)  # every ask encodes its image (it is timed)
        start = time.perf_counter()
        result = api.answer(image, QUESTION, AskOptions(**options), small=small, large=large).to_json()
        out[f"{tag} wall"] = (time.perf_counter() - start) * 1000.0
        return result

    ask("warm-up", policy="always", transfer_budget=TRANSFER)
    for sequential in (False, True):
        tag = "duo seq" if sequential else "duo"
        r = ask(tag, policy="always", transfer_budget=TRANSFER, sequential=sequential)
        t = r["timings_ms"]
        out[f"{tag} stage 1"] = t["stage1"]
        out[f"{tag} transfer prefill"] = t["transfer_prefill"]
        out[f"{tag} answer decode"] = t["answer_decode"]
        out[f"{tag} large encode"] = r["large"]["timings_ms"]["encode"]
        out[f"{tag} large chain"] = sum(
            r["large"]["timings_ms"][k] for k in ("image", "encode", "prefill", "decode")
        )
        out[f"{tag} small chain"] = sum(
            r["small"]["timings_ms"][k] for k in ("image", "encode", "prefill", "decode")
        )
    r = ask("duo confident", policy="confidence", confidence_threshold=0.0)
    out["duo confident large chain"] = sum(
        r["large"]["timings_ms"][k] for k in ("image", "encode", "prefill", "decode")
    )
    for mode in ("small", "large", "large-think"):
        ask(mode, mode=mode)
    out["thin decode ms/token"] = thin_decode(large, 32)
    return out


def thin_decode(agent: object, n: int) -> float:
    """ms per token of the minimal C loop on the agent's context (its threads as they are)."""
    import llama_cpp

    context = agent.context  # type: ignore[attr-defined]
    context.session().prefill(agent.model.render_prompt("Describe it.", image=False))  # type: ignore[attr-defined]
    context.fit()
    sampler = llama_cpp.llama_sampler_init_greedy()
    buf = (llama_cpp.llama_token * 1)()
    batch = llama_cpp.llama_batch_get_one(buf, 1)
    start = time.perf_counter()
    for _ in range(n):
        buf[0] = llama_cpp.llama_sampler_sample(sampler, context._ctx, -1)
        llama_cpp.llama_decode(context._ctx, batch)
    llama_cpp.llama_sampler_free(sampler)
    return (time.perf_counter() - start) * 1000.0 / n


def run_child(setting: str, n_threads: int, inner: int) -> dict[str, float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "VLMDUO_FIXED_THREADS")
    }
    env.update(SETTINGS[setting])
    cmd = [sys.executable, __file__, "--child", str(n_threads), "--inner", str(inner)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"{setting} {n_threads}t failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Busy:
    """One busy process per core for the block (the outside load)."""

    def __enter__(self) -> Busy:
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)
        ]
        time.sleep(0.5)  # running before the measurement starts
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def serve_runs(setting: str, loaded: bool, n_requests: int) -> dict[str, list[float]]:
    """Wall ms of native requests to a ``vlmduo serve`` of the pair, alternating modes."""
    import base64
    import io
    import tempfile

    import httpx
    from PIL import Image

    from vlmduo.media.images import synthetic_image
    from vlmduo.models import synthetic

    small_files, large_files = (
        synthetic.ensure_built("busy-small", SMALL),
        synthetic.ensure_built("busy-large", LARGE),
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "VLMDUO_FIXED_THREADS")
    }
    env.update(SETTINGS[setting])
    cache = tempfile.mkdtemp(prefix="busy-serve-")
    env["VLMDUO_CACHE"] = cache
    models = [
        "--small",
        str(small_files[0]),
        "--small-mmproj",
        str(small_files[1]),
        "--large",
        str(large_files[0]),
        "--large-mmproj",
        str(large_files[1]),
    ]
    server = subprocess.Popen(
        [sys.executable, "-m", "vlmduo", "serve", *models, "--threads", "2", "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{wait_ready(server, cache)['port']}/api/ask"
        img = synthetic_image(224, 224, seed=3)
        buffer = io.BytesIO()
        Image.frombytes("RGB", (img.width, img.height), img.rgb).save(buffer, "PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        times: dict[str, list[float]] = {}
        modes = ("duo", "small", "large")

        def request(mode: str) -> float:
            body = {
                "question": QUESTION,
                "image": image,
                "options": {"mode": mode, "think_budget": BUDGET, "temperature": 0.0, "image_cache": False},
            }
            start = time.perf_counter()
            httpx.post(url, json=body, timeout=300).raise_for_status()
            return (time.perf_counter() - start) * 1000.0

        request("duo")  # warm-up
        with Busy() if loaded else _nothing():
            for i in range(n_requests):
                mode = modes[i % len(modes)]
                times.setdefault(f"serve {mode}", []).append(request(mode))
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_ready(server: subprocess.Popen, cache: str) -> dict:
    """The record of the ``vlmduo serve`` started with ``VLMDUO_CACHE=cache``, once ready."""
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
        for path in Path(cache, "run").glob("*.json") if Path(cache, "run").is_dir() else []:
            data = json.loads(path.read_text() or "{}")
            if data.get("state") == "ready":
                return data
        time.sleep(0.1)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--serve", action="store_true", help="also time a vlmduo serve under load")
    parser.add_argument("--inner", type=int, default=3, help="runs per child process (median)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.inner)))
        return
    names = list(SETTINGS)
    results: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for rep in range(args.reps):
        for load in ("idle", "busy"):
            with Busy() if load == "busy" else _nothing():
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for setting in order:
                    for n in args.threads:
                        for key, value in run_child(setting, n, args.inner).items():
                            results.setdefault((setting, load, n), {}).setdefault(key, []).append(value)
        if args.serve:
            for load in ("idle", "busy"):
                for setting in names[rep % len(names) :] + names[: rep % len(names)]:
                    for key, values in serve_runs(setting, load == "busy", 9).items():
                        results.setdefault((setting, load, 2), {}).setdefault(key, []).extend(values)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    report(results, args.threads, args.reps)


def report(results: dict, thread_counts: list[int], reps: int) -> None:
    cores = os.cpu_count()
    names = list(SETTINGS)
    print(f"busy_machine: {cores} cores; busy = one 'while True: pass' process per core")
    print(f"medians of {reps} child processes, each the median of its runs (--inner)")
    keys = sorted({k for d in results.values() for k in d if not k.startswith("warm-up")})
    for load in ("idle", "busy"):
        for n in thread_counts:
            got = {s: results.get((s, load, n), {}) for s in names}
            med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in got.items()}
            print(f"\n{load}, {n} thread(s): ms, and in brackets vlmduo's ratio to spin-free / to before")
            print(f"  {'':30}" + "".join(f"{s:>11}" for s in names) + "   ratios")
            for key in keys:
                if any(key not in med[s] for s in names):
                    continue
                cells = "".join(f"{med[s][key]:11.1f}" for s in names)
                ours = med["vlmduo"][key]
                ratios = f"{ours / med['spin-free'][key]:5.2f} / {ours / med['before'][key]:4.2f}"
                print(f"  {key:30}{cells}   {ratios}")
            ours = med["vlmduo"]
            if "duo transfer prefill" in ours:
                transfer = ours["duo transfer prefill"] + ours["duo answer decode"]
                print(f"  transfer / image encode (vlmduo): {transfer / ours['duo large encode']:.2f}")
                print(f"  duo / duo --sequential (vlmduo): {ours['duo wall'] / ours['duo seq wall']:.2f}")
            if n == 1:
                # One thread runs no OpenMP team: spin-free and before do the same work, so
                # their ratios show how far this machine moves a figure by itself.
                same = sorted(
                    med["spin-free"][k] / med["before"][k]
                    for k in keys
                    if k in med["spin-free"] and k in med["before"]
                )
                if same:
                    print(
                        f"  noise (1 thread: spin-free / before, the same work): "
                        f"{same[0]:.2f} to {same[-1]:.2f}, median {statistics.median(same):.2f}"
                    )


if __name__ == "__main__":
    main()
