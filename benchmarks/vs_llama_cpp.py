"""vlmduo beside llama.cpp's own tools: start-up, model load, one answer, the whole duo.

Same llama.cpp source (the copy vendored in llama-cpp-python's sdist), same
files, same threads, runs interleaved (order rotated each repetition), medians
with min-max. Build the tools once, outside the repository:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    cmake -S /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build \\
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build /tmp/llama-build -j --target llama-mtmd-cli llama-bench

    pip install .     # the console script, as users run it (no editable-install finder)
    python benchmarks/vs_llama_cpp.py --bin /tmp/llama-build/bin            # all parts
    python benchmarks/vs_llama_cpp.py --bin ... --parts load,e2e --reps 5

Parts:
  startup  ``vlmduo --help`` and ``vlmduo ask --help`` wall time (and bare ``python -c pass``)
  load     model + projector load, in-process clocks: vlmduo's ``VisionLanguageModel``
           against the bare C API (llama_model_load_from_file, llama_init_from_model,
           mtmd_init_from_file), on a file with Qwen's 151,936-token vocabulary
  e2e      a whole ``vlmduo ask --mode large`` process (one image, a one-letter answer)
           against ``llama-mtmd-cli -n 1`` on the same model, projector and image
  duo      a whole ``vlmduo ask`` duo process (policy always: the small model reasons M
           tokens, the large answers, a transfer) against ``llama-mtmd-cli`` with the
           large model generating M tokens (--ignore-eos), beside the two models'
           per-token cost ratio from ``llama-bench -p 0 -n 64``; and beside what any duo
           must do, as llama.cpp's own runs back to back: the large model's image and
           prompt (``llama-mtmd-cli -n 1``) and the small model's M tokens (its own
           ``llama-mtmd-cli -n M``)
Models are Qwen3-VL-shaped random-weight fixtures (F16), built into the vlmduo cache.
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

QWEN = {"family": "qwen3-vl", "n_ff": 1536, "n_head": 8, "n_head_kv": 4, "head_dim": 64}
SHAPES = {
    "vocab151k": {**QWEN, "variant": "instruct", "n_vocab": 151936, "n_embd": 256, "n_layer": 4, "seed": 5},
    "small": {**QWEN, "variant": "thinking", "n_embd": 512, "n_layer": 8, "seed": 1},
    "large": {
        **QWEN,
        "variant": "instruct",
        "n_embd": 1024,
        "n_layer": 16,
        "n_ff": 3072,
        "n_head": 16,
        "n_head_kv": 8,
        "seed": 2,
    },
}
QUESTION = "Which shape is shown? A. circle B. square C. triangle D. star"
LOAD_SNIPPET = """
import sys, time
mode, model, mmproj, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import llama_cpp, llama_cpp.mtmd_cpp as mtmd
if mode == "vlmduo":
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.engine.model import VisionLanguageModel
    t = time.perf_counter()
    VisionLanguageModel(model, mmproj, EngineSettings(n_ctx=4096, n_threads=threads))
else:
    t = time.perf_counter()
    quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it
    llama_cpp.llama_log_set(quiet, None)
    mtmd.mtmd_helper_log_set(quiet, None)
    llama_cpp.llama_backend_init()
    m = llama_cpp.llama_model_load_from_file(model.encode(), llama_cpp.llama_model_default_params())
    p = llama_cpp.llama_context_default_params(); p.n_ctx = 4096; p.n_threads = p.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(m, p)
    mp = mtmd.mtmd_context_params_default(); mp.use_gpu = False; mp.warmup = False; mp.n_threads = threads
    assert mtmd.mtmd_init_from_file(mmproj.encode(), m, mp)
print((time.perf_counter() - t) * 1000.0)
"""


def build(name: str) -> tuple[str, str]:
    from vlmduo.models import synthetic

    model, mmproj = synthetic.ensure_built(f"bench-{name}", SHAPES[name])
    return str(model), str(mmproj)


def image_file() -> str:
    from PIL import Image

    from vlmduo.media.images import synthetic_image

    path = Path("/tmp/vlmduo-bench-image.png")
    img = synthetic_image(640, 480, seed=7)
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(path)
    return str(path)


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return (time.perf_counter() - start) * 1000.0


def interleave(variants: dict[str, object], reps: int) -> dict[str, list[float]]:
    """Run each variant (a zero-argument callable returning ms) ``reps`` times, rotated."""
    names = list(variants)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            out[name].append(variants[name]())  # type: ignore[operator]
    return out


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ms ({min(values):.0f}-{max(values):.0f})"


def ratio(a: list[float], b: list[float]) -> str:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def vlmduo_command() -> list[str]:
    """``vlmduo`` as a user runs it: the console script of this interpreter's environment
    (``pip install .`` makes it; run this with that environment's python), else ``-m``."""
    script = Path(sys.executable).parent / "vlmduo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vlmduo"]


def part_startup(args: argparse.Namespace) -> None:
    py, cli = sys.executable, vlmduo_command()
    runs = interleave(
        {
            "python -c pass": lambda: wall([py, "-c", "pass"]),
            "vlmduo --help": lambda: wall([*cli, "--help"]),
            "vlmduo ask --help": lambda: wall([*cli, "ask", "--help"]),
        },
        args.reps,
    )
    print("startup (wall, whole process)")
    for name, values in runs.items():
        print(f"  {name:<20} {fmt(values)}")


def part_load(args: argparse.Namespace) -> None:
    model, mmproj = build("vocab151k")

    def load(mode: str) -> float:
        cmd = [sys.executable, "-c", LOAD_SNIPPET, mode, model, mmproj, str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])

    runs = interleave({"vlmduo": lambda: load("vlmduo"), "C API": lambda: load("capi")}, args.reps)
    print("load: model + projector (+ one context), in-process clock, 151,936-token vocabulary")
    for name, values in runs.items():
        print(f"  {name:<20} {fmt(values)}")
    print(f"  ratio vlmduo / C API {ratio(runs['vlmduo'], runs['C API'])}")


def vlmduo_ask(model: tuple[str, str], image: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        *vlmduo_command(), "ask", image, QUESTION, "-q", "--no-server", "--no-image-cache",
        "--threads", str(args.threads),
        "--large", model[0], "--large-mmproj", model[1], *extra,
    ]  # fmt: skip


def mtmd_cli(model: tuple[str, str], image: str, args: argparse.Namespace, n: int, *extra: str) -> list[str]:
    """llama-mtmd-cli on the same user text as vlmduo's: the question and the one-line
    answer instruction vlmduo adds (same template, so both prefill the same tokens)."""
    from vlmduo.answers.formats import answer_instruction

    prompt = f"{QUESTION}\n{answer_instruction('choice')}"
    return [
        str(Path(args.bin) / "llama-mtmd-cli"), "-m", model[0], "--mmproj", model[1], "--image", image,
        "-p", prompt, "-n", str(n), "--temp", "0", "-t", str(args.threads), "-c", "4096", *extra,
    ]  # fmt: skip


def part_e2e(args: argparse.Namespace) -> None:
    large, image = build("large"), image_file()
    ours = vlmduo_ask(large, image, args, "--mode", "large", "--max-answer-tokens", "1")
    theirs = mtmd_cli(large, image, args, 1)
    runs = interleave(
        {"vlmduo ask --mode large": lambda: wall(ours), "llama-mtmd-cli -n 1": lambda: wall(theirs)},
        args.reps,
    )
    print("end to end: one image, a one-token answer (wall, whole process)")
    for name, values in runs.items():
        print(f"  {name:<26} {fmt(values)}")
    both = ratio(runs["vlmduo ask --mode large"], runs["llama-mtmd-cli -n 1"])
    print(f"  ratio vlmduo / llama-mtmd-cli {both}")


def token_ms(model: tuple[str, str], args: argparse.Namespace) -> float:
    """llama.cpp's own decode cost per token (llama-bench text generation)."""
    cmd = [str(Path(args.bin) / "llama-bench"), "-m", model[0], "-p", "0", "-n", "64", "-r", "3"]
    out = subprocess.run(
        [*cmd, "-t", str(args.threads), "-o", "json"], check=True, capture_output=True, text=True
    )
    return 1000.0 / json.loads(out.stdout)[0]["avg_ts"]


def part_duo(args: argparse.Namespace) -> None:
    small, large, image = build("small"), build("large"), image_file()
    costs = {"small": token_ms(small, args), "large": token_ms(large, args)}
    cost_ratio = costs["large"] / costs["small"]
    print(
        f"duo: per-token cost (llama-bench tg64) small {costs['small']:.2f} ms, "
        f"large {costs['large']:.2f} ms, ratio {cost_ratio:.1f}x"
    )
    # What no duo can avoid: the large model's image and prompt (llama.cpp's own run with a
    # one-token answer) and the small model's image, prompt and M tokens (its own M-token run).
    answer_only = mtmd_cli(large, image, args, 1)
    for m in args.reasoning:
        ours = vlmduo_ask(large, image, args, "--small", small[0], "--small-mmproj", small[1])
        ours += ["--policy", "always", "--think-budget", str(m), "--ctx", "4096"]
        theirs = mtmd_cli(large, image, args, m, "--ignore-eos")
        small_alone = mtmd_cli(small, image, args, m, "--ignore-eos")
        runs = interleave(
            {
                "duo": lambda ours=ours: wall(ours),
                "mtmd": lambda theirs=theirs: wall(theirs),
                "large -n 1": lambda: wall(answer_only),
                "small": lambda small_alone=small_alone: wall(small_alone),
            },
            args.reps,
        )
        median = {name: statistics.median(values) for name, values in runs.items()}
        floor = median["large -n 1"] + median["small"]
        print(
            f"  M={m:<5} vlmduo duo process {fmt(runs['duo'])}   llama-mtmd-cli large, {m} tokens "
            f"{fmt(runs['mtmd'])}\n"
            f"           speedup {ratio(runs['mtmd'], runs['duo'])}  (target >= {cost_ratio / 2:.1f})\n"
            f"           llama-mtmd-cli's own runs back to back, large -n 1 ({median['large -n 1']:.0f} ms) "
            f"and small -n {m} ({median['small']:.0f} ms): {floor:.0f} ms, a speedup of "
            f"{median['mtmd'] / floor:.2f}; the duo process takes {median['duo'] / floor:.2f}x that"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default=os.environ.get("LLAMA_CPP_BIN", ""), help="llama.cpp's bin folder")
    parser.add_argument("--parts", default="startup,load,e2e,duo")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reasoning", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if {"e2e", "duo"} & set(parts) and not (Path(args.bin) / "llama-mtmd-cli").exists():
        parser.error("--bin must name the folder with llama-mtmd-cli and llama-bench (see --help)")
    print(
        f"vs_llama_cpp: {os.cpu_count()} cores, {args.threads} threads, {args.reps} repetitions, interleaved"
    )
    for part in parts:
        {"startup": part_startup, "load": part_load, "e2e": part_e2e, "duo": part_duo}[part](args)


if __name__ == "__main__":
    main()
