"""Model files on disk: download from the Hugging Face Hub, find, remove.

Files live in the standard Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), shared
with every other tool that uses it; nothing here keeps a state file of its own.
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are read on every call rather than
at import, so a long-lived process and the tests see the current environment.

A download streams into ``blobs/<etag>.incomplete`` (the cache's own name for a partial
file) and continues from there after a cut connection, a Ctrl-C or a crash; then
``hf_hub_download`` links the finished blob into the snapshot, as if it had fetched it.
huggingface_hub itself deletes partial files when a process stops, which is why the
bytes are fetched here.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    scan_cache_dir,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import WeakFileLock, build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils import tqdm as hf_tqdm

from vlmduo import __version__
from vlmduo.errors import ChecksumError, DiskSpaceError, DownloadError, ModelError, OfflineError, UsageError
from vlmduo.models.offline import offline_mode
from vlmduo.models.registry import ModelEntry, Registry, load_registry

# Room left free after a download, so a pull never fills a disk to the last byte.
_DISK_MARGIN = 64 * 1024 * 1024
# Attempts in a row that bring no new byte before a download gives up.
_MAX_STALLS = 3


@dataclass(frozen=True)
class EntryStatus:
    """What of an entry is on disk, for listings."""

    downloaded: bool
    size_bytes: int
    model_path: Path | None
    mmproj_path: Path | None


@dataclass(frozen=True)
class _Wanted:
    entry: ModelEntry
    filename: str
    sha256: str | None


@dataclass(frozen=True)
class _Plan:
    wanted: _Wanted
    url: str  # where the bytes are, after the Hub's redirect
    size: int | None
    blob: Path

    @property
    def partial(self) -> Path:
        return self.blob.with_name(self.blob.name + ".incomplete")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment as huggingface_hub does."""
    env = os.environ
    value = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not value:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        value = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hub_endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cached_files(entry: ModelEntry) -> tuple[Path | None, Path | None]:
    """The entry's model and projector if already on disk; never touches the network."""
    if entry.source == "remote":  # served by its endpoint: no files here
        return None, None
    if entry.source == "synthetic":
        from vlmduo.models.synthetic import synthetic_paths

        paths = synthetic_paths(entry.name, entry.synthetic or {})
    elif entry.source == "local":
        paths = (entry.path, entry.mmproj_path)
    else:
        cache = hub_cache_dir()
        paths = tuple(_cached(entry, filename, cache) for filename in (entry.file, entry.mmproj))
    model, mmproj = (p if p is not None and p.is_file() else None for p in paths)
    return model, mmproj


def entry_status(entry: ModelEntry) -> EntryStatus:
    """Whether both files of ``entry`` are on disk and how many bytes they take."""
    model, mmproj = cached_files(entry)
    size = sum(p.stat().st_size for p in (model, mmproj) if p is not None)
    return EntryStatus(model is not None and mmproj is not None, size, model, mmproj)


def ensure_files(entry: ModelEntry, *, offline: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """The entry's (model, mmproj) paths, downloading or building what is missing.

    With both files cached this makes no network request at all. Offline (``offline``
    or ``HF_HUB_OFFLINE=1``) with a file missing raises OfflineError naming the
    ``vlmduo pull`` command to run.
    """
    return _ensure_many([entry], offline=offline, progress=progress)[entry.name]


def pull(
    names: Sequence[str],
    pair: str | None = None,
    *,
    registry: Registry | None = None,
    offline: bool = False,
    progress: bool = True,
) -> list[tuple[ModelEntry, Path, Path]]:
    """Download the named models and the two models of ``pair``; return their files."""
    registry = load_registry() if registry is None else registry
    if not names and pair is None:
        raise UsageError("name at least one model, or a pair with --pair", hint="run: vlmduo models")
    entries = [registry.model(name) for name in names]
    if pair is not None:
        entries.extend(registry.pair_models(pair))
    unique = list({entry.name: entry for entry in entries}.values())
    paths = _ensure_many(unique, offline=offline, progress=progress)
    return [(entry, *paths[entry.name]) for entry in unique]


def remove(entry: ModelEntry, *, registry: Registry | None = None) -> int:
    """Delete the entry's files from the cache and return the bytes freed.

    A file that another downloaded entry of ``registry`` also uses (a projector shared
    by two quantisations of one repo) is kept. Local entries are the user's own files and
    are never deleted.
    """
    if entry.source == "remote":
        raise UsageError(f"'{entry.name}' is served by {entry.endpoint}; there are no files to remove")
    if entry.source == "local":
        raise UsageError(
            f"'{entry.name}' names your own files; vlmduo does not delete them",
            hint=f"remove the entry from {entry.origin} instead",
        )
    if entry.source == "synthetic":
        return _remove_synthetic(entry)
    cache = hub_cache_dir()
    try:
        info = scan_cache_dir(cache)
    except hf_errors.CacheNotFound:
        return 0
    shared = _files_used_elsewhere(entry, registry)
    wanted = {entry.file, entry.mmproj} - shared
    files = [
        cached_file
        for repo in info.repos
        if repo.repo_type == "model" and repo.repo_id == entry.repo
        for revision in repo.revisions
        for cached_file in revision.files
        if cached_file.file_path.relative_to(revision.snapshot_path).as_posix() in wanted
    ]
    if not files:
        return 0
    strategy = info.delete_files(*files)
    strategy.execute()
    _prune_repo(cache / _repo_folder(entry.repo or ""))
    return strategy.expected_freed_size


# --- downloading ---------------------------------------------------------------------


def _ensure_many(
    entries: Sequence[ModelEntry], *, offline: bool, progress: bool
) -> dict[str, tuple[Path, Path]]:
    found: dict[str, tuple[Path, Path]] = {}
    missing: list[_Wanted] = []
    unavailable: list[str] = []  # offline and not on disk: every one named in one error
    for entry in entries:
        if entry.source == "remote":
            raise UsageError(f"'{entry.name}' is served by {entry.endpoint}; there is nothing to download")
        if entry.source == "synthetic":
            from vlmduo.models.synthetic import ensure_built

            found[entry.name] = ensure_built(entry.name, entry.synthetic or {})
            continue
        model, mmproj = cached_files(entry)
        if model is not None and mmproj is not None:
            found[entry.name] = (model, mmproj)
        elif entry.source == "local":
            raise ModelError(
                f"file of '{entry.name}' not found: {entry.path if model is None else entry.mmproj_path}",
                hint=f"fix [models.{entry.name}] in {entry.origin}",
            )
        elif offline_mode(offline):
            unavailable.append(entry.name)
        else:
            if model is None:
                missing.append(_Wanted(entry, entry.file or "", entry.sha256))
            if mmproj is None:
                missing.append(_Wanted(entry, entry.mmproj or "", entry.mmproj_sha256))
    if unavailable:
        listed = " and ".join(f"'{name}'" for name in unavailable)
        raise OfflineError(
            f"{listed} {'is' if len(unavailable) == 1 else 'are'} not downloaded and offline mode is on",
            hint=f"once online, unset HF_HUB_OFFLINE (or drop --offline) and run: "
            f"vlmduo pull {' '.join(unavailable)}",
        )
    # One download per file even when two entries share it (a projector, say).
    missing = list({(w.entry.repo, w.filename, w.entry.revision): w for w in missing}.values())
    # Ask the Hub for every size first, so a pull that cannot fit fails before it starts.
    plans = [_plan(wanted) for wanted in missing]
    _check_disk_space(plans)
    for plan in plans:
        _fetch(plan, progress=progress)
    for entry in entries:
        if entry.name not in found:
            model, mmproj = cached_files(entry)
            if model is None or mmproj is None:
                raise DownloadError(f"'{entry.name}' is still incomplete after the download")
            found[entry.name] = (model, mmproj)
    return found


def _plan(wanted: _Wanted) -> _Plan:
    entry = wanted.entry
    endpoint = hub_endpoint()
    url = hf_hub_url(entry.repo or "", wanted.filename, revision=entry.revision, endpoint=endpoint)
    with _mapped_errors(wanted):
        meta = get_hf_file_metadata(
            url, endpoint=endpoint, library_name="vlmduo", library_version=__version__
        )
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(
            f"{endpoint} did not answer like the Hugging Face Hub for {wanted.filename}",
            hint="check HF_ENDPOINT",
        )
    blob = hub_cache_dir() / _repo_folder(entry.repo or "") / "blobs" / meta.etag
    return _Plan(wanted, meta.location, meta.size, blob)


def _check_disk_space(plans: Sequence[_Plan]) -> None:
    need = sum(max((plan.size or 0) - _size(plan.partial), 0) for plan in plans if not plan.blob.exists())
    if need == 0:
        return
    probe = hub_cache_dir()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + _DISK_MARGIN > free:
        names = " ".join(dict.fromkeys(plan.wanted.entry.name for plan in plans))
        raise DiskSpaceError(
            f"not enough disk space: the download needs {_gb(need)}, {probe} has {_gb(free)} free",
            hint=f"free some space or point HF_HOME at a larger disk, then run: vlmduo pull {names}",
        )


def _fetch(plan: _Plan, *, progress: bool) -> None:
    """Download one file into its blob (resuming a partial one) and link it."""
    wanted, entry = plan.wanted, plan.wanted.entry
    if not plan.blob.exists():
        plan.blob.parent.mkdir(parents=True, exist_ok=True)
        lock = hub_cache_dir() / ".locks" / _repo_folder(entry.repo or "") / f"{plan.blob.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        # The same lock huggingface_hub takes for this blob: two pulls (or a pull and
        # `hf download`) never write the same partial file at once.
        with WeakFileLock(lock), _mapped_errors(wanted):
            if not plan.blob.exists():
                _stream(plan, progress=progress)
                _verify(plan)
                os.replace(plan.partial, plan.blob)
    # The blob is complete: hf_hub_download now only writes the snapshot link and ref.
    with _mapped_errors(wanted):
        hf_hub_download(
            entry.repo or "",
            wanted.filename,
            revision=entry.revision,
            cache_dir=hub_cache_dir(),
            endpoint=hub_endpoint(),
            library_name="vlmduo",
            library_version=__version__,
        )


def _stream(plan: _Plan, *, progress: bool) -> None:
    """Fetch the missing bytes of ``plan.partial``, retrying cut connections."""
    headers = build_hf_headers(library_name="vlmduo", library_version=__version__)
    if urlsplit(plan.url).netloc != urlsplit(hub_endpoint()).netloc:
        headers.pop("authorization", None)  # a CDN's signed URL must not see the token
    stalls = 0
    bar = hf_tqdm(
        total=plan.size,
        initial=_size(plan.partial),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=plan.wanted.filename,
        disable=not progress,
    )
    with bar:
        while True:
            before = _size(plan.partial)
            if plan.size is not None and before > plan.size:
                plan.partial.unlink()  # not a prefix of this file: start over
                continue
            if plan.size is not None and before == plan.size:
                return
            error: BaseException | None = None
            try:
                _get(plan.url, plan.partial, before, headers, bar)
                if plan.size is None:
                    return  # no announced size: a stream that ended cleanly is the file
            except _network_errors() as exc:
                error = exc
            # Retry for as long as each attempt brings new bytes; give up after a few that don't.
            stalls = 0 if _size(plan.partial) > before else stalls + 1
            if stalls >= _MAX_STALLS:
                if error is not None:
                    raise error
                raise DownloadError(f"the server stopped sending {plan.wanted.filename}")
            time.sleep(0.5 * stalls)


def _get(url: str, partial: Path, offset: int, headers: dict[str, str], bar: Any) -> None:
    request_headers = dict(headers)
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with get_session().stream(
        "GET", url, headers=request_headers, follow_redirects=True, timeout=timeout
    ) as response:
        hf_raise_for_status(response)
        mode = "ab"
        if offset and response.status_code != 206:
            # The server ignored the Range header: start over rather than append a copy.
            mode = "wb"
            bar.reset(total=bar.total)
        with partial.open(mode) as out:
            # Unbuffered iteration: every byte received is on disk if the line drops.
            for chunk in response.iter_bytes():
                out.write(chunk)
                bar.update(len(chunk))


def _verify(plan: _Plan) -> None:
    pin = plan.wanted.sha256
    if not pin:
        return
    digest = hashlib.sha256()
    with plan.partial.open("rb") as handle:
        for block in iter(functools.partial(handle.read, 1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != pin:
        plan.partial.unlink(missing_ok=True)
        entry = plan.wanted.entry
        raise ChecksumError(
            f"checksum mismatch for {plan.wanted.filename} of '{entry.name}': expected "
            f"{pin[:12]}..., got {actual[:12]}...; the downloaded file was deleted",
            hint=f"a transfer error goes away if you run it again; if the same mismatch returns, "
            f"fix 'sha256' of [models.{entry.name}] in {entry.origin}",
        )


@contextmanager
def _mapped_errors(wanted: _Wanted) -> Iterator[None]:
    """Turn huggingface_hub, network and disk errors into one-line DownloadErrors.

    Only ``Exception`` is caught: KeyboardInterrupt propagates (the CLI exits 130) and
    the partial file stays for the next pull to resume.
    """
    try:
        yield
    except Exception as exc:
        mapped = _download_error(exc, wanted)
        if mapped is None:
            raise
        raise mapped from exc


def _download_error(exc: Exception, wanted: _Wanted) -> DownloadError | None:
    # A hint never repeats the command that just failed as if it could work now: it says
    # what to change first, and "run it again" only where a retry can succeed.
    entry, filename = wanted.entry, wanted.filename
    repo, where = entry.repo, f"[models.{entry.name}] in {entry.origin}"
    endpoint = hub_endpoint()
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError(
            f"{repo} is gated: accept its terms on the Hub and use a token",
            hint=f"accept the terms at {endpoint}/{repo}, run: hf auth login (or set HF_TOKEN), "
            "then run it again",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return DownloadError(
            f"repository {repo} not found on {endpoint} (or it is private)",
            hint=f"check 'repo' of {where} and HF_ENDPOINT; a private repo needs HF_TOKEN",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return DownloadError(
            f"revision {entry.revision} not found in {repo}", hint=f"check 'revision' of {where}"
        )
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return DownloadError(
            f"file {filename} not found in {repo}", hint=f"check 'file' and 'mmproj' of {where}"
        )
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return OfflineError(
            f"'{entry.name}' needs a download and offline mode is on",
            hint=f"run: vlmduo pull {entry.name} (online, with HF_HUB_OFFLINE unset)",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        message = f"the Hub answered HTTP {status} for {filename} of {repo}"
        if status in (401, 403):
            hint = f"set HF_TOKEN to a token that can read {repo}, then run it again"
        elif status == 404:
            hint = f"check 'repo', 'file', 'mmproj' and 'revision' of {where}, and HF_ENDPOINT ({endpoint})"
        elif isinstance(status, int) and (status == 429 or status >= 500):
            hint = f"{endpoint} is busy or down: wait a while, then run it again (it resumes)"
        else:
            hint = f"check HF_ENDPOINT ({endpoint}) and {where}"
        return DownloadError(message, hint=hint)
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, *_network_errors())):
        return DownloadError(
            f"cannot reach {endpoint}: {_first_line(exc)}",
            hint="check the network, a proxy or HF_ENDPOINT, then run it again (it resumes)",
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskSpaceError(
            f"disk full while downloading {filename}",
            hint="free some space or point HF_HOME at a larger disk, then run it again (it resumes)",
        )
    if isinstance(exc, OSError):
        return DownloadError(
            f"download of {filename} failed: {_first_line(exc)}",
            hint=f"check that {hub_cache_dir()} is writable (or set HF_HOME), then run it again",
        )
    return None


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x speaks through httpx2, 1.x through httpx: take whichever is there.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# --- the cache -----------------------------------------------------------------------


def _cached(entry: ModelEntry, filename: str | None, cache: Path) -> Path | None:
    if not filename or not cache.is_dir():
        return None
    found = try_to_load_from_cache(entry.repo or "", filename, cache_dir=cache, revision=entry.revision)
    return Path(found) if isinstance(found, str) else None


def _repo_folder(repo: str) -> str:
    # The cache's documented layout: models--{owner}--{name}.
    return "models--" + repo.replace("/", "--")


def _files_used_elsewhere(entry: ModelEntry, registry: Registry | None) -> set[str]:
    """Files of ``entry``'s repo that another fully downloaded entry still needs."""
    if registry is None:
        return set()
    return {
        filename
        for other in registry.models.values()
        if other.name != entry.name
        and other.is_hub
        and other.repo == entry.repo
        and other.revision == entry.revision
        and all(cached_files(other))
        for filename in (other.file, other.mmproj)
        if filename
    }


def _prune_repo(repo_path: Path) -> None:
    """Remove empty snapshot folders, and the repo folder once no file is left in it."""
    snapshots = repo_path / "snapshots"
    if not snapshots.is_dir():
        return
    for folder in sorted(snapshots.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    if not any(snapshots.iterdir()):
        # Refs, partial downloads and .no_exist markers of a repo we no longer hold.
        shutil.rmtree(repo_path, ignore_errors=True)


def _remove_synthetic(entry: ModelEntry) -> int:
    from vlmduo.models.synthetic import synthetic_paths

    freed = 0
    paths = synthetic_paths(entry.name, entry.synthetic or {})
    for path in paths:
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    folder = paths[0].parent
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return freed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]
