"""Per-stage wall-clock timing, measured around the real llama.cpp calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The per-agent stages of DESIGN.md, in the order they happen.
AGENT_STAGES = ("load", "image", "encode", "prefill", "decode")


@dataclass
class StageTimes:
    """Milliseconds per named stage; stages accumulate when entered twice."""

    ms: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, elapsed_ms: float) -> None:
        """Add ``elapsed_ms`` to ``stage``."""
        self.ms[stage] = self.ms.get(stage, 0.0) + elapsed_ms

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Time the block and add it to ``stage`` (also when the block raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - start) * 1000.0)

    def get(self, stage: str) -> float:
        """Milliseconds spent in ``stage`` so far (0 when never entered)."""
        return self.ms.get(stage, 0.0)

    def as_dict(self, stages: tuple[str, ...] = AGENT_STAGES) -> dict[str, float]:
        """The named stages first (0.0 when absent), then any others, rounded to 0.001 ms."""
        out = {s: round(self.ms.get(s, 0.0), 3) for s in stages}
        out.update({k: round(v, 3) for k, v in self.ms.items() if k not in out})
        return out


def now_ms() -> float:
    """A monotonic clock in milliseconds."""
    return time.perf_counter() * 1000.0
