"""The few llama.cpp knobs vlmduo exposes, in one frozen object (a model cache key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmduo.engine.threads import available_cores, fixed_by_environment


@dataclass(frozen=True)
class EngineSettings:
    """How to run a model; the few llama.cpp knobs vlmduo exposes."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None  # None: all cores
    # Fewer threads when other programs keep cores busy (vlmduo.engine.threads);
    # VLMDUO_FIXED_THREADS=1 keeps the configured count whatever the load.
    adapt_threads: bool = field(default_factory=lambda: not fixed_by_environment())
    n_gpu_layers: int = -1  # -1: every layer when a GPU backend is built in
    verbose: bool = False
    # libmtmd's bounds on one image's tokens (dynamic-resolution projectors
    # such as Qwen-VL's); -1 keeps the projector's own defaults.
    image_min_tokens: int = -1
    image_max_tokens: int = -1

    def threads(self) -> int:
        """Threads for llama.cpp: the setting, else every core."""
        return self.n_threads or available_cores()
