"""How many threads llama.cpp gets, from the cores other programs leave free.

ggml splits every graph op among its threads and waits for all of them at a barrier
after each one. When another program holds a core, one of our threads sits descheduled
while the others wait for it at every op, and a decode that takes milliseconds on an
idle machine takes seconds (libgomp's waiting threads spin and burn the time slices the
late thread needed). So before each prefill, encode and every few decoded tokens a
context asks :func:`fit` how many threads to use: its share of the cores, scaled by the
share other processes leave free, at least one. One thread has no barrier to wait at.

The load comes from the kernel's accounting (Linux ``/proc``): the CPU time every process
spent over the last half second, minus this process's own, over that wall time; the first
reading, with nothing to compare, and one long after the last, count the other runnable
threads instead.
Where ``/proc`` is absent the configured threads are used as they are.

libgomp's waiting follows the load too (:class:`ShortSpin`): its default spin
(``GOMP_SPINCOUNT``, 300,000 turns, then sleep) while the machine is idle, where a
shorter spin measured slower, and a 100-turn spin while it is busy, where a spinning
thread burns the time slice a descheduled one needs (``benchmarks/busy_machine.py``).
Nothing is set at import. :func:`openmp_settings` reads what libgomp runs with.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import threading
import time
from collections.abc import Mapping

# The load is the CPU time used since a reading at least this old (tick noise over a
# shorter time reads as load) ...
WINDOW_S = 0.3
# ... and at most this old: an average over a longer past (a server's idle minutes, the
# start of the client that sent it the request) is not the load now; with no reading
# that recent the runnable threads are counted instead.
_STALE_S = 0.5
# Readings kept at most this often.
_MIN_INTERVAL_S = 0.05


def fixed_by_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``VLMDUO_FIXED_THREADS`` (set, not "0") keeps the configured threads
    whatever the load."""
    return (os.environ if environ is None else environ).get("VLMDUO_FIXED_THREADS", "") not in ("", "0")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class CpuLoad:
    """The cores other processes kept busy over the last half second (thread-safe)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._lock = threading.Lock()
        # Recent readings, oldest first: (wall s, all busy s, own busy s).
        self._history: collections.deque[tuple[float, float, float]] = collections.deque()
        self._others = 0.0

    def others(self) -> float:
        """Cores' worth of CPU time other processes used recently (0.0 when unknown):
        since the oldest reading of the last half second, once that is ``WINDOW_S`` old (the
        kernel counts all CPUs in 10 ms ticks and this process's time more finely, so
        over 50 ms an idle machine can read as half a core busy)."""
        with self._lock:
            now = self._read()
            if now is None:
                return 0.0
            history = self._history
            while history and now[0] - history[0][0] > _STALE_S:
                history.popleft()
            if not history:
                self._others = self._instant()
            elif now[0] - history[0][0] >= WINDOW_S:
                base = history[0]
                busy = (now[1] - base[1]) - (now[2] - base[2])
                self._others = max(0.0, busy / (now[0] - base[0]))
            if not history or now[0] - history[-1][0] >= _MIN_INTERVAL_S:
                history.append(now)
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


class ShortSpin:
    """libgomp's short spin for this process's OpenMP threads, held while other programs
    keep the cores busy.

    libgomp lets a waiting thread spin ``GOMP_SPINCOUNT`` turns (300,000 by default)
    before it sleeps, but only 100 while the process has more OpenMP threads than CPUs
    (libgomp's manual, GOMP_SPINCOUNT; ``do_spin`` in ``config/linux/wait.h``). Held, a
    parked thread owns a team of ``cores + 1`` OpenMP threads asleep on a futex: they cost
    no CPU, but libgomp counts them, so every barrier in the process waits passively, as
    with ``GOMP_SPINCOUNT=0``. Released, the parked thread ends, libgomp frees its team
    and the default spin, which an idle machine's decode needs, is back. The environment
    is read once, when libgomp loads; this is the only switch it has at run time.
    """

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._busy_at = 0.0

    @property
    def held(self) -> bool:
        """True while the short spin is held."""
        return self._stop is not None

    def follow(self, busy: bool, settle_s: float = 2.0) -> bool:
        """Hold the short spin while ``busy``; release it once the last busy reading is
        ``settle_s`` old (a passing lull does not start and end teams back and forth, and
        the first reading after a long pause releases at once). Returns ``held``."""
        with self._lock:
            now = time.monotonic()
            if busy:
                self._busy_at = now
                if self._stop is None:
                    self._stop = _park_team((self.cores or available_cores()) + 1)
            elif self._stop is not None and now - self._busy_at >= settle_s:
                self._stop.set()
                self._stop = None
            return self._stop is not None


def _libgomp_function(name: str) -> ctypes._CFuncPtr | None:
    """``name`` in the libgomp this process has loaded (never loading it); None when
    there is none (llama.cpp not loaded yet, or built without OpenMP)."""
    try:
        return getattr(ctypes.CDLL("libgomp.so.1", mode=getattr(os, "RTLD_NOLOAD", 4)), name)
    except (OSError, AttributeError):
        return None


def _park_team(n_threads: int) -> threading.Event | None:
    """Start a daemon thread that opens an OpenMP team of ``n_threads`` (each runs
    ``free(NULL)``, nothing) and waits; setting the returned event ends it and its team.
    None when no libgomp is loaded in this process."""
    parallel = _libgomp_function("GOMP_parallel")
    if parallel is None:
        return None
    nothing = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p)
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    stop, started = threading.Event(), threading.Event()

    def park() -> None:
        parallel(nothing, None, n_threads, 0)  # the team stays in this thread's pool
        started.set()
        stop.wait()  # on exit libgomp frees the pool, and uncounts its threads

    threading.Thread(target=park, name="vlmduo-short-spin", daemon=True).start()
    started.wait(timeout=5.0)
    return stop


_load = CpuLoad()
_spin = ShortSpin()
# Other programs' cores' worth of CPU time from which the machine counts as busy.
_BUSY_CORES = 0.5


def waits() -> str:
    """How libgomp's waiting threads wait now: ``"short spin"`` while the machine counts
    as busy (:class:`ShortSpin` held), else ``"default"`` (libgomp's own settings)."""
    return "short spin" if _spin.held else "default"


def is_busy(others: float) -> bool:
    """Whether other programs' ``others`` cores' worth of CPU time makes the machine busy
    (libgomp's short spin held)."""
    return others >= _BUSY_CORES


def fit(share: int, cores: int | None = None, load: CpuLoad | None = None) -> int:
    """Threads for a context allowed ``share`` of the ``cores``: its share of what other
    processes leave free, rounded, at least one. With the process's own reading (no
    ``load`` given) it also holds libgomp's short spin while the machine is busy."""
    cores = cores or available_cores()
    others = (load or _load).others()
    if load is None:
        _spin.follow(is_busy(others))
    free = max(0.0, cores - others)
    return max(1, min(share, int(free * min(share, cores) / cores + 0.5)))


def openmp_settings() -> dict[str, str] | None:
    """The settings libgomp runs with in this process, as it prints them
    (``omp_display_env``): ``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY``, ... None when no
    libgomp is loaded (llama.cpp not loaded yet, or built without OpenMP)."""
    display = _libgomp_function("omp_display_env")
    if display is None:
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
