"""Keep llama.cpp's log lines off the terminal unless the user asks for them.

llama.cpp, ggml and libmtmd log through callbacks. We install one that keeps
the last lines in memory, so a failure can quote llama.cpp's own reason in one
line, and forwards them to stderr only in verbose mode. Each line remembers the
thread that logged it: with two models working on two threads, an error is
explained by its own model's lines, not by the other one's.
"""

from __future__ import annotations

import collections
import ctypes
import sys
import threading

_lock = threading.Lock()
_recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=400)
_state = {"verbose": False, "installed": False}
_callback_ref: list[object] = []  # ctypes callbacks must outlive their registration
_ERROR_WORDS = ("error", "failed", "unable", "mismatch")


def _on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if not text:
        return
    line = text.decode("utf-8", errors="replace")
    with _lock:
        _recent.append((threading.get_ident(), line))
    if _state["verbose"]:
        sys.stderr.write(line)


def install(verbose: bool | None = None) -> None:
    """Route llama.cpp, ggml and libmtmd logs through us (idempotent); ``verbose``
    also echoes them to stderr (None leaves that as it was)."""
    if verbose is not None:
        _state["verbose"] = verbose
    if _state["installed"]:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    callback = llama_cpp.llama_log_callback(_on_log)
    _callback_ref.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    _state["installed"] = True


def _own_lines() -> list[str]:
    me = threading.get_ident()
    with _lock:
        return [line for thread, line in _recent if thread == me]


def last_error(default: str = "") -> str:
    """The most recent error-looking line logged by this thread, stripped."""
    for line in reversed(_own_lines()):
        if any(word in line.lower() for word in _ERROR_WORDS):
            return " ".join(line.split())
    return default


def recent_lines(n: int = 20) -> list[str]:
    """The last ``n`` log lines of any thread (for --verbose diagnostics and doctor)."""
    with _lock:
        return [line for _, line in list(_recent)[-n:]]
