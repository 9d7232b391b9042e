"""One image, many questions: the KV state of a prompt up to and including its image, kept.

Everything a model's prompt holds up to and including the image (the chat template's
start, a system text, the image's embeddings) depends only on the model, its projector,
the image, the image-token bounds and the context's batch size: not on the question that
follows. A :class:`Prefix` is that state as llama.cpp serialises one sequence
(``llama_state_seq_get_data``), with the positions it covers; a ``Session`` that finds
one for its prompt restores it (``llama_state_seq_set_data``) instead of preprocessing,
encoding and prefilling the image again, and prefills only the rest.

:class:`PrefixCache` keeps them in memory, least recently used first out past a byte
bound, and optionally on disk (:class:`DiskPrefixes`, across processes). Keys are
digests of everything the state depends on, so no state is restored for another model,
projector, image or setting; a file whose checksum, header or key does not match is
ignored and removed, never handed to llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"VLMDUOKV"
_FORMAT = 1
_HEADER = struct.Struct("<8sII")  # magic, format, JSON metadata length
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_DISK_BYTES = 4 << 30


@dataclass(frozen=True)
class Prefix:
    """A prompt's KV state up to and including its image, and what it stands for."""

    state: bytes  # llama_state_seq_get_data of sequence 0
    n_past: int  # the position after it
    spans: tuple[tuple[int, int, int], ...]  # each image: start position, end position, KV cells
    prompt_tokens: int  # text tokens it holds
    image_tokens: int  # image tokens it holds
    model: str = ""  # the model's name, for `vlmduo cache`
    # The tokens libmtmd puts between the image and the prompt's text after it (an end
    # of image marker): with them a later prompt's rest is tokenized without libmtmd,
    # so the image is not even preprocessed. None: tokenize through libmtmd.
    tail_head: tuple[int, ...] | None = None

    @property
    def tokens(self) -> int:
        """Prompt tokens it saves the next question (text and image)."""
        return self.prompt_tokens + self.image_tokens


def digest(*parts: object) -> str:
    """A key from the parts a prefix depends on (bytes hashed as they are, the rest as JSON)."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        blob = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


class DiskPrefixes:
    """Prefixes as files in a folder private to the user: ``<key>.kv`` (a header with the
    key, the metadata and a checksum, then the state), least recently used first out
    past ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.kv"

    def get(self, key: str) -> Prefix | None:
        """The prefix stored under ``key``; None (and the file removed) when absent or not
        exactly what was written for that key."""
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                meta = _read_meta(handle)
                state = handle.read()  # after the metadata: the state, read once
        except FileNotFoundError:
            return None
        except OSError:
            meta = None
        prefix = _prefix(meta, state, key) if meta is not None else None
        if prefix is None:
            path.unlink(missing_ok=True)  # corrupt, truncated or foreign: rebuilt next time
            return None
        os.utime(path)  # most recently used
        return prefix

    def put(self, key: str, prefix: Prefix) -> None:
        """Store ``prefix`` (atomically; a full or read-only disk costs only speed)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not _private(self.folder):
                return  # never keep states where others can write them
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_header(key, prefix))
                handle.write(prefix.state)
            os.replace(tmp, self._path(key))
        except OSError:
            return
        self.evict()

    def entries(self) -> Iterator[tuple[Path, os.stat_result, dict]]:
        """Each stored file, its stat and its metadata (files that do not parse skipped)."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.kv"):
            try:
                st = path.stat()
                with path.open("rb") as handle:
                    meta = _read_meta(handle)
            except OSError:
                continue
            if meta is not None:
                yield path, st, meta

    def evict(self) -> None:
        """Remove the least recently used files until the rest fit ``max_bytes``."""
        files = sorted(self.entries(), key=lambda item: item[1].st_mtime)
        total = sum(st.st_size for _, st, _ in files)
        for path, st, _ in files:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size

    def clear(self) -> int:
        """Remove every stored prefix; returns the bytes freed."""
        freed = 0
        for path, st, _ in list(self.entries()):
            path.unlink(missing_ok=True)
            freed += st.st_size
        return freed


def _private(folder: Path) -> bool:
    st = folder.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o077


def _header(key: str, prefix: Prefix) -> bytes:
    """What a file holds before the state: the format's header and the JSON metadata."""
    meta = {
        "key": key,
        "n_past": prefix.n_past,
        "spans": [list(span) for span in prefix.spans],
        "prompt_tokens": prefix.prompt_tokens,
        "image_tokens": prefix.image_tokens,
        "model": prefix.model,
        "tail_head": None if prefix.tail_head is None else list(prefix.tail_head),
        "size": len(prefix.state),
        "checksum": hashlib.blake2b(prefix.state, digest_size=20).hexdigest(),
    }
    blob = json.dumps(meta).encode()
    return _HEADER.pack(_MAGIC, _FORMAT, len(blob)) + blob


def _read_meta(handle: BinaryIO) -> dict | None:
    """A file's metadata, read up to where its state begins; None when it is not a
    prefix file of this format."""
    try:
        magic, fmt, size = _HEADER.unpack(handle.read(_HEADER.size))
        meta = json.loads(handle.read(size)) if magic == _MAGIC and fmt == _FORMAT else None
    except (ValueError, struct.error):
        return None
    return meta if isinstance(meta, dict) else None


def _prefix(meta: dict, state: bytes, key: str) -> Prefix | None:
    """The prefix a file's metadata and state stand for, when they are exactly what was
    written under ``key``."""
    try:
        if meta["key"] != key or len(state) != meta["size"]:
            return None
        if hashlib.blake2b(state, digest_size=20).hexdigest() != meta["checksum"]:
            return None
        spans = tuple((int(a), int(b), int(c)) for a, b, c in meta["spans"])
        head = meta.get("tail_head")
        return Prefix(
            state,
            int(meta["n_past"]),
            spans,
            int(meta["prompt_tokens"]),
            int(meta["image_tokens"]),
            str(meta.get("model", "")),
            None if head is None else tuple(int(t) for t in head),
        )
    except (struct.error, ValueError, KeyError, TypeError):
        return None


class PrefixCache:
    """Prefixes in memory (least recently used first out past ``max_bytes``), and on disk
    when ``disk`` is given. Safe to share between threads and models (keys name both)."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, disk: DiskPrefixes | None = None) -> None:
        self.max_bytes = max_bytes
        self.disk = disk
        self._items: OrderedDict[str, Prefix] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> Prefix | None:
        """The prefix for ``key`` from memory, else from disk (then kept in memory too)."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return found
        found = self.disk.get(key) if self.disk is not None else None
        with self._lock:
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._keep(key, found)
        return found

    def put(self, key: str, prefix: Prefix) -> None:
        """Keep ``prefix`` for ``key`` in memory and on disk."""
        with self._lock:
            self._keep(key, prefix)
        if self.disk is not None:
            self.disk.put(key, prefix)

    def _keep(self, key: str, prefix: Prefix) -> None:
        old = self._items.pop(key, None)
        self._bytes -= len(old.state) if old else 0
        if len(prefix.state) > self.max_bytes:
            return
        self._items[key] = prefix
        self._bytes += len(prefix.state)
        while self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= len(dropped.state)

    def stats(self) -> dict[str, int]:
        """Entries, bytes held in memory, hits and misses so far."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
