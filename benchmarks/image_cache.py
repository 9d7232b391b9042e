"""One image, many questions: what a second question about an image costs.

For each model (the heavy-vision Qwen3-VL-shaped test model of busy_machine.py, built
into the vlmduo cache; with ``--real``, Qwen3-VL 2B and 8B at their published shapes and
quantisation, random weights, as ``vlmduo bench --simulate`` builds them): two
``vlmduo ask --mode large --no-server`` processes on one 448x448 image (196 image tokens
at Qwen3-VL's patch and merge) with two different questions, in a fresh
``VLMDUO_CACHE`` each repetition. The large model's encode + prefill (+ the restore, for
the second) of the second process is compared with the first's, and with a second
process run with ``--no-image-cache`` (the control: what it cost before). Also the
size of the state kept on disk per image, and, for the heavy model, a second question
through ``vlmduo serve`` (native endpoint). Medians of ``--reps`` (at least 3),
repetitions interleaved.

    python benchmarks/image_cache.py                       # the heavy test model
    python benchmarks/image_cache.py --real 2b,8b --threads 2
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from busy_machine import LARGE, SMALL, wait_ready  # noqa: E402

QUESTIONS = ("Which shape is shown? A. circle B. square C. triangle", "How many red circles are there?")
REAL = {"2b": "qwen3-vl-2b-instruct", "8b": "qwen3-vl-8b-instruct"}


def image_file(folder: Path) -> Path:
    from PIL import Image

    from vlmduo.media.images import synthetic_image

    img = synthetic_image(448, 448, seed=3)
    path = folder / "photo.png"
    Image.frombytes("RGB", (img.width, img.height), img.rgb).save(path)
    return path


def models(real: list[str]) -> dict[str, tuple[Path, Path]]:
    """Name -> (model, projector) files, built unless cached."""
    from vlmduo import paths
    from vlmduo.models import synthetic
    from vlmduo.study import realsize

    out = {"heavy-vision": synthetic.ensure_built("busy-large", LARGE)}
    for tag in real:
        spec = realsize.ensure_built(REAL[tag], Path(paths.cache_dir()) / "realsize")
        out[REAL[tag]] = (spec.model_path, spec.mmproj_path)
    return out


def ask(files: tuple[Path, Path], image: Path, question: str, cache: str, threads: int, *extra: str) -> dict:
    env = {**os.environ, "VLMDUO_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "vlmduo", "ask", str(image), question, "--mode", "large", "--json",
        "--no-server", "--large", str(files[0]), "--large-mmproj", str(files[1]),
        "--threads", str(threads), "--ctx", "2048", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"ask failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["large"]


def image_cost(large: dict) -> float:
    """What the image and the prompt cost the large model: encode + prefill (+ restore)."""
    t = large["timings_ms"]
    return t["encode"] + t["prefill"] + t.get("restore", 0.0)


def process_runs(files: tuple[Path, Path], image: Path, threads: int) -> dict[str, float]:
    cache = tempfile.mkdtemp(prefix="image-cache-")
    first = ask(files, image, QUESTIONS[0], cache, threads)
    kv = sum(p.stat().st_size for p in Path(cache, "kv").glob("*.kv"))
    second = ask(files, image, QUESTIONS[1], cache, threads)
    control = ask(files, image, QUESTIONS[1], cache, threads, "--no-image-cache")
    assert second["tokens"]["cached"] > 0 and control["tokens"]["cached"] == 0
    return {
        "first: encode + prefill ms": image_cost(first),
        "second: restore + prefill ms": image_cost(second),
        "second, --no-image-cache ms": image_cost(control),
        "second / first": image_cost(second) / image_cost(first),
        "control / first": image_cost(control) / image_cost(first),
        "restored tokens": second["tokens"]["cached"],
        "image tokens": first["tokens"]["image"],
        "disk per image MiB": kv / 2**20,
    }


def serve_runs(image: Path, threads: int) -> dict[str, float]:
    """A first and a second question through ``vlmduo serve`` (native endpoint)."""
    import httpx

    from vlmduo.models import synthetic

    small, large = synthetic.ensure_built("busy-small", SMALL), synthetic.ensure_built("busy-large", LARGE)
    cache = tempfile.mkdtemp(prefix="image-cache-serve-")
    env = {**os.environ, "VLMDUO_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "vlmduo", "serve", "--small", str(small[0]), "--small-mmproj", str(small[1]),
        "--large", str(large[0]), "--large-mmproj", str(large[1]), "--threads", str(threads),
        "--ctx", "2048", "--port", "0",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = wait_ready(server, cache)
        data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        out = []
        for question in QUESTIONS:
            body = {"question": question, "image": data, "options": {"mode": "large"}}
            reply = httpx.post(f"http://127.0.0.1:{record['port']}/api/ask", json=body, timeout=600)
            reply.raise_for_status()
            out.append(image_cost(reply.json()["large"]))
        return {"serve first ms": out[0], "serve second ms": out[1], "serve second / first": out[1] / out[0]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real", default="", help="comma-separated: 2b, 8b")
    parser.add_argument("--no-serve", action="store_true")
    args = parser.parse_args()
    real = [tag for tag in args.real.split(",") if tag]
    files = models(real)
    image = image_file(Path(tempfile.mkdtemp(prefix="image-cache-img-")))
    runs: dict[str, list[dict[str, float]]] = {}
    for rep in range(max(3, args.reps)):
        for name, pair in files.items():
            runs.setdefault(name, []).append(process_runs(pair, image, args.threads))
        if not args.no_serve:
            runs.setdefault("serve", []).append(serve_runs(image, args.threads))
        print(f"repetition {rep + 1} done", file=sys.stderr, flush=True)
    print(f"image_cache: {os.cpu_count()} cores, --threads {args.threads}, medians of {max(3, args.reps)}")
    for name, results in runs.items():
        print(f"\n{name}")
        for key in results[0]:
            value = statistics.median(r[key] for r in results)
            print(f"  {key:32s} {value:10.2f}")


if __name__ == "__main__":
    main()
