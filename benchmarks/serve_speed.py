"""Keeping the models warm: ``vlmduo ask`` against a server, in one process, and cold.

Part 1, speed, on the synthetic pair (built locally, no download), same image,
question and threads everywhere:
- cold: a whole ``vlmduo ask --no-server`` process (start, load both models, answer);
- in one process: 20 asks through ``vlmduo.api`` after one load (the floor);
- warm server: 20 sequential ``vlmduo ask`` processes answered by ``vlmduo serve``.
Targets (issue 11): warm-server total <= 1.3x the in-process total, and each
warm-server ask at least 3x faster than a cold one.

Part 2, load: 200 mixed requests to the server (OpenAI chat completions, streams,
native asks, malformed JSON, unknown models, non-images, oversized images, client
disconnects in the middle of an ask, bursts beyond the queue), then the server must
still answer; its resident memory after the first 20 requests and at the end
(target: grown by less than 50 MB).

    pip install . && python benchmarks/serve_speed.py   # both parts, as installed
    python benchmarks/serve_speed.py --asks 20 --requests 200 --threads 2

Runs with its own VLMDUO_CACHE (a temporary directory, or --cache), so it never
meets a server of yours.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "Which shape is shown? A. circle B. square C. triangle D. star"


def command() -> list[str]:
    """``vlmduo`` as a user runs it: the console script of this interpreter's environment
    (``pip install .`` makes it; run this with that environment's python), else ``-m``."""
    script = Path(sys.executable).parent / "vlmduo"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vlmduo"]


def vlmduo(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *args], env=env, capture_output=True, timeout=timeout, cwd=ROOT)


def timed(*args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    out = vlmduo(*args, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"vlmduo {' '.join(args)} failed:\n{out.stderr.decode()}")
    return seconds


def write_image(folder: Path, width: int, height: int, seed: int) -> Path:
    from PIL import Image

    from vlmduo.media.images import synthetic_image

    img = synthetic_image(width, height, seed=seed)
    path = folder / f"img-{width}x{height}-{seed}.png"
    Image.frombytes("RGB", (width, height), img.rgb).save(path)
    return path


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# -- part 1 --------------------------------------------------------------------
def in_process(image: Path, asks: int, think_budget: int, threads: int | None) -> tuple[float, list[float]]:
    """Load once, then ``asks`` answers in this process; (load s, per-ask s)."""
    from vlmduo import api
    from vlmduo.cli import options as opt
    from vlmduo.duo.pipeline import AskOptions

    options = AskOptions(think_budget=think_budget, image_cache=False)
    settings = opt.engine_settings(
        options,
        ctx=4096,
        threads=threads,
        n_gpu_layers=-1,
        verbose=False,
        image_max_tokens=image_cap(think_budget),
        image_min_tokens=None,
    )
    refs = opt.model_refs("synthetic", None, None, None, None)
    start = time.perf_counter()
    resolved = {role: api.resolve(*refs[role]) for role in ("small", "large")}
    agents, _ = api.load_agents(resolved, settings)
    load_s = time.perf_counter() - start
    times = []
    for _ in range(asks):
        t0 = time.perf_counter()
        api.answer(str(image), QUESTION, options, small=agents["small"], large=agents["large"])
        times.append(time.perf_counter() - t0)
    for model in {id(a.model): a.model for a in agents.values()}.values():
        api.unload(model)
    return load_s, times


def image_cap(think_budget: int) -> int:
    """One image cap for server, asks and this process (it follows the budgets otherwise)."""
    from vlmduo.duo.pipeline import AskOptions

    return AskOptions(think_budget=think_budget).image_token_budget(4096)


def part1(env: dict[str, str], image: Path, asks: int, think_budget: int, threads: int | None) -> None:
    engine = ["--image-max-tokens", str(image_cap(think_budget))]
    engine += ["--threads", str(threads)] if threads else []
    ask = ["ask", str(image), QUESTION, "--pair", "synthetic", "--think-budget", str(think_budget), *engine]
    ask += ["--no-image-cache"]  # every ask pays for its image, as before the cache
    interpreter = statistics.median(timed_cmd([sys.executable, "-c", "pass"], env) for _ in range(5))
    cli_start = statistics.median(timed("--help", env=env) for _ in range(5))
    cold = [timed(*ask, "--no-server", env=env) for _ in range(3)]
    load_s, inproc = in_process(image, asks, think_budget, threads)
    serve = ["serve", "--pair", "synthetic", "--port", "0", "--detach", "--cache-images", "0", *engine]
    url = vlmduo(*serve, env=env).stdout.decode()
    server_ms: list[float] = []
    try:
        warmup = vlmduo(*ask, env=env)
        assert b"answered by vlmduo serve" in warmup.stderr, warmup.stderr.decode()
        served = []
        for _ in range(asks):
            start = time.perf_counter()
            out = vlmduo(*ask, "--json", env=env)
            served.append(time.perf_counter() - start)
            server_ms.append(json.loads(out.stdout)["timings_ms"]["total"])
        check = vlmduo(*ask, env=env)
        assert b"answered by vlmduo serve" in check.stderr
    finally:
        vlmduo("stop", env=env)
    cold_s = statistics.median(cold)
    per_served = sum(served) / len(served)
    ratio = sum(served) / sum(inproc)
    speedup = cold_s / per_served
    colds = ", ".join(f"{c:.2f}" for c in cold)
    rows = [
        ("cold `vlmduo ask --no-server` process, median of 3", f"{cold_s:7.2f} s  ({colds})"),
        ("in one process: load once", f"{load_s:7.2f} s"),
        (f"in one process: {asks} asks", f"{sum(inproc):7.2f} s  ({sum(inproc) / asks:.3f} s each)"),
        (f"warm server: {asks} `vlmduo ask` processes", f"{sum(served):7.2f} s  ({per_served:.3f} s each)"),
        ("  of which the server's ask (median)", f"{statistics.median(server_ms) / 1000:7.3f} s"),
        ("  of which the CLI's start (`vlmduo --help`, median)", f"{cli_start:7.3f} s"),
        ("    of which the interpreter's start (median)", f"{interpreter:7.3f} s"),
        (
            "warm server / in one process",
            f"{ratio:7.2f}x  (target <= 1.3x: {'met' if ratio <= 1.3 else 'MISSED'})",
        ),
        ("cold / warm-server ask", f"{speedup:7.2f}x  (target >= 3x: {'met' if speedup >= 3 else 'MISSED'})"),
    ]
    print(f"server {url.strip()}  (--think-budget {think_budget} {' '.join(engine)})")
    for label, value in rows:
        print(f"  {label:<52} {value}")


def timed_cmd(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, check=True)
    return time.perf_counter() - start


# -- part 2 --------------------------------------------------------------------
KINDS = (
    "chat",
    "stream",
    "native",
    "malformed",
    "unknown-model",
    "not-an-image",
    "oversized",
    "disconnect",
    "stream-disconnect",
    "burst",
)


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    from vlmduo.media.images import synthetic_image

    img = synthetic_image(width, height, seed=seed)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), img.rgb).save(out, format="PNG")
    return out.getvalue()


def _chat(image: bytes, model: str = "synthetic:duo", **extra) -> dict:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": uri}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def one_request(http, i: int, kind: str, big: bytes) -> list[str]:
    """Send request ``i`` of ``kind``; the outcomes (status codes or 'disconnected')."""
    import httpx

    image = _png(64 + 8 * (i % 5), 48 + 8 * (i % 3), seed=i)
    mode = ("synthetic:duo", "synthetic:large", "synthetic:small")[i % 3]
    if kind == "chat":
        return [str(http.post("/v1/chat/completions", json=_chat(image, mode)).status_code)]
    if kind == "stream":
        with http.stream("POST", "/v1/chat/completions", json=_chat(image, mode, stream=True)) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]", events[-3:]
            return [str(response.status_code)]
    if kind == "native":
        body = {"question": QUESTION, "image": "data:image/png;base64," + base64.b64encode(image).decode()}
        return [str(http.post("/api/ask", json=body).status_code)]
    if kind == "malformed":
        return [
            str(
                http.post("/v1/chat/completions", content=b'{"model": "synthetic", "messages": [').status_code
            )
        ]
    if kind == "unknown-model":
        return [str(http.post("/v1/chat/completions", json=_chat(image, "gpt-4o")).status_code)]
    if kind == "not-an-image":
        return [
            str(http.post("/v1/chat/completions", json=_chat(b"GIF89a... not an image" * 10)).status_code)
        ]
    if kind == "oversized":
        return [str(http.post("/v1/chat/completions", json=_chat(big)).status_code)]
    if kind == "disconnect":  # a long reasoning, abandoned after 0.3 s
        body = _chat(image, "synthetic:small", vlmduo={"think_budget": 2000})
        try:
            http.post("/v1/chat/completions", json=body, timeout=0.3)
            return ["200"]
        except httpx.TimeoutException:
            return ["disconnected"]
    if kind == "stream-disconnect":
        body = _chat(image, "synthetic:small", stream=True, vlmduo={"think_budget": 2000})
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 6:
                    break
        return ["disconnected"]
    # burst: more at once than the queue holds
    codes: list[str] = []

    def send() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=300, trust_env=False) as own:
            codes.append(
                str(own.post("/v1/chat/completions", json=_chat(image, "synthetic:large")).status_code)
            )

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return codes


def part2(env: dict[str, str], requests: int, engine_args: list[str]) -> None:
    import httpx

    args = [
        "serve",
        "--pair",
        "synthetic",
        "--port",
        "0",
        "--detach",
        "--max-queue",
        "2",
        "--max-image-mb",
        "1",
    ]
    url = vlmduo(*args, *engine_args, env=env).stdout.decode().strip()
    record = json.loads(next((Path(env["VLMDUO_CACHE"]) / "run").glob("*.json")).read_text())
    pid = record["pid"]
    big = _png(1400, 1200, seed=99)  # 2.2 MiB of PNG (noise): over the 1 MiB cap
    outcomes: Counter[str] = Counter()
    rss: dict[str, float] = {"start": rss_mb(pid)}
    start = time.perf_counter()
    try:
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as http:
            for i in range(requests):
                kind = KINDS[i % len(KINDS)]
                for code in one_request(http, i, kind, big):
                    outcomes[f"{kind} {code}"] += 1
                if i + 1 == 20:
                    rss["after 20"] = rss_mb(pid)
            rss["end"] = rss_mb(pid)
            final = http.post("/v1/chat/completions", json=_chat(_png(96, 72, 1))).json()
            status = http.get("/api/status").json()
    finally:
        vlmduo("stop", env=env)
    seconds = time.perf_counter() - start
    print(f"{requests} mixed requests in {seconds:.1f} s to {url} (--max-queue 2 --max-image-mb 1)")
    for key in sorted(outcomes):
        print(f"  {key:<28} {outcomes[key]:4d}")
    print(f"  afterwards: answer {final['choices'][0]['message']['content']!r}, {status['asks']} asks run")
    grown = rss["end"] - rss["after 20"]
    verdict = "met" if grown < 50 else "MISSED"
    print(
        f"  server RSS: start {rss['start']:.1f} MB, after 20 {rss['after 20']:.1f} MB, "
        f"end {rss['end']:.1f} MB: grown {grown:+.1f} MB (target < 50 MB: {verdict})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--asks", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="engine threads everywhere (default: all)")
    parser.add_argument(
        "--think-budget", type=int, default=256, help="the asks' reasoning budget in part 1 (default 256)"
    )
    parser.add_argument("--cache", help="VLMDUO_CACHE to use (default: a temporary directory)")
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    args = parser.parse_args()
    engine_args = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="vlmduo-serve-bench-") as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        env = dict(os.environ, VLMDUO_CACHE=cache, VLMDUO_HOME=str(Path(tmp) / "home"), NO_COLOR="1")
        env.pop("VLMDUO_NO_SERVER", None)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        os.environ["VLMDUO_CACHE"] = cache  # this process builds and loads the same synthetic files
        image = write_image(Path(tmp), 96, 72, seed=3)
        vlmduo("ask", str(image), QUESTION, "--pair", "synthetic", "--no-server", "-q", env=env)  # build once
        print(f"vlmduo serve benchmark · {os.cpu_count()} cores · load average {os.getloadavg()[0]:.1f}")
        if args.part in ("1", "both"):
            part1(env, image, args.asks, args.think_budget, args.threads)
        if args.part in ("2", "both"):
            part2(env, args.requests, engine_args)


if __name__ == "__main__":
    main()
