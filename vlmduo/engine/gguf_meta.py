"""GGUF headers read by llama.cpp's own reader (ggml's ``gguf_init_from_file``).

``gguf.GGUFReader`` materialises every array (a 151k-token vocabulary and its
merges) as numpy objects, which took seconds per model, and a Python walker
still spent ~50 ms stepping over 151k strings. ggml's reader, already loaded
with llama.cpp, parses the header in C without touching tensor data, checks
every length and offset as it goes, and returns NULL on malformed bytes
rather than aborting. We read the few keys vlmduo needs from it.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"

# enum gguf_type -> the getter that reads a scalar of it (8 = string, 9 = array).
_GETTERS = {
    0: ("gguf_get_val_u8", ctypes.c_uint8),
    1: ("gguf_get_val_i8", ctypes.c_int8),
    2: ("gguf_get_val_u16", ctypes.c_uint16),
    3: ("gguf_get_val_i16", ctypes.c_int16),
    4: ("gguf_get_val_u32", ctypes.c_uint32),
    5: ("gguf_get_val_i32", ctypes.c_int32),
    6: ("gguf_get_val_f32", ctypes.c_float),
    7: ("gguf_get_val_bool", ctypes.c_bool),
    8: ("gguf_get_val_str", ctypes.c_char_p),
    10: ("gguf_get_val_u64", ctypes.c_uint64),
    11: ("gguf_get_val_i64", ctypes.c_int64),
    12: ("gguf_get_val_f64", ctypes.c_double),
}
_ARRAY = 9


class GgufFormatError(ValueError):
    """The bytes are not a well-formed GGUF header."""


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies, relative to the start of the data section."""

    name: str
    offset: int
    n_bytes: int


@dataclass
class GgufHeader:
    """Metadata (scalars and strings; arrays as their lengths) and tensor extents."""

    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_start: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        """A scalar or string value, ``default`` when absent."""
        return self.metadata.get(key, default)


@functools.cache
def _lib() -> ctypes.CDLL:
    """ggml-base as llama-cpp-python ships it (already loaded in this process by llama.cpp)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not candidates:
        raise OSError(f"ggml-base library not found in {folder}")
    lib = ctypes.CDLL(str(candidates[0]))
    vp, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], vp),
        "gguf_free": ([vp], None),
        "gguf_get_n_kv": ([vp], i64),
        "gguf_get_key": ([vp, i64], ctypes.c_char_p),
        "gguf_get_kv_type": ([vp, i64], ctypes.c_int),
        "gguf_get_arr_n": ([vp, i64], size),
        "gguf_get_n_tensors": ([vp], i64),
        "gguf_get_tensor_name": ([vp, i64], ctypes.c_char_p),
        "gguf_get_tensor_offset": ([vp, i64], size),
        "gguf_get_tensor_size": ([vp, i64], size),
        "gguf_get_data_offset": ([vp], size),
    }
    signatures.update({name: ([vp, i64], kind) for name, kind in _GETTERS.values()})
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def read_header(path: Path) -> GgufHeader:
    """Parse ``path``'s header; GgufFormatError on malformed bytes, OSError on I/O.

    The reader logs why it refused a file through ggml's logger, which vlmduo
    routes into its own buffer (``engine.logs``): quoted in the error message.
    """
    from vlmduo.engine import logs

    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise GgufFormatError("no GGUF magic")
    logs.install()
    lib = _lib()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise GgufFormatError(logs.last_error("malformed header"))
    try:
        return _collect(lib, ctx)
    finally:
        lib.gguf_free(ctx)


def _collect(lib: ctypes.CDLL, ctx: int) -> GgufHeader:
    header = GgufHeader(data_start=lib.gguf_get_data_offset(ctx))
    for i in range(lib.gguf_get_n_kv(ctx)):
        key = lib.gguf_get_key(ctx, i).decode(errors="replace")
        kind = lib.gguf_get_kv_type(ctx, i)
        if kind == _ARRAY:
            header.array_lengths[key] = lib.gguf_get_arr_n(ctx, i)
        elif kind in _GETTERS:
            value = getattr(lib, _GETTERS[kind][0])(ctx, i)
            header.metadata[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    for i in range(lib.gguf_get_n_tensors(ctx)):
        name = lib.gguf_get_tensor_name(ctx, i).decode(errors="replace")
        header.tensors.append(
            TensorInfo(name, lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i))
        )
    return header
