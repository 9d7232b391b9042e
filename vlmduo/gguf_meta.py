"""A fast reader of GGUF headers: the few metadata keys vlmduo needs, in milliseconds.

``gguf.GGUFReader`` materialises every array (a 151k-token vocabulary and its
merges) as numpy objects, which took seconds per model. This walker reads the
header through ``mmap``, keeps scalars and strings, and steps over arrays by
their lengths without building them.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"

# GGUF value types -> struct format of scalars (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GgufFormatError(ValueError):
    """The bytes are not a well-formed GGUF header."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies, relative to the start of the data section."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first
    ggml_type: int
    offset: int


@dataclass
class GgufHeader:
    """Metadata (arrays as their lengths) and tensor infos of one file."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_start: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        """A scalar or string value, ``default`` when absent."""
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as exc:
            raise GgufFormatError(f"header ends early at byte {self.pos}") from exc
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GgufFormatError(f"a string runs past the end of the file at byte {self.pos}")
        text = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_strings(self, count: int) -> None:
        # The hot loop of a 151k-token vocabulary: lengths only, no decoding.
        buf, pos, unpack = self.buf, self.pos, struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error as exc:
            raise GgufFormatError("a string array runs past the end of the file") from exc
        self.pos = pos


def read_header(path: Path) -> GgufHeader:
    """Parse ``path``'s header; raises GgufFormatError on malformed bytes, OSError on I/O."""
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise GgufFormatError("no GGUF magic")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf)


def _parse(buf: Any) -> GgufHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise GgufFormatError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    header = GgufHeader(version=version)
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("I")
        if vtype == _ARRAY:
            header.array_lengths[key] = _skip_array(cur)
        else:
            header.metadata[key] = _value(cur, vtype)
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        shape = tuple(cur.take("Q") for _ in range(n_dims))
        header.tensors.append(TensorInfo(name, shape, cur.take("I"), cur.take("Q")))
    alignment = int(header.metadata.get("general.alignment", 32))
    header.data_start = (cur.pos + alignment - 1) // alignment * alignment
    return header


def _value(cur: _Cursor, vtype: int) -> Any:
    if vtype == _STRING:
        return cur.string()
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise GgufFormatError(f"unknown value type {vtype}")
    return cur.take(fmt)


def _skip_array(cur: _Cursor) -> int:
    item_type, count = cur.take("I"), cur.take("Q")
    if item_type == _STRING:
        cur.skip_strings(count)
    elif item_type == _ARRAY:
        for _ in range(count):
            _skip_array(cur)
    else:
        fmt = _SCALARS.get(item_type)
        if fmt is None:
            raise GgufFormatError(f"unknown array item type {item_type}")
        cur.pos += struct.calcsize("<" + fmt) * count
    return count
