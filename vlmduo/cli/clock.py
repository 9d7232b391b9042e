"""How long this process has run: everything the user waited for, interpreter start included.

On Linux the kernel records when a process started (``/proc/self/stat``, field 22, in
clock ticks since boot, on the same clock as ``CLOCK_BOOTTIME``), so the figure covers
the interpreter's start, every import and the console script itself, to a resolution
of one clock tick (10 ms on most systems). Elsewhere it counts from the first line of
``vlmduo.cli`` to run, which leaves out the interpreter's start (tens of milliseconds).
"""

from __future__ import annotations

import os
import sys
import time

from vlmduo.cli import STARTED


def _since_exec_s() -> float | None:
    """Seconds since this process started, from the kernel; None where it cannot say."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
        # Field 2 (the command name) may hold spaces and parentheses: count after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        start_ticks = int(fields[19])  # field 22 of the whole line
        ticks = os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return now - start_ticks / ticks


def process_ms() -> tuple[float, str]:
    """Milliseconds since this process started, and where they are counted from:
    ``"start"`` (the kernel's record of the process start) or ``"import"`` (vlmduo.cli's first line).

    For a thin client answered by a server, the client's process: what it had run
    when it sent the request, plus the server's time since."""
    # Not imported by a thin client (11 ms of its start); no client terminal without it.
    terminal = sys.modules.get("vlmduo.cli.terminal")
    remote = terminal.current() if terminal is not None else None
    if remote is not None:
        return remote.process_ms(), "start"
    in_process = time.perf_counter() - STARTED
    since_exec = _since_exec_s()
    # A kernel figure below what this process measured itself is not to be trusted.
    if since_exec is not None and since_exec >= in_process:
        return since_exec * 1000.0, "start"
    return in_process * 1000.0, "import"
