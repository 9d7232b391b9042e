"""What ``vlmduo doctor`` checks: versions, backend, caches, a pair's readiness, a self-test.

The self-test runs the whole duo pipeline (both agents, a transfer) on
synthetic random-weight models built locally, so it works offline and proves
the engine, the projector path and the KV reuse all work on this machine.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmduo import __version__
from vlmduo.engine import backend, threads
from vlmduo.models.offline import offline_mode
from vlmduo.models.readiness import PairReadiness, pair_readiness

PACKAGES = ("llama-cpp-python", "gguf", "huggingface-hub", "typer", "rich", "pillow", "numpy", "httpx")


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
    threads: dict[str, Any] = field(default_factory=dict)  # what llama.cpp's threads run with now
    self_test: dict[str, Any] = field(default_factory=dict)
    pair: PairReadiness | None = None
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # the pair's remote models

    @property
    def ok(self) -> bool:
        """True when the self-test passed (or was skipped) and every server checked out."""
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
            "threads": self.threads,
            "self_test": self.self_test,
            "pair": self.pair.to_json() if self.pair else None,
            "endpoints": self.endpoints,
        }


def _version(package: str) -> str:
    from importlib import metadata  # 11 ms to import: only doctor reports versions

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect(
    self_test: bool = True, pair: str | None = "default", refs: dict[str, str] | None = None
) -> Report:
    """Gather the report; with ``self_test`` also run the pipeline on synthetic models, and
    with ``pair`` say whether that pair is downloaded and the Hub reachable. The servers
    of remote models among ``refs`` (role -> model reference; default: the pair's) are
    checked: reachable, the model listed, an image accepted."""
    import llama_cpp

    from vlmduo.engine.backend import gpu_offload_supported
    from vlmduo.models import synthetic

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    versions = {"vlmduo": __version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in PACKAGES})
    report = Report(
        versions=versions,
        backend=backend.backend_name(info),
        gpu_offload=gpu_offload_supported(),
        system_info=info,
        paths=_paths(synthetic.cache_root()),
        offline=offline_mode(),
        threading=backend.threading_policy(info, settings=threads.openmp_settings()),
        threads=_threads(),
    )
    if pair is not None:
        report.pair = pair_readiness(pair, offline=report.offline)
    if self_test:
        report.self_test = run_self_test()
    if refs is None and report.pair is not None:
        refs = {m.role: m.name for m in report.pair.models}
    report.endpoints = check_endpoints(refs or {})
    return report


def _threads() -> dict[str, Any]:
    """The threading in force: libgomp's spin count (read from libgomp), the cores, what
    other programs keep busy now, the threads a context would run with and whether
    libgomp's waits would be the short spin (``threads.ShortSpin``)."""
    cores, load = threads.available_cores(), threads.CpuLoad()
    settings = threads.openmp_settings() or {}
    # The first reading can only count runnable threads at one instant (and just after
    # the self-test, its OpenMP threads still spinning); the second compares CPU time.
    load.others()
    time.sleep(threads.WINDOW_S)
    others = load.others()
    return {
        "gomp_spincount": settings.get("GOMP_SPINCOUNT"),
        "cores": cores,
        "others_busy_cores": round(others, 2),
        "threads_now": threads.fit(cores, cores, load),
        "short_spin_now": threads.is_busy(others),
    }


def check_endpoints(refs: dict[str, str]) -> list[dict[str, Any]]:
    """For each remote model among ``refs`` (``URL#MODEL`` or a registry entry with
    ``endpoint``): reachable, the model listed, vision accepted. Local models are skipped."""
    from vlmduo.agents import remote
    from vlmduo.errors import VlmduoError
    from vlmduo.models import registry

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

    from vlmduo.models.registry import vlmduo_home

    return {
        "hf_cache": str(constants.HF_HUB_CACHE),
        "hf_endpoint": str(constants.ENDPOINT),
        "vlmduo_home": str(vlmduo_home()),
        "synthetic_cache": str(synthetic_cache),
        "executable": sys.executable,
    }


def run_self_test(pair: str = "synthetic") -> dict[str, Any]:
    """Ask one question in duo mode (forced transfer) on the synthetic pair."""
    from vlmduo.api import answer, load_agent
    from vlmduo.duo.pipeline import AskOptions
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.media.images import synthetic_image
    from vlmduo.models import registry

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
