"""Soak: many asks in one process through the Python API, faults mixed in.

On the synthetic pair (Qwen3-VL-shaped, built locally), N asks cycle through
modes, policies and selectors, with failing inputs (an empty question, a
context too small for the prompt, a prompt longer than the context) and
cancellations (an outside cancel set part way). It prints resident memory,
open file descriptors and threads at the start, after a warm-up and at the
end, and checks every answer is well-formed (a letter for a choice question;
failures are the expected one-line errors).

    python benchmarks/soak.py            # 500 asks
    python benchmarks/soak.py --asks 100
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlmduo import api  # noqa: E402
from vlmduo.duo.pipeline import AskOptions  # noqa: E402
from vlmduo.engine.settings import EngineSettings  # noqa: E402
from vlmduo.errors import Cancelled, ContextOverflowError, UsageError  # noqa: E402
from vlmduo.media.images import synthetic_image  # noqa: E402

CHOICE = "Which shape is shown? A. circle B. square C. triangle D. star"
CONFIGS = [
    AskOptions(mode="duo", policy="verify", think_budget=24),
    AskOptions(mode="duo", policy="always", selector="surprisal", think_budget=24),
    AskOptions(mode="duo", policy="confidence", confidence_threshold=0.5, think_budget=24),
    AskOptions(mode="duo", policy="always", sequential=True, selector="tail", think_budget=24),
    AskOptions(mode="small", think_budget=24),
    AskOptions(mode="large"),
    AskOptions(mode="large-think", think_budget=16),
]
FAULTS = ("empty", "overflow", "cancel")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def snapshot(label: str) -> tuple[float, int, int]:
    values = (rss_mb(), n_fds(), threading.active_count())
    print(f"  {label:<10} rss {values[0]:7.1f} MB  fds {values[1]:3d}  threads {values[2]:2d}")
    return values


def one_ask(i: int, small, large) -> str:
    """Run ask ``i``; returns its outcome label (or raises on a malformed outcome)."""
    image = synthetic_image(64 + 8 * (i % 5), 48 + 8 * (i % 3), seed=i)
    fault = FAULTS[i % 10] if i % 10 < len(FAULTS) else None
    options = CONFIGS[i % len(CONFIGS)]
    question = CHOICE
    cancel = threading.Event()
    if fault == "empty":
        question = "   "
    elif fault == "overflow":
        question = CHOICE + " Explain." * 900  # longer than the 2048-token context
    elif fault == "cancel":
        options = AskOptions(mode="duo", policy="always", think_budget=1500)
        threading.Timer(0.05, cancel.set).start()
    try:
        result = api.answer(image, question, options, small=small, large=large, cancel=cancel)
    except UsageError:
        assert fault == "empty", f"ask {i}: unexpected usage error"
        return "usage-error"
    except ContextOverflowError:
        assert fault == "overflow", f"ask {i}: unexpected overflow"
        return "overflow"
    except Cancelled:
        assert fault == "cancel", f"ask {i}: unexpected cancel"
        return "cancelled"
    assert result.answer in {"A", "B", "C", "D"}, f"ask {i}: answer {result.answer!r}"
    return f"{result.mode}:{result.route}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    settings = EngineSettings(n_ctx=2048)
    print(f"soak: {args.asks} asks on the synthetic pair, {os.cpu_count()} cores")
    snapshot("start")
    small, _ = api.load_agent("synthetic-small", settings=settings, role="small")
    large, _ = api.load_agent("synthetic-large", settings=settings, role="large")
    counts: dict[str, int] = {}
    start = time.monotonic()
    base = None
    for i in itertools.count():
        if i == args.warmup:
            base = snapshot("warm")
        if i == args.asks:
            break
        outcome = one_ask(i, small, large)
        counts[outcome] = counts.get(outcome, 0) + 1
    time.sleep(0.2)  # let cancelled workers and timers finish
    end = snapshot("end")
    assert base is not None
    print(f"  {args.asks} asks in {time.monotonic() - start:.1f} s; outcomes: {dict(sorted(counts.items()))}")
    print(
        f"  after warm-up: rss {end[0] - base[0]:+.1f} MB, fds {end[1] - base[1]:+d}, "
        f"threads {end[2] - base[2]:+d} (limit: rss < 50 MB, no fd or thread growth)"
    )


if __name__ == "__main__":
    main()
