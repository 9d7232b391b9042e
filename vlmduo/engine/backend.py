"""llama.cpp's backend in this process: started once, what it was built with.

``init`` starts the backend (and vlmduo's log callback) once per process;
``gpu_offload_supported``, ``backend_name`` and ``threading_policy`` say what the
build can do and how its threads wait, for the engine and for ``vlmduo doctor``.
"""

from __future__ import annotations

import os
import threading

from vlmduo.engine import logs, threads

_backend_lock = threading.Lock()
_backend_ready = False
# The accelerators llama.cpp names in its system info line.
GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL")


def init(verbose: bool) -> None:
    global _backend_ready
    import llama_cpp

    logs.install(verbose)
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build can offload layers to a GPU (CUDA, Metal, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def backend_name(system_info: str) -> str:
    """The accelerator llama.cpp was built with, from its system info line."""
    found = [name for name in GPU_BACKENDS if f"{name} :" in system_info or f"{name}:" in system_info]
    return " + ".join(found) if found else "CPU"


def threading_policy(
    system_info: str, environ: dict[str, str] | None = None, settings: dict[str, str] | None = None
) -> str:
    """How llama.cpp's threads wait and share the cores, in one line: libgomp's spin count
    in force (``settings``, from ``threads.openmp_settings``) and who chose it, and how
    the threads follow the load (``vlmduo.engine.threads``)."""
    env = os.environ if environ is None else environ
    cores = threads.available_cores()
    fixed = threads.fixed_by_environment(env)
    share = f"up to {cores} threads, fewer while other programs keep cores busy"
    if fixed:
        share = f"{cores} threads whatever the load (VLMDUO_FIXED_THREADS)"
    if "OPENMP = 1" not in system_info:
        return f"ggml thread pool (no OpenMP); {share}"
    policy = env.get("OMP_WAIT_POLICY")
    if policy:
        return f"OpenMP: OMP_WAIT_POLICY={policy} (yours); {share}"
    chosen = "yours" if "GOMP_SPINCOUNT" in env else "libgomp's default"
    spin = (settings or {}).get("GOMP_SPINCOUNT") or env.get("GOMP_SPINCOUNT", "300000")
    # While busy, libgomp's throttled spin (threads.ShortSpin): 100 turns, or fewer if set so.
    short = "" if fixed or not spin.isdigit() else f", {min(100, int(spin))} while busy"
    return f"OpenMP: GOMP_SPINCOUNT={spin} ({chosen}{short}); {share}"
