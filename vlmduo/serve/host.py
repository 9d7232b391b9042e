"""The pair a server keeps loaded: one ask at a time, a bounded queue, idle unload.

The engine is not re-entrant per agent, so asks take turns (first come, first
served) in an :class:`EngineQueue`; beyond ``max_waiting`` waiting asks a new one is
refused at once (HTTP 429). After ``keep_alive`` seconds without an ask the models
are unloaded; the next ask loads them again and reports that load in its timings.
Nothing here knows HTTP: the app maps these calls and errors onto responses.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmduo.errors import Cancelled, VlmduoError

if TYPE_CHECKING:
    from vlmduo.agents.base import AgentLike, Progress
    from vlmduo.duo.pipeline import AskOptions, AskResult
    from vlmduo.engine.settings import EngineSettings
    from vlmduo.media.images import LoadedImage

# Loads the agents of every role; returns them and load milliseconds by model name.
Loader = Callable[[], "tuple[dict[str, AgentLike], dict[str, float]]"]
Unloader = Callable[["dict[str, AgentLike]"], None]
# How often a waiting ask looks at its cancel flag, and the idle watcher at the clock.
_POLL_S = 0.05


class QueueFull(VlmduoError):
    """Too many asks are waiting for this pair."""


@dataclass(frozen=True)
class PairSpec:
    """What a server serves: the pair's name, its model references and engine settings."""

    name: str
    refs: dict[str, tuple[str, str | None]]
    settings: EngineSettings
    offline: bool = False


class EngineQueue:
    """Turns on the engine, first come first served, with at most ``max_waiting`` waiting."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._tickets: deque[object] = deque()
        self._busy = False

    @property
    def waiting(self) -> int:
        """Asks admitted but not yet running."""
        with self._cond:
            return len(self._tickets)

    @property
    def busy(self) -> bool:
        """True while an ask (or an unload) holds the engine."""
        with self._cond:
            return self._busy

    def admit(self) -> object:
        """A place in the queue, or QueueFull at once; pass it to :meth:`turn`."""
        with self._cond:
            if len(self._tickets) >= self.max_waiting + (0 if self._busy else 1):
                raise QueueFull(
                    f"{len(self._tickets)} requests are waiting for this pair already",
                    hint="retry later, or start the server with a larger --max-queue",
                )
            ticket = object()
            self._tickets.append(ticket)
            return ticket

    def withdraw(self, ticket: object) -> None:
        """Give up a place before its turn (the request failed or went away)."""
        with self._cond:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
                self._cond.notify_all()

    @contextmanager
    def turn(self, ticket: object, cancel: threading.Event | None = None) -> Iterator[None]:
        """Wait for ``ticket``'s turn and hold the engine for the block; Cancelled
        (and the place given up) when ``cancel`` is set while waiting."""
        with self._cond:
            try:
                while self._busy or self._tickets[0] is not ticket:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("the request was cancelled while it waited its turn")
                    self._cond.wait(_POLL_S)
            except BaseException:
                self._tickets.remove(ticket)
                self._cond.notify_all()
                raise
            self._tickets.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    @contextmanager
    def idle_turn(self) -> Iterator[bool]:
        """Hold the engine only if nobody runs or waits; yields whether it did."""
        with self._cond:
            taken = not self._busy and not self._tickets
            if taken:
                self._busy = True
        try:
            yield taken
        finally:
            if taken:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class PairHost:
    """A pair of agents kept loaded for a server, with idle unload and reload.

    ``loader`` and ``unloader`` default to the engine's (``vlmduo.api``); tests pass
    scripted agents instead.
    """

    def __init__(
        self,
        spec: PairSpec,
        *,
        keep_alive_s: float | None = 300.0,
        max_waiting: int = 8,
        loader: Loader | None = None,
        unloader: Unloader | None = None,
    ) -> None:
        self.spec = spec
        self.keep_alive_s = keep_alive_s
        self.queue = EngineQueue(max_waiting)
        self._loader = loader or self._load_engine
        self._show_progress = True  # download bars on the first load only (at start-up)
        self._unloader = unloader or _unload_engine
        self._agents: dict[str, AgentLike] | None = None
        self._names: dict[str, str] = {}
        self._last_used = time.monotonic()
        self._active: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.loads = 0
        self.asks = 0

    # -- loading ---------------------------------------------------------------
    def _load_engine(self) -> tuple[dict[str, AgentLike], dict[str, float]]:
        from vlmduo import api

        progress, self._show_progress = self._show_progress, False
        resolved = {
            role: api.resolve(model, mmproj, offline=self.spec.offline, progress=progress)
            for role, (model, mmproj) in self.spec.refs.items()
        }
        return api.load_agents(resolved, self.spec.settings)  # type: ignore[return-value]

    def load(self) -> dict[str, float]:
        """Load the agents now (at start-up, before serving); load ms by model name."""
        return self._ensure_loaded()

    def _ensure_loaded(self) -> dict[str, float]:
        """The agents, loading them when unloaded; the load ms this call paid (else {})."""
        if self._agents is not None:
            return {}
        agents, load_ms = self._loader()
        with self._lock:
            self._agents = agents
            self._names = {role: agent.name for role, agent in agents.items()}
            self.loads += 1
        return load_ms

    @property
    def loaded(self) -> bool:
        """True while the models are in memory."""
        return self._agents is not None

    def model_names(self) -> dict[str, str]:
        """Role -> model name (kept while unloaded; empty before the first load)."""
        return dict(self._names)

    def think_end(self, role: str) -> str | None:
        """The marker that closes the thinking of the agent in ``role`` (None if it has none)."""
        agent = (self._agents or {}).get(role)
        return getattr(agent, "think_end", None) if getattr(agent, "thinking", False) else None

    # -- asking ----------------------------------------------------------------
    def admit(self) -> object:
        """Reserve a place in the queue (QueueFull at once when it is full)."""
        return self.queue.admit()

    def ask(
        self,
        ticket: object,
        image: LoadedImage | None,
        question: str,
        options: AskOptions,
        *,
        cancel: threading.Event,
        progress: Progress | None = None,
    ) -> AskResult:
        """Wait for the turn of ``ticket``, (re)load if needed and answer; blocking.

        Setting ``cancel`` stops the ask while it waits or runs (Cancelled).
        """
        from vlmduo import api

        with self._lock:
            self._active.add(cancel)
        try:
            with self.queue.turn(ticket, cancel):
                try:
                    load_ms = self._ensure_loaded()
                    agents = self._agents or {}
                    return api.answer(
                        image,
                        question,
                        options,
                        small=agents.get("small"),
                        large=agents.get("large"),
                        load_ms=load_ms,
                        progress=progress,
                        cancel=cancel,
                    )
                finally:
                    self._last_used = time.monotonic()
                    self.asks += 1
        finally:
            with self._lock:
                self._active.discard(cancel)

    def cancel_all(self) -> None:
        """Cancel every ask waiting or running (the server is stopping)."""
        with self._lock:
            for event in self._active:
                event.set()

    # -- idle unload -----------------------------------------------------------
    def unload_if_idle(self, now: float | None = None) -> bool:
        """Unload when nothing ran for ``keep_alive_s``; True if it unloaded."""
        if self.keep_alive_s is None or self._agents is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_used < self.keep_alive_s:
            return False
        with self.queue.idle_turn() as taken:
            if not taken or self._agents is None:
                return False
            agents, self._agents = self._agents, None
            self._unloader(agents)
            return True

    def start_idle_watch(self) -> None:
        """Check for idleness in the background until :meth:`close`."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="vlmduo-idle", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, max(_POLL_S, (self.keep_alive_s or 1.0) / 4))):
            self.unload_if_idle()

    def close(self) -> None:
        """Stop the idle watcher and cancel what runs."""
        self._stop.set()
        self.cancel_all()

    def unload_at(self) -> float | None:
        """Epoch seconds when an idle unload is due; None for never (or unloaded, or busy)."""
        if self.keep_alive_s is None or self._agents is None or self.queue.busy or self.queue.waiting:
            return None
        return time.time() + max(0.0, self.keep_alive_s - (time.monotonic() - self._last_used))

    def status(self) -> dict[str, Any]:
        """What ``vlmduo ps`` shows."""
        return {
            "pair": self.spec.name,
            "state": "loaded" if self.loaded else "unloaded",
            "models": self.model_names(),
            "keep_alive_s": self.keep_alive_s,
            "unload_at": self.unload_at(),
            "busy": self.queue.busy,
            "waiting": self.queue.waiting,
            "max_waiting": self.queue.max_waiting,
            "loads": self.loads,
            "asks": self.asks,
            "image_cache": _image_cache_stats(),
        }


def _image_cache_stats() -> dict[str, int]:
    """The kept image prefixes (``vlmduo.api``'s, which this server's agents use)."""
    from vlmduo import api

    return api.image_prefixes().stats()


def _unload_engine(agents: dict[str, Any]) -> None:
    """Free the models of real agents (the same model in two roles once)."""
    from vlmduo import api

    models = {id(agent.model): agent.model for agent in agents.values() if hasattr(agent, "model")}
    for model in models.values():
        api.unload(model)
