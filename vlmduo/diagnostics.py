"""What ``vlmduo doctor`` checks: versions, backend, caches, and a self-test.

The self-test runs the whole duo pipeline (both agents, a transfer) on
synthetic random-weight models built locally, so it works offline and proves
the engine, the projector path and the KV reuse all work on this machine.
Models of the chosen pair that are served remotely get their endpoint checked:
reachable, the model listed, an image accepted.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vlmduo import __version__

PACKAGES = ("llama-cpp-python", "gguf", "huggingface-hub", "typer", "rich", "pillow", "numpy", "httpx")
GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL")


@dataclass
class Report:
    """Everything doctor found; ``ok`` is False when the self-test failed."""

    versions: dict[str, str]
    backend: str
    gpu_offload: bool
    system_info: str
    paths: dict[str, str]
    offline: bool
    threading: str = ""
    self_test: dict[str, Any] = field(default_factory=dict)
    endpoints: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the self-test passed (or was skipped) and every endpoint checked out."""
        return self.self_test.get("ok", True) and all(e.get("ok") for e in self.endpoints)

    def to_json(self) -> dict[str, Any]:
        """The ``doctor --json`` object."""
        return {
            "ok": self.ok,
            "versions": self.versions,
            "backend": self.backend,
            "gpu_offload": self.gpu_offload,
            "system_info": self.system_info,
            "paths": self.paths,
            "offline": self.offline,
            "threading": self.threading,
            "self_test": self.self_test,
            "endpoints": self.endpoints,
        }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def backend_name(system_info: str) -> str:
    """The accelerator llama.cpp was built with, from its system info line."""
    found = [name for name in GPU_BACKENDS if f"{name} :" in system_info or f"{name}:" in system_info]
    return " + ".join(found) if found else "CPU"


def threading_policy(system_info: str, environ: dict[str, str] | None = None) -> str:
    """How llama.cpp's threads wait and share the cores, in one line.

    vlmduo leaves the OpenMP wait policy to libgomp's default (spin briefly,
    then sleep): measured by benchmarks/threading_policy.py, PASSIVE cost
    multi-threaded decode 40-65%, and the concurrent duo does not collapse
    because the two agents split the cores instead of oversubscribing them.
    """
    env = os.environ if environ is None else environ
    cores = os.cpu_count() or 1
    split = f"duo splits the {cores} cores {max(1, cores // 2)}+{max(1, cores // 2)} while both agents run"
    if "OPENMP = 1" not in system_info:
        return f"ggml thread pool (no OpenMP); {split}"
    policy = env.get("OMP_WAIT_POLICY")
    spin = env.get("GOMP_SPINCOUNT")
    waits = f"OMP_WAIT_POLICY={policy} (yours)" if policy else "libgomp default waits (spin, then sleep)"
    if spin:
        waits += f", GOMP_SPINCOUNT={spin} (yours)"
    return f"OpenMP: {waits}; {split}"


def collect(self_test: bool = True, refs: dict[str, str] | None = None) -> Report:
    """Gather the report; with ``self_test`` also run the pipeline on synthetic models.

    ``refs`` (role -> model reference, the chosen pair's) names the models whose
    servers are checked when they are remote.
    """
    import llama_cpp

    from vlmduo import hub, synthetic
    from vlmduo.engine import gpu_offload_supported

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    versions = {"vlmduo": __version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in PACKAGES})
    report = Report(
        versions=versions,
        backend=backend_name(info),
        gpu_offload=gpu_offload_supported(),
        system_info=info,
        paths=_paths(synthetic.cache_root()),
        offline=hub.offline_mode(),
        threading=threading_policy(info),
    )
    if self_test:
        report.self_test = run_self_test()
    report.endpoints = check_endpoints(refs or {})
    return report


def check_endpoints(refs: dict[str, str]) -> list[dict[str, Any]]:
    """For each remote model among ``refs`` (``URL#MODEL`` or a registry entry with
    ``endpoint``): reachable, the model listed, vision accepted. Local models are skipped."""
    from vlmduo import registry, remote
    from vlmduo.errors import VlmduoError

    found = []
    for role, ref in refs.items():
        try:
            if remote.is_remote_ref(ref):
                model = remote.parse_ref(ref)
            else:
                entry = registry.load_registry().model(ref)
                if entry.source != "remote":
                    continue
                model = remote.from_entry(entry)
        except VlmduoError as exc:
            found.append({"role": role, "name": ref, "ok": False, "error": exc.message})
            continue
        agent = remote.RemoteAgent(model)
        try:
            found.append({"role": role, **agent.check()})
        finally:
            agent.close()
    return found


def _paths(synthetic_cache: Path) -> dict[str, str]:
    from huggingface_hub import constants

    from vlmduo.registry import vlmduo_home

    return {
        "hf_cache": str(constants.HF_HUB_CACHE),
        "hf_endpoint": str(constants.ENDPOINT),
        "vlmduo_home": str(vlmduo_home()),
        "synthetic_cache": str(synthetic_cache),
        "executable": sys.executable,
    }


def run_self_test(pair: str = "synthetic") -> dict[str, Any]:
    """Ask one question in duo mode (forced transfer) on the synthetic pair."""
    from vlmduo import registry
    from vlmduo.api import answer, load_agent
    from vlmduo.engine import EngineSettings
    from vlmduo.images import synthetic_image
    from vlmduo.pipeline import AskOptions

    start = time.perf_counter()
    try:
        chosen = registry.load_registry().pair(pair)
        settings = EngineSettings(n_ctx=2048)
        small, small_ms = load_agent(chosen.small, settings=settings, role="small")
        large, large_ms = load_agent(chosen.large, settings=settings, role="large")
        result = answer(
            synthetic_image(128, 96),
            "Which shape is shown? A. circle B. square C. triangle",
            AskOptions(policy="always", think_budget=32, transfer_budget=16),
            small=small,
            large=large,
            load_ms={small.name: small_ms, large.name: large_ms},
        )
    except Exception as exc:  # doctor reports every failure instead of raising
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    ok = result.route == "transfer" and result.answer in {"A", "B", "C"}
    return {
        "ok": ok,
        "pair": pair,
        "answer": result.answer,
        "route": result.route,
        "wall_ms": round((time.perf_counter() - start) * 1000.0, 1),
        "timings_ms": result.timings_ms,
    }
