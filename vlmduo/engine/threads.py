"""How many threads llama.cpp gets, from the cores other programs leave free.

ggml splits every graph op among its threads and waits for all of them at a barrier
after each one. When another program holds a core, one of our threads sits descheduled
while the others wait for it at every op, and a decode that takes milliseconds on an
idle machine takes seconds (libgomp's waiting threads spin and burn the time slices the
late thread needed). So before each prefill, encode and every few decoded tokens a
context asks :func:`fit` how many threads to use: its share of the cores, scaled by the
share other processes leave free, at least one. One thread has no barrier to wait at.

The load comes from the kernel's accounting (Linux ``/proc``): the CPU time every process
spent between two readings, minus this process's own, over the wall time between them;
the first reading, with nothing to compare, counts the other runnable threads instead.
Where ``/proc`` is absent the configured threads are used as they are.

libgomp's own waiting policy is left as it is (spin ``GOMP_SPINCOUNT``, 300,000 by
default, then sleep): with one thread per context under load there is no barrier to
spin at, and on an idle machine a shorter spin measured slower (see
``benchmarks/busy_machine.py``). :func:`openmp_settings` reads what libgomp runs with.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time

# Readings closer than this are not compared (the kernel counts in 10 ms ticks).
_MIN_INTERVAL_S = 0.05


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class CpuLoad:
    """The cores other processes keep busy, re-read at most every 50 ms (thread-safe)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # (wall s, all busy s, own busy s)
        self._others = 0.0

    def others(self) -> float:
        """Cores' worth of CPU time other processes used recently (0.0 when unknown)."""
        with self._lock:
            now = self._read()
            if now is None:
                return 0.0
            if self._last is None:
                self._others = self._instant()
                self._last = now
            elif now[0] - self._last[0] >= _MIN_INTERVAL_S:
                wall = now[0] - self._last[0]
                busy = (now[1] - self._last[1]) - (now[2] - self._last[2])
                self._others = max(0.0, busy / wall)
                self._last = now
            return self._others

    def _read(self) -> tuple[float, float, float] | None:
        try:
            with open(os.path.join(self.proc, "stat"), "rb") as handle:
                fields = handle.readline().split()[1:]
            with open(os.path.join(self.proc, "self", "stat"), "rb") as handle:
                own = handle.read()
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        values = [int(x) for x in fields]
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guests are in user
        busy = sum(values[:8]) - values[3] - values[4]
        after = own[own.rindex(b")") + 2 :].split()
        mine = int(after[11]) + int(after[12])  # utime, stime (fields 14 and 15)
        return time.monotonic(), busy / tick, mine / tick

    def _instant(self) -> float:
        """Other runnable threads right now: the kernel's count minus this process's own."""
        try:
            with open(os.path.join(self.proc, "stat"), "rb") as handle:
                running = next(int(line.split()[1]) for line in handle if line.startswith(b"procs_running"))
            task = os.path.join(self.proc, "self", "task")
            mine = 0
            for tid in os.listdir(task):
                try:
                    with open(os.path.join(task, tid, "stat"), "rb") as handle:
                        stat = handle.read()
                except OSError:
                    continue  # a thread that ended meanwhile
                mine += stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"R"
        except (OSError, StopIteration, ValueError):
            return 0.0
        return float(max(0, running - mine))


_load = CpuLoad()


def fit(share: int, cores: int | None = None, load: CpuLoad | None = None) -> int:
    """Threads for a context allowed ``share`` of the ``cores``: its share of what other
    processes leave free, rounded, at least one."""
    cores = cores or available_cores()
    free = max(0.0, cores - (load or _load).others())
    return max(1, min(share, int(free * min(share, cores) / cores + 0.5)))


def openmp_settings() -> dict[str, str] | None:
    """The settings libgomp runs with in this process, as it prints them
    (``omp_display_env``): ``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY``, ... None when no
    libgomp is loaded (llama.cpp not loaded yet, or built without OpenMP)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=getattr(os, "RTLD_NOLOAD", 4))
        display = gomp.omp_display_env
    except (OSError, AttributeError):
        return None
    display.argtypes = [ctypes.c_int]
    read, write = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(write, 2)  # it prints on the C library's stderr
        display(1)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    text = b"".join(chunks).decode(errors="replace")
    return dict(re.findall(r"^\s*(?:\[\w+\]\s*)?(\w+) = '([^']*)'", text, re.MULTILINE))
