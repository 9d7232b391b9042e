"""The model registry: the shipped ``models.toml`` merged with the user's own file.

One loader (:func:`load_registry`); model names are never hard-coded anywhere else.
The user's file, ``$VLMDUO_HOME/models.toml``, adds entries or replaces shipped ones
by name (a whole entry at a time, so a user entry never inherits a stale pin from the
shipped one).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlmduo.errors import RegistryError, UnknownModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

Source = Literal["hub", "local", "synthetic", "remote"]
Role = Literal["small", "large", "either"]

DEFAULT_PAIR = "default"
ROLES: tuple[str, ...] = ("small", "large", "either")

_STR_KEYS = frozenset(
    {
        "repo",
        "file",
        "mmproj",
        "revision",
        "sha256",
        "mmproj_sha256",
        "path",
        "think_start",
        "think_end",
        "role",
        "family",
        "notes",
        "endpoint",
        "model",
        "api_key_env",
        "server",
    }
)
_BOOL_KEYS = frozenset({"thinking", "verified"})
_NUMBER_KEYS = frozenset({"size_gb", "memory_gb", "timeout"})
# A model card's recommended sampling, for the tokens a model reasons with (its
# constrained answers are greedy): each key with the range llama.cpp accepts.
SAMPLING_KEYS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 5.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, 1_000_000),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "repeat_penalty": (0.0, 5.0),
}
_MODEL_KEYS = _STR_KEYS | _BOOL_KEYS | _NUMBER_KEYS | set(SAMPLING_KEYS) | {"synthetic"}
_PAIR_KEYS = frozenset({"small", "large", "notes"})
_TOP_KEYS = frozenset({"models", "pairs"})
_HUB_ONLY = ("repo", "file", "revision", "sha256", "mmproj_sha256")
_REMOTE_ONLY = ("endpoint", "model", "api_key_env", "server", "timeout")
# The OpenAI-compatible engines a remote entry may name (vlmduo.agents.remote.servers).
SERVERS = ("vllm", "sglang", "llama-server", "ollama", "openai")

# Names end up on command lines and in file names: keep them shell- and path-safe.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelEntry:
    """One model: where its two files come from and how it behaves."""

    name: str
    source: Source
    repo: str | None = None
    file: str | None = None
    mmproj: str | None = None
    revision: str | None = None
    sha256: str | None = None
    mmproj_sha256: str | None = None
    path: Path | None = None
    mmproj_path: Path | None = None
    thinking: bool = False
    think_start: str = "<think>"
    think_end: str = "</think>"
    size_gb: float | None = None
    memory_gb: float | None = None
    role: Role = "either"
    verified: bool = False
    family: str | None = None
    notes: str | None = None
    synthetic: dict[str, Any] | None = None
    endpoint: str | None = None  # remote: the server's base URL (".../v1")
    model: str | None = None  # remote: the server's model id
    api_key_env: str | None = None  # remote: the environment variable holding the API key
    server: str | None = None  # remote: one of SERVERS; None: detected
    timeout: float | None = None  # remote: seconds to wait for one reply
    origin: Path | None = None
    # The model card's sampling (SAMPLING_KEYS), as (key, value) pairs: what is published.
    sampling: tuple[tuple[str, float], ...] = ()

    @property
    def is_hub(self) -> bool:
        """True for entries downloaded from the Hugging Face Hub."""
        return self.source == "hub"


@dataclass(frozen=True)
class PairEntry:
    """A small (reasoning) model and a large (answering) model that work together."""

    name: str
    small: str
    large: str
    notes: str | None = None
    origin: Path | None = None


@dataclass(frozen=True)
class Registry:
    """Every known model and pair, after merging the shipped and the user's files."""

    models: Mapping[str, ModelEntry]
    pairs: Mapping[str, PairEntry]
    files: tuple[Path, ...] = field(default=())

    def model(self, name: str) -> ModelEntry:
        """The entry called ``name``; UnknownModelError with the closest names if none."""
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model '{name}'{_suggest(name, self.models)}",
                hint="run: vlmduo models",
            ) from None

    def pair(self, name: str) -> PairEntry:
        """The pair called ``name``; UnknownModelError with the closest names if none."""
        try:
            return self.pairs[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown pair '{name}'{_suggest(name, self.pairs)}",
                hint="run: vlmduo models",
            ) from None

    def pair_models(self, name: str) -> tuple[ModelEntry, ModelEntry]:
        """The (small, large) entries of the pair called ``name``."""
        pair = self.pair(name)
        return self.model(pair.small), self.model(pair.large)


def vlmduo_home() -> Path:
    """The user's vlmduo directory: ``$VLMDUO_HOME``, by default ``~/.config/vlmduo``."""
    value = os.environ.get("VLMDUO_HOME")
    if value:
        return Path(os.path.expandvars(os.path.expanduser(value)))
    return Path.home() / ".config" / "vlmduo"


def shipped_registry_path() -> Path:
    """The ``models.toml`` shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "models.toml"


def load_registry(home: Path | None = None) -> Registry:
    """Load the shipped registry and merge ``HOME/models.toml`` over it by name."""
    home = vlmduo_home() if home is None else home
    models: dict[str, ModelEntry] = {}
    pairs: dict[str, PairEntry] = {}
    files: list[Path] = []
    for path in (shipped_registry_path(), home / "models.toml"):
        if not path.is_file():
            continue
        file_models, file_pairs = parse_registry_file(path)
        models.update(file_models)  # whole-entry override, by name
        pairs.update(file_pairs)
        files.append(path)
    for pair in pairs.values():
        for role in ("small", "large"):
            target = getattr(pair, role)
            if target not in models:
                raise _bad(
                    pair.origin,
                    f"[pairs.{pair.name}]",
                    f"{role} = '{target}' names no model{_suggest(target, models)}",
                )
    return Registry(models=models, pairs=pairs, files=tuple(files))


def parse_registry_file(path: Path) -> tuple[dict[str, ModelEntry], dict[str, PairEntry]]:
    """Parse and validate one ``models.toml``; RegistryError names the file and entry."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}", hint=f"check {path}") from exc
    models, pairs = _parse_cached(path, stat.st_mtime_ns, stat.st_size)
    return dict(models), dict(pairs)


@functools.lru_cache(maxsize=8)
def _parse_cached(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, ModelEntry], dict[str, PairEntry]]:
    # Parsed once per version of the file: a server resolves the pair on every ask
    # (5 ms of TOML each time); an edited file has another mtime or size.
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: invalid TOML: {exc}", hint=f"edit {path}") from exc
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}", hint=f"check {path}") from exc
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _bad(path, unknown[0], f"unknown table{_did_you_mean(unknown[0], _TOP_KEYS)}")
    models = {
        name: _parse_model(name, table, path)
        for name, table in _tables(data.get("models", {}), "models", path)
    }
    pairs = {
        name: _parse_pair(name, table, path) for name, table in _tables(data.get("pairs", {}), "pairs", path)
    }
    return models, pairs


def _tables(section: Any, kind: str, path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    if not isinstance(section, dict):
        raise _bad(path, kind, f"must be a table of [{kind}.NAME] entries")
    for name, table in section.items():
        if not _NAME_RE.match(name):
            raise _bad(path, f"[{kind}.{name}]", "names may use only letters, digits, '.', '_', '-'")
        if not isinstance(table, dict):
            raise _bad(path, f"[{kind}.{name}]", "must be a table")
        yield name, table


def _parse_model(name: str, table: dict[str, Any], path: Path) -> ModelEntry:
    where = f"[models.{name}]"
    for key, value in table.items():
        # [models.qwen2.5-vl] parses as nested tables: say so rather than "unknown key".
        if isinstance(value, dict) and key != "synthetic":
            raise _bad(path, where, f'names with dots need quotes: [models."{name}.{key}"]')
    _check_keys(table, _MODEL_KEYS, path, where)
    _check_types(table, path, where)
    has = {key for key in ("repo", "path", "synthetic", "endpoint") if key in table}
    if "endpoint" in has:
        return _remote_entry(name, table, path, where, has)
    if {"repo", "path"} <= has:
        raise _bad(path, where, "has both 'repo' (Hub) and 'path' (local file); keep one")
    if "synthetic" in has and len(has) > 1:
        raise _bad(path, where, "a synthetic entry takes neither 'repo' nor 'path'")
    if not has:
        needs = "needs 'repo' (a Hub model), 'path' (a local file), 'endpoint' (a server) or 'synthetic'"
        raise _bad(path, where, needs)
    for key in _REMOTE_ONLY:
        if key in table:
            raise _bad(path, where, f"'{key}' applies to a remote entry only (one with 'endpoint')")
    common = _common(name, table, path)
    if "repo" in has:
        return ModelEntry(source="hub", **_hub_fields(table, path, where), **common)
    if "path" in has:
        _reject(table, _HUB_ONLY, path, where, "a local entry")
        if "mmproj" not in table:
            raise _bad(path, where, "needs 'mmproj' (the projector file) next to 'path'")
        return ModelEntry(
            source="local",
            path=_expand(table["path"], path),
            mmproj_path=_expand(table["mmproj"], path),
            **common,
        )
    _reject(table, (*_HUB_ONLY, "mmproj"), path, where, "a synthetic entry")
    return ModelEntry(source="synthetic", synthetic=dict(table["synthetic"]), **common)


def _common(name: str, table: dict[str, Any], path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "thinking": table.get("thinking", False),
        "think_start": table.get("think_start", "<think>"),
        "think_end": table.get("think_end", "</think>"),
        "size_gb": _float(table.get("size_gb")),
        "memory_gb": _float(table.get("memory_gb")),
        "role": table.get("role", "either"),
        "verified": table.get("verified", False),
        "family": table.get("family"),
        "notes": table.get("notes"),
        "origin": path,
        "sampling": tuple((key, table[key]) for key in SAMPLING_KEYS if key in table),
    }


def _remote_entry(name: str, table: dict[str, Any], path: Path, where: str, has: set[str]) -> ModelEntry:
    """A model served by an OpenAI-compatible engine: no files, an endpoint and a model id."""
    if len(has) > 1:
        raise _bad(path, where, "a remote entry ('endpoint') takes neither 'repo', 'path' nor 'synthetic'")
    _reject(table, (*_HUB_ONLY, "mmproj"), path, where, "a remote entry")
    endpoint = table["endpoint"]
    if not re.match(r"^https?://[^/\s]+", endpoint):
        raise _bad(path, where, f"endpoint = '{endpoint}' must be an http(s) URL such as http://host:8000/v1")
    if "model" not in table:
        raise _bad(path, where, "needs 'model' (the model id the server lists at /v1/models)")
    server = table.get("server")
    if server is not None and server not in SERVERS:
        raise _bad(path, where, f"server must be one of {', '.join(SERVERS)} (or left out to detect it)")
    return ModelEntry(
        source="remote",
        endpoint=endpoint,
        model=table["model"],
        api_key_env=table.get("api_key_env"),
        server=server,
        timeout=_float(table.get("timeout")),
        **_common(name, table, path),
    )


def _hub_fields(table: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    for key in ("file", "mmproj"):
        if key not in table:
            raise _bad(path, where, f"needs '{key}' (a file name in the repo)")
        value = table[key]
        if value.startswith("/") or ".." in value.split("/"):
            raise _bad(path, where, f"{key} = '{value}' must be a path inside the repo")
    if not _REPO_RE.match(table["repo"]):
        raise _bad(path, where, f"repo = '{table['repo']}' is not of the form 'owner/name'")
    pins = {}
    for key in ("sha256", "mmproj_sha256"):
        if key in table:
            pins[key] = table[key].lower()
            if not _SHA256_RE.match(pins[key]):
                raise _bad(path, where, f"{key} must be 64 hexadecimal characters")
    return {
        "repo": table["repo"],
        "file": table["file"],
        "mmproj": table["mmproj"],
        "revision": table.get("revision"),
        **pins,
    }


def _parse_pair(name: str, table: dict[str, Any], path: Path) -> PairEntry:
    where = f"[pairs.{name}]"
    _check_keys(table, _PAIR_KEYS, path, where)
    for key in ("small", "large"):
        if not isinstance(table.get(key), str):
            raise _bad(path, where, f"needs '{key}' = \"MODEL NAME\"")
    if not isinstance(table.get("notes", ""), str):
        raise _bad(path, where, "notes must be a string")
    return PairEntry(name, table["small"], table["large"], table.get("notes"), path)


def _check_keys(table: dict[str, Any], allowed: frozenset[str], path: Path, where: str) -> None:
    for key in sorted(table):
        if key not in allowed:
            raise _bad(path, where, f"unknown key '{key}'{_did_you_mean(key, allowed)}")


def _check_types(table: dict[str, Any], path: Path, where: str) -> None:
    for key, value in table.items():
        if key in _STR_KEYS and not (isinstance(value, str) and value):
            raise _bad(path, where, f"{key} must be a non-empty string")
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise _bad(path, where, f"{key} must be true or false")
        # bool is an int subclass: `size_gb = true` must not pass as a number.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _NUMBER_KEYS and not (number and value >= 0):
            raise _bad(path, where, f"{key} must be a non-negative number")
    for key, (low, high) in SAMPLING_KEYS.items():
        value = table.get(key)
        if value is None:
            continue
        whole = key != "top_k" or isinstance(value, int)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not whole
            or not low <= value <= high
        ):
            kind = "a whole number" if key == "top_k" else "a number"
            raise _bad(path, where, f"{key} must be {kind} from {low:g} to {high:g}")
    if "role" in table and table["role"] not in ROLES:
        raise _bad(path, where, f"role must be one of {', '.join(ROLES)}")
    synthetic = table.get("synthetic")
    if synthetic is not None and not (
        isinstance(synthetic, dict) and all(isinstance(v, int | float | str) for v in synthetic.values())
    ):
        raise _bad(path, where, "synthetic must be an inline table of numbers, strings and booleans")
    if synthetic is not None:
        from vlmduo.models.fixtures import FAMILIES  # a name table; no builder is imported

        family = synthetic.get("family", "llama")
        if family not in FAMILIES:
            raise _bad(
                path, where, f"synthetic family {family!r} has no fixture builder ({', '.join(FAMILIES)})"
            )


def _reject(table: dict[str, Any], keys: Iterable[str], path: Path, where: str, what: str) -> None:
    for key in keys:
        if key in table:
            raise _bad(path, where, f"'{key}' does not apply to {what}")


def _expand(value: str, origin: Path | None) -> Path:
    # Relative paths in a registry file are relative to that file, so a user can
    # keep models next to their models.toml and move both together.
    path = Path(os.path.expandvars(os.path.expanduser(value)))
    if not path.is_absolute() and origin is not None:
        path = origin.parent / path
    return path.absolute()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _bad(path: Path | None, where: str, problem: str) -> RegistryError:
    return RegistryError(f"{path}: {where} {problem}", hint=f"edit {path}")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _suggest(name: str, choices: Iterable[str]) -> str:
    """'; did you mean a, b?' from close spellings and names containing ``name``."""
    names = sorted(choices)
    lowered = name.lower()
    # A prefix such as "qwen3-vl-2b" most likely means one of the names it is part of.
    close = [n for n in names if lowered and lowered in n.lower()]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    if not close:
        return ""
    return "; did you mean " + ", ".join(close[:3]) + "?"
