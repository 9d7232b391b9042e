"""Running servers on this machine: their records, the per-pair lock, and discovery.

Each server writes ``<run dir>/<key>.json`` (address, pid, the models it serves, its
engine settings and limits) and holds an exclusive ``flock`` on ``<key>.lock`` for
its whole life; ``key`` is a digest of the pair's models, so a second server for the
same pair fails at once instead of loading it twice. The kernel drops the lock when
a server dies however it dies; a record whose pid is gone is ignored (and replaced
by the next server of that pair). The run dir is ``$VLMDUO_CACHE/run`` (default
``~/.cache/vlmduo/run``).

Nothing here imports the engine or the web stack: ``vlmduo ask`` reads these records
on every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmduo import paths
from vlmduo.errors import UsageError, VlmduoError
from vlmduo.serve import address

# Fields of EngineSettings that change what a model computes; threads and verbosity
# change only speed and logs, so a server with other threads still serves an ask.
ENGINE_FIELDS = ("n_ctx", "n_batch", "n_gpu_layers", "image_max_tokens", "image_min_tokens")
DEFAULT_PORT = 8491
DEFAULT_KEEP_ALIVE = "5m"
# How long `vlmduo ask` waits for a server that is still loading its models.
WAIT_ENV = "VLMDUO_SERVER_WAIT"
DEFAULT_WAIT_S = 300.0
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class AlreadyServing(VlmduoError):
    """A server for this pair runs already (its lock is held)."""


@dataclass
class ServerRecord:
    """What a running server tells its clients about itself."""

    key: str
    pid: int
    host: str
    port: int
    pair: str
    refs: dict[str, list[str | None]]  # role -> [model ref, mmproj], normalised
    models: dict[str, str]  # role -> model name
    engine: dict[str, int]
    state: str = "loading"  # loading | ready
    started: float = field(default_factory=time.time)
    auth: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    keep_alive_s: float | None = 300.0
    log: str | None = None
    # Proves to the server that a thin `vlmduo ask` read this record (readable by this user only).
    cli_token: str | None = None

    @property
    def url(self) -> str:
        """Base URL of the server (the OpenAI base URL is this plus ``/v1``)."""
        return address.url(self.host, self.port)

    def to_json(self) -> dict[str, Any]:
        """The record as written to disk."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerRecord:
        """Read a record; unknown keys (a newer vlmduo) are ignored."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def run_dir() -> Path:
    """Where server records and locks live: ``$VLMDUO_CACHE/run`` or ``~/.cache/vlmduo/run``."""
    return Path(paths.run_dir())


def normalize_ref(ref: str | None) -> str | None:
    """A model reference as one spelling: registry names as given, paths absolute."""
    if ref is None:
        return None
    if ref.lower().startswith(("http://", "https://")):  # a model on a server (URL#MODEL)
        return ref
    if ref.endswith(".gguf") or "/" in ref or "\\" in ref or Path(ref).expanduser().is_file():
        return str(Path(ref).expanduser().resolve())
    return ref


def normalize_refs(refs: dict[str, tuple[str, str | None]]) -> dict[str, list[str | None]]:
    """``{"small": [model, mmproj], "large": [...]}`` with every reference normalised."""
    return {role: [normalize_ref(model), normalize_ref(mmproj)] for role, (model, mmproj) in refs.items()}


def pair_key(refs: dict[str, tuple[str, str | None]]) -> str:
    """The lock key of a pair: the same models (however spelled) give the same key."""
    text = json.dumps(normalize_refs(refs), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_fields(settings: Any) -> dict[str, int]:
    """The settings a client and a server must share for identical answers."""
    return {name: getattr(settings, name) for name in ENGINE_FIELDS}


def parse_duration(text: str) -> float | None:
    """Ollama's keep-alive spellings: ``5m``, ``30s``, ``1h30m``, ``90`` (seconds),
    ``0`` (unload after each request); a negative value (``-1``) keeps forever (None)."""
    value = text.strip().lower()
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None:
        return None if number < 0 else number
    parts = _DURATION_RE.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise UsageError(
            f"cannot read the duration {text!r}",
            hint="write it as 30s, 5m, 1h, 1h30m, a number of seconds, 0 or -1 (forever)",
        )
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def format_duration(seconds: float | None) -> str:
    """``5m``, ``1h30m``, ``45s``; ``forever`` for None."""
    if seconds is None:
        return "forever"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_path(key: str) -> Path:
    """The record file of the server for pair ``key``."""
    return run_dir() / f"{key}.json"


def read_record(path: Path) -> ServerRecord | None:
    """The record at ``path``, or None when absent or unreadable (being replaced)."""
    try:
        return ServerRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(record: ServerRecord) -> None:
    """Write a record atomically (rename), readable by this user only."""
    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{record.key}.{record.pid}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record.to_json(), handle)
    os.replace(tmp, record_path(record.key))


def remove_record(record: ServerRecord) -> None:
    """Remove the record if it is still this server's own."""
    current = read_record(record_path(record.key))
    if current is not None and current.pid == record.pid:
        with contextlib.suppress(OSError):
            record_path(record.key).unlink()


def live_records() -> list[ServerRecord]:
    """Records of servers whose process is alive, oldest first."""
    folder = run_dir()
    if not folder.is_dir():
        return []
    found = [read_record(path) for path in sorted(folder.glob("*.json"))]
    alive = [r for r in found if r is not None and pid_alive(r.pid)]
    return sorted(alive, key=lambda r: r.started)


@contextlib.contextmanager
def pair_lock(key: str) -> Iterator[None]:
    """Hold the pair's lock for the block; AlreadyServing when another server holds it."""
    import fcntl

    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = read_record(record_path(key))
            where = f" at {record.url} (pid {record.pid})" if record else ""
            raise AlreadyServing(
                f"a vlmduo server for this pair is running already{where}",
                hint="use it as it is, or stop it first: vlmduo stop",
            ) from None
        yield
    finally:
        os.close(fd)  # closing drops the lock


@dataclass(frozen=True)
class Match:
    """The outcome of looking for a server: one to use, or why none was used."""

    record: ServerRecord | None
    note: str | None = None  # why a server of the same models was not used


def serves(record: ServerRecord, wanted: dict[str, list[str | None]]) -> bool:
    """True when ``record``'s server holds the models ``wanted`` (normalised refs by role)."""
    return all(record.refs.get(role) == models for role, models in wanted.items())


def find_server(
    refs: dict[str, tuple[str, str | None]],
    roles: tuple[str, ...],
    engine: dict[str, int],
    *,
    wait_s: float | None = None,
    on_wait: Callable[[ServerRecord], None] | None = None,
) -> Match:
    """A live server that serves ``roles`` of ``refs`` with the same ``engine`` settings.

    A matching server still loading its models is waited for (up to ``wait_s``,
    default ``$VLMDUO_SERVER_WAIT`` or 300 s), so that ``vlmduo serve &`` followed at
    once by ``vlmduo ask`` loads the models once, in the server; ``on_wait`` is told
    when such a wait begins.
    """
    wanted = normalize_refs({role: refs[role] for role in roles})
    note = None
    for record in live_records():
        if not serves(record, wanted):
            continue
        if record.engine != engine:
            note = _settings_note(record, engine)
            continue
        if record.auth and not os.environ.get("VLMDUO_API_KEY"):
            note = f"the server at {record.url} needs an API key: set VLMDUO_API_KEY"
            continue
        if record.state != "ready" and on_wait is not None:
            on_wait(record)
        ready = wait_ready(record, _wait_limit(wait_s))
        if ready is not None:
            return Match(ready)
    return Match(None, note)


def _wait_limit(wait_s: float | None) -> float:
    if wait_s is not None:
        return wait_s
    try:
        return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    except ValueError:
        return DEFAULT_WAIT_S


def wait_ready(record: ServerRecord, limit_s: float) -> ServerRecord | None:
    """The record once its server is ready; None if it died or did not get ready in time."""
    deadline = time.monotonic() + limit_s
    path = record_path(record.key)
    while record.state != "ready":
        if time.monotonic() > deadline or not pid_alive(record.pid):
            return None
        time.sleep(0.1)
        current = read_record(path)
        if current is None or current.pid != record.pid:
            return None
        record = current
    return record


def _settings_note(record: ServerRecord, engine: dict[str, int]) -> str:
    differ = [
        f"{name} {record.engine.get(name)} there, {engine.get(name)} here"
        for name in ENGINE_FIELDS
        if record.engine.get(name) != engine.get(name)
    ]
    # The image cap follows --ctx and the token budgets unless given: the usual cause.
    return (
        f"the server at {record.url} runs these models with other engine settings "
        f"({'; '.join(differ)}), so this process answers; give both the same --ctx "
        "and --image-max-tokens to use it"
    )
