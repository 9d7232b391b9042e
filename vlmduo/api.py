"""The public Python API the CLI is built on.

    from vlmduo.api import load_agent, answer
    small, _ = load_agent("synthetic-small")
    large, _ = load_agent("synthetic-large")
    result = answer("photo.jpg", "How many cats?", small=small, large=large)

Models are resolved through the registry (names), or taken as ``.gguf`` paths,
loaded once per process and kept: a second question pays no load. A model on a
server (``http://host:8000/v1#MODEL``, or a registry entry with ``endpoint``) becomes
a ``RemoteAgent``: nothing is loaded here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlmduo.agents.base import AgentLike, Progress
from vlmduo.agents.local import Agent
from vlmduo.duo.pipeline import AskOptions, AskResult, ask, make_question
from vlmduo.engine.model import VisionLanguageModel
from vlmduo.engine.prefix_cache import DiskPrefixes, PrefixCache
from vlmduo.engine.session import Context
from vlmduo.engine.settings import EngineSettings
from vlmduo.errors import ModelError, UsageError
from vlmduo.media.images import LoadedImage, load_image

_cache: dict[tuple[str, str, EngineSettings], VisionLanguageModel] = {}
_contexts: dict[tuple[int, str], Context] = {}  # (id of model, role) -> the role's KV cache
_key_locks: dict[tuple[str, str, EngineSettings], threading.Lock] = {}
_cache_lock = threading.Lock()
# Image prefixes of every local agent in this process (memory only, until
# ``keep_image_prefixes`` says otherwise): the second question about an image
# costs only its own tokens.
_prefixes = PrefixCache()

if TYPE_CHECKING:
    from vlmduo.agents.remote import RemoteAgent, RemoteModel


@dataclass(frozen=True)
class ResolvedModel:
    """Files on disk for a model reference, and how the model marks its thinking."""

    name: str
    model_path: Path
    mmproj_path: Path | None
    thinking: bool = False
    think_start: str = "<think>"
    think_end: str = "</think>"
    # The model card's sampling from the registry (empty: llama.cpp's defaults).
    sampling: tuple[tuple[str, float], ...] = ()


def resolve(
    ref: str, mmproj: str | Path | None = None, *, offline: bool = False, progress: bool = True
) -> ResolvedModel | RemoteModel:
    """Turn a registry name or a ``.gguf`` path into files on disk, or a server's
    ``URL#MODEL`` (or a registry entry with ``endpoint``) into a ``RemoteModel``.

    Registry entries are downloaded (or, for synthetic entries, built) first
    when missing, unless ``offline``.
    """
    # vlmduo.agents.remote (and httpx, 30 ms) only for a model on a server.
    if ref.strip().lower().startswith(("http://", "https://")):
        from vlmduo.agents import remote

        _no_projector(ref, mmproj)
        return remote.parse_ref(ref)
    if _looks_like_path(ref):
        return _resolve_path(Path(ref).expanduser(), mmproj)
    from vlmduo.models import registry

    entry = registry.load_registry().model(ref)
    if entry.source == "remote":
        from vlmduo.agents import remote

        _no_projector(ref, mmproj)
        return remote.from_entry(entry)
    if entry.source == "synthetic":
        from vlmduo.models import synthetic

        model_path, mmproj_path = synthetic.ensure_built(entry.name, entry.synthetic or {})
    elif entry.source == "local":
        model_path, mmproj_path = Path(entry.path), Path(entry.mmproj_path) if entry.mmproj_path else None
    else:
        from vlmduo.models import hub

        model_path, mmproj_path = hub.ensure_files(entry, offline=offline, progress=progress)
    if mmproj is not None:
        mmproj_path = Path(mmproj).expanduser()
    return ResolvedModel(
        entry.name,
        Path(model_path),
        mmproj_path,
        entry.thinking,
        entry.think_start,
        entry.think_end,
        entry.sampling,
    )


def _no_projector(ref: str, mmproj: str | Path | None) -> None:
    if mmproj is not None:
        raise UsageError(f"'{ref}' is served remotely: its server has the projector; drop the --*-mmproj")


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or "/" in ref or "\\" in ref or Path(ref).expanduser().is_file()


def _resolve_path(path: Path, mmproj: str | Path | None) -> ResolvedModel:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    mmproj_path = Path(mmproj).expanduser() if mmproj is not None else _sibling_mmproj(path)
    # Without a registry entry, the file name is the best hint of a reasoning model.
    thinking = "think" in path.name.lower()
    return ResolvedModel(path.stem, path, mmproj_path, thinking)


def _sibling_mmproj(path: Path) -> Path | None:
    """The one ``mmproj*.gguf`` beside a model, if exactly one is there."""
    found = sorted(p for p in path.parent.glob("*.gguf") if "mmproj" in p.name.lower() and p != path)
    return found[0] if len(found) == 1 else None


def load_model(resolved: ResolvedModel, settings: EngineSettings) -> tuple[VisionLanguageModel, float]:
    """Load (or reuse) a model; returns it and the milliseconds this call spent loading.

    Different models load in parallel (llama.cpp's load is mostly I/O and page
    faults, and ctypes releases the GIL); the same model twice waits for the first.
    """
    key = (str(resolved.model_path), str(resolved.mmproj_path), settings)
    with _cache_lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached, 0.0
        model = VisionLanguageModel(resolved.model_path, resolved.mmproj_path, settings, name=resolved.name)
        with _cache_lock:
            _cache[key] = model
        return model, model.load_times.get("load")


def unload(model: VisionLanguageModel) -> bool:
    """Drop ``model`` from the cache and free it (its agents' contexts too).

    Returns False when it was not cached. Agents that still hold it fail with
    a one-line "closed" error rather than touching freed memory.
    """
    with _cache_lock:
        keys = [key for key, cached in _cache.items() if cached is model]
        for key in keys:
            del _cache[key]
        for key in [key for key in _contexts if key[0] == id(model)]:
            del _contexts[key]
    if keys:
        model.close()
    return bool(keys)


def image_prefixes() -> PrefixCache:
    """The image prefixes this process's local agents restore and keep."""
    return _prefixes


def keep_image_prefixes(
    memory_bytes: int | None = None, disk: Path | str | None = None, disk_bytes: int | None = None
) -> PrefixCache:
    """Bound the process's image prefixes in memory to ``memory_bytes``, and keep them
    on disk in ``disk`` too (bounded by ``disk_bytes``; ``vlmduo.paths.kv_dir()`` is
    where the CLI keeps them), for agents loaded from now on. Returns the new cache."""
    global _prefixes
    from vlmduo.engine import prefix_cache

    store = None
    if disk is not None:
        store = DiskPrefixes(
            Path(disk), prefix_cache.DEFAULT_DISK_BYTES if disk_bytes is None else disk_bytes
        )
    with _cache_lock:
        memory = prefix_cache.DEFAULT_MEMORY_BYTES if memory_bytes is None else memory_bytes
        _prefixes = PrefixCache(memory, store)
        return _prefixes


def load_agents(
    resolved: dict[str, ResolvedModel | RemoteModel], settings: EngineSettings
) -> tuple[dict[str, AgentLike], dict[str, float]]:
    """Load the agents of several roles at once (one thread per role); a remote one
    loads nothing.

    Returns the agents by role and load milliseconds by model name.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(resolved))) as pool:
        futures = {
            role: pool.submit(load_agent, model, settings=settings, role=role)
            for role, model in resolved.items()
        }
        loaded = {role: future.result() for role, future in futures.items()}
    agents = {role: agent for role, (agent, _) in loaded.items()}
    load_ms: dict[str, float] = {}
    for agent, ms in loaded.values():
        load_ms[agent.name] = load_ms.get(agent.name, 0.0) + ms
    return agents, load_ms


def load_agent(
    ref: str | ResolvedModel | RemoteModel,
    mmproj: str | Path | None = None,
    settings: EngineSettings | None = None,
    *,
    offline: bool = False,
    progress: bool = True,
    role: str = "small",
) -> tuple[Agent | RemoteAgent, float]:
    """Resolve (unless already resolved) and load a model as an agent; returns it and
    its load time (0 when cached, and for a model on a server).

    Each ``role`` gets its own context (KV cache) over the model's weights, so
    the same model can be the small and the large agent at once.
    """
    resolved = ref if not isinstance(ref, str) else resolve(ref, mmproj, offline=offline, progress=progress)
    if not isinstance(resolved, ResolvedModel):
        return remote_agent(resolved), 0.0
    model, load_ms = load_model(resolved, settings or EngineSettings())
    with _cache_lock:
        context = _contexts.get((id(model), role))
        if context is None:
            # The first role takes the context the model already made at load (a
            # KV cache is large: 576 MB at 4096 tokens on an 8B model); a second
            # role on the same weights gets its own.
            taken = any(key[0] == id(model) for key in _contexts)
            context = model.new_context() if taken else model.default_context
            _contexts[(id(model), role)] = context
    # A model whose template opens its thought thinks, whatever the registry or file name says.
    thinking = resolved.thinking or model.thinks_natively(resolved.think_start, resolved.think_end)
    agent = Agent(
        model,
        thinking,
        resolved.think_start,
        resolved.think_end,
        context=context,
        card=resolved.sampling,
        prefix_cache=_prefixes,
    )
    return agent, load_ms


_remote_agents: dict[RemoteModel, RemoteAgent] = {}


def remote_agent(ref: RemoteModel) -> RemoteAgent:
    """The agent of a model on a server, one per process and reference (it checks the server once)."""
    from vlmduo.agents.remote import RemoteAgent

    with _cache_lock:
        agent = _remote_agents.get(ref)
        if agent is None:
            agent = _remote_agents[ref] = RemoteAgent(ref)
        return agent


def answer(
    image: str | LoadedImage | None,
    question: str,
    options: AskOptions | None = None,
    *,
    small: AgentLike | None = None,
    large: AgentLike | None = None,
    load_ms: dict[str, float] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> AskResult:
    """Answer ``question`` about ``image`` (a path, URL, a loaded image, or None).

    Setting ``cancel`` from another thread stops the work and raises ``Cancelled``.
    """
    options = options or AskOptions()
    options.validate()
    loaded = load_image(image) if isinstance(image, str) else image
    q = make_question(question, loaded, options.fmt)
    return ask(q, options, small=small, large=large, load_ms=load_ms, progress=progress, cancel=cancel)
