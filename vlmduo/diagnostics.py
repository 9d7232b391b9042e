"""What ``vlmduo doctor`` checks: versions, backend, caches, a pair's readiness, a self-test.

The self-test runs the whole duo pipeline (both agents, a transfer) on
synthetic random-weight models built locally, so it works offline and proves
the engine, the projector path and the KV reuse all work on this machine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmduo import __version__
from vlmduo.offline import offline_mode

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


def collect(
    self_test: bool = True, pair: str | None = "default", refs: dict[str, str] | None = None
) -> Report:
    """Gather the report; with ``self_test`` also run the pipeline on synthetic models, and
    with ``pair`` say whether that pair is downloaded and the Hub reachable. The servers
    of remote models among ``refs`` (role -> model reference; default: the pair's) are
    checked: reachable, the model listed, an image accepted."""
    import llama_cpp

    from vlmduo import synthetic
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
        offline=offline_mode(),
        threading=threading_policy(info),
    )
    if pair is not None:
        report.pair = pair_readiness(pair, offline=report.offline)
    if self_test:
        report.self_test = run_self_test()
    if refs is None and report.pair is not None:
        refs = {m.role: m.name for m in report.pair.models}
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


# --- is a pair ready to answer? -------------------------------------------------------

EXAMPLE_QUESTION = "How many red circles are there?"
HUB_TIMEOUT_S = 3.0


@dataclass
class ModelReadiness:
    """One model of a pair: on disk or not, and what the Hub says of its files."""

    name: str
    role: str
    source: str
    downloaded: bool
    size_gb: float | None
    hub: str | None = None  # "found", "not found: ...", or None when not asked

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PairReadiness:
    """Whether a pair can answer now, whether the Hub can be reached, and what to run next."""

    pair: str
    models: list[ModelReadiness]
    endpoint: str
    hub: str  # "reachable", "unreachable: ...", "not checked: ...", "not needed"
    next_steps: list[dict[str, str]]  # {"command": ..., "note": ...}, the first to run first

    @property
    def ready(self) -> bool:
        """True when every model of the pair is on disk (or is built locally)."""
        return all(m.downloaded or m.source == "synthetic" for m in self.models)

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "ready": self.ready,
            "models": [m.to_json() for m in self.models],
            "endpoint": self.endpoint,
            "hub": self.hub,
            "next": self.next_steps,
        }


def ask_command(pair: str) -> str:
    """The first question to ask, on the picture shipped with vlmduo."""
    flag = "" if pair == "default" else f" --pair {pair}"
    return f'vlmduo ask example "{EXAMPLE_QUESTION}"{flag}'


def pull_command(names: list[str], pair: str | None) -> str:
    """``vlmduo pull --pair P`` when the whole pair is wanted, else the names."""
    return f"vlmduo pull --pair {pair}" if pair else "vlmduo pull " + " ".join(names)


def ways_to_go_on(
    missing: list[Any],
    pair: str | None,
    *,
    offline: bool,
    download: bool = True,
    roles: tuple[str, ...] = ("small", "large"),
) -> str:
    """The hint of an error that leaves ``missing`` registry models without their files:
    download them (unless a download just failed), use the synthetic pair, or point the
    ``roles`` at local ``.gguf`` files."""
    models = "/".join(f"--{role}" for role in roles)
    projectors = "/".join(f"--{role}-mmproj" for role in roles)
    others = (
        "with no download: --pair synthetic (random weights); or your own files: "
        f"{models} PATH.gguf with {projectors}"
    )
    if not download:
        return f"or, {others}"
    pull = pull_command([m.name for m in missing], pair)
    size = sum(m.size_gb or 0.0 for m in missing)
    online = f"{pull} (~{size:.1f} GB)" if size else pull
    if offline:
        online += " once online, with HF_HUB_OFFLINE unset"
    return f"download: {online}; or, {others}"


def missing_models(refs: list[str]) -> list[Any]:
    """Registry entries among ``refs`` (names or paths) whose Hub files are not all on disk."""
    from vlmduo import registry

    models = registry.load_registry().models
    wanted = [models[ref] for ref in dict.fromkeys(refs) if ref in models and models[ref].is_hub]
    if not wanted:  # model files given as paths: no need for huggingface_hub (90 ms to import)
        return []
    from vlmduo import hub

    return [entry for entry in wanted if not hub.entry_status(entry).downloaded]


def pair_of(small: str, large: str) -> str | None:
    """The registry pair made of exactly ``small`` and ``large``, if any (``default`` first)."""
    from vlmduo import registry

    pairs = registry.load_registry().pairs
    found = [p.name for p in pairs.values() if (p.small, p.large) == (small, large)]
    return "default" if "default" in found else (found[0] if found else None)


def pair_readiness(pair: str = "default", *, offline: bool | None = None) -> PairReadiness:
    """Is ``pair`` downloaded, can the Hub be reached (a HEAD per model file, 3 s each,
    never when offline), and the exact command to run next."""
    from vlmduo import hub, registry

    offline = offline_mode() if offline is None else offline
    entries = zip(("small", "large"), registry.load_registry().pair_models(pair), strict=True)
    models = [
        ModelReadiness(e.name, role, e.source, hub.entry_status(e).downloaded, e.size_gb)
        for role, e in entries
    ]
    endpoint = hub.hub_endpoint()
    hub_models = [m for m in models if m.source == "hub"]
    if not hub_models:
        state = "not needed (no model of this pair comes from the Hub)"
    elif offline:
        state = "not checked: offline mode is on (HF_HUB_OFFLINE)"
    else:
        state = _probe_hub(hub_models)
    return PairReadiness(pair, models, endpoint, state, _next_steps(pair, models, state, offline))


def _probe_hub(models: list[ModelReadiness]) -> str:
    """HEAD each model file on the Hub; the first network failure ends the probe."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from vlmduo import hub, registry

    endpoint = hub.hub_endpoint()
    entries = registry.load_registry().models
    for model in models:
        entry = entries[model.name]
        url = hf_hub_url(entry.repo or "", entry.file or "", revision=entry.revision, endpoint=endpoint)
        try:
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, endpoint=endpoint, library_name="vlmduo")
        except hf_errors.HfHubHTTPError as exc:  # the Hub answered, with an error
            status = exc.response.status_code if exc.response is not None else "?"
            if status in (401, 403):
                model.hub = f"needs a token: HTTP {status} for {entry.repo} (gated or private)"
            elif status == 404:
                model.hub = f"not found: HTTP 404 for {entry.repo}/{entry.file}"
            else:
                model.hub = f"unexpected answer: HTTP {status} for {entry.repo}/{entry.file}"
        except (hf_errors.LocalEntryNotFoundError, *hub._network_errors()) as exc:
            return f"unreachable: {type(exc).__name__}: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - doctor reports, never raises
            model.hub = f"unexpected answer: {type(exc).__name__}: {_first_line(exc)}"
        else:
            model.hub = "found"
    return "reachable"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:120]


def _next_steps(
    pair: str, models: list[ModelReadiness], hub_state: str, offline: bool
) -> list[dict[str, str]]:
    """Commands to run next, each with a short note: the first is the one to run."""
    missing = [m for m in models if m.source == "hub" and not m.downloaded]
    if not missing:
        return [{"command": ask_command(pair), "note": "the pair is ready"}]
    synthetic = {
        "command": f'vlmduo ask example "{EXAMPLE_QUESTION}" --pair synthetic',
        "note": "meanwhile, with no download: random-weight models, real latency",
    }
    pull = pull_command([m.name for m in missing], pair)
    size = sum(m.size_gb or 0.0 for m in missing)
    about = f"~{size:.1f} GB into the Hugging Face cache" if size else "into the Hugging Face cache"
    not_found = [m for m in models if m.hub and m.hub.startswith("not found")]
    gated = [m for m in models if m.hub and m.hub.startswith("needs a token")]
    if offline:
        first = {"command": f"HF_HUB_OFFLINE=0 {pull}", "note": f"{about}, once online"}
    elif hub_state.startswith("unreachable"):
        note = f"{about}, once the Hub answers: check the network, a proxy or HF_ENDPOINT"
        first = {"command": pull, "note": note}
    elif not_found:
        names = ", ".join(f"[models.{m.name}]" for m in not_found)
        note = f"the Hub lacks a file of {names}: override it in $VLMDUO_HOME/models.toml"
        first = {"command": "vlmduo models", "note": note}
    elif gated:
        names = " and ".join(m.name for m in gated)
        note = f"{about}; {names} needs a token: accept the model's terms on the Hub, then put the token here"
        first = {"command": f"HF_TOKEN=hf_... {pull}", "note": note}
    else:
        first = {"command": pull, "note": f"{about} (vlmduo ask would also download them first)"}
    return [first, synthetic]
