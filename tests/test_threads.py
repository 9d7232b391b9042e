"""Threads that follow the load: the kernel's accounting read right, the fit table-driven,
and a whole ask on a machine the test makes busy (never a timing threshold: the threads
llama.cpp ran each stage with, as the process reports them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_cli

from vlmduo.engine import threads

CORES = threads.available_cores()


def _fake_proc(root: Path, busy_ticks: int, own_ticks: int, running: int = 1, own_running: int = 1) -> None:
    """A /proc with the fields CpuLoad reads: the CPU line (user nice system idle iowait
    irq softirq steal), procs_running, this process's utime/stime and its threads."""
    (root / "self" / "task").mkdir(parents=True, exist_ok=True)
    user = busy_ticks - 10
    (root / "stat").write_text(f"cpu  {user} 0 10 5000 7 0 0 0 0 0\ncpu0 1 2 3\nprocs_running {running}\n")
    stat = "42 (py thon) S " + " ".join(["0"] * 10) + f" {own_ticks} 0 0 0"
    (root / "self" / "stat").write_text(stat)
    for tid in range(own_running):
        (root / "self" / "task" / str(tid)).mkdir(exist_ok=True)
        (root / "self" / "task" / str(tid) / "stat").write_text(f"{tid} (worker) R 1")


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The monotonic clock CpuLoad reads, moved by the test."""
    now = [100.0]
    monkeypatch.setattr(threads.time, "monotonic", lambda: now[0])
    return now


TICK = os.sysconf("SC_CLK_TCK")


def test_cpu_load_is_other_processes_cpu_time_over_wall_time(tmp_path, clock):
    tick = TICK
    _fake_proc(tmp_path, busy_ticks=1000, own_ticks=300, running=4, own_running=1)
    load = threads.CpuLoad(str(tmp_path))
    assert load.others() == 3.0  # first reading: other runnable threads (4 running, 1 ours)
    # 0.4 s later: all processes used a core's worth of CPU time, this one a quarter.
    clock[0] += 0.4
    _fake_proc(tmp_path, busy_ticks=1000 + tick, own_ticks=300 + tick // 4)
    assert load.others() == pytest.approx(0.75 / 0.4, abs=0.02)
    clock[0] += 0.05  # soon after the last: still compared with the first, 0.45 s ago
    _fake_proc(tmp_path, busy_ticks=1000 + tick, own_ticks=300 + tick // 4)
    assert load.others() == pytest.approx(0.75 / 0.45, abs=0.02)
    clock[0] += 0.3  # the first reading is 0.75 s old: the window starts at the second's
    _fake_proc(tmp_path, busy_ticks=1000 + 2 * tick, own_ticks=300 + tick // 4)
    assert load.others() == pytest.approx(1.0 / 0.35, abs=0.02)


def test_the_load_is_not_read_off_a_window_shorter_than_the_kernels_ticks(tmp_path, clock):
    # 100 ms after the first reading a few ticks more of all CPUs' time would read as half
    # a core, whatever ran: the first estimate stands until 0.3 s have passed.
    tick = TICK
    _fake_proc(tmp_path, busy_ticks=1000, own_ticks=300, running=1, own_running=1)
    load = threads.CpuLoad(str(tmp_path))
    assert load.others() == 0.0
    clock[0] += 0.1
    _fake_proc(tmp_path, busy_ticks=1000 + tick // 20, own_ticks=300)  # 50 ms in 100
    assert load.others() == 0.0


def test_a_reading_long_after_the_last_counts_runnable_threads(tmp_path, clock):
    # A server idle for minutes, then asked under load: the average since the last
    # reading would be the idle past; the threads runnable now are the load now.
    _fake_proc(tmp_path, busy_ticks=1000, own_ticks=300, running=1, own_running=1)
    load = threads.CpuLoad(str(tmp_path))
    assert load.others() == 0.0
    clock[0] += 120.0
    _fake_proc(tmp_path, busy_ticks=1000 + 5, own_ticks=300, running=3, own_running=1)
    assert load.others() == 2.0  # not 5 ticks over two minutes


def test_no_proc_means_no_adaptation(tmp_path):
    assert threads.CpuLoad(str(tmp_path / "absent")).others() == 0.0


class _Load:
    def __init__(self, others: float) -> None:
        self.value = others

    def others(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("share", "cores", "others", "expected"),
    [
        (2, 2, 0.0, 2),  # idle: the whole share
        (2, 2, 0.3, 2),  # a browser's tab: still both
        (2, 2, 0.8, 1),  # most of a core gone: one thread, no barrier to wait at
        (2, 2, 2.0, 1),  # every core busy: one, never none
        (1, 2, 0.0, 1),  # the duo's concurrent stage: each agent its half
        (8, 8, 3.0, 5),
        (4, 8, 4.0, 2),  # half the cores, half of what is free
        (16, 8, 0.0, 8),  # never beyond the cores
    ],
)
def test_fit(share, cores, others, expected):
    assert threads.fit(share, cores, _Load(others)) == expected  # type: ignore[arg-type]


# --- libgomp's short spin ------------------------------------------------------------

_SHORT_SPIN = """
import os, sys, time
import llama_cpp  # loads ggml's CPU backend, and with it libgomp
from vlmduo.engine import threads

def tasks():
    return len(os.listdir("/proc/self/task"))

def until(expected):
    deadline = time.monotonic() + 30  # a hang guard, not a timing claim
    while tasks() != expected:
        assert time.monotonic() < deadline, (tasks(), expected)
        time.sleep(0.01)

spin = threads.ShortSpin(cores=2)
before = tasks()
print(spin.follow(False), tasks() - before)  # idle: libgomp's own spin, no team
print(spin.follow(True), tasks() - before)  # busy: a parked thread and its team of 3
print(spin.follow(False, settle_s=60.0), tasks() - before)  # a lull: still held
print(spin.follow(False, settle_s=0.0))  # settled: released
until(before)  # the parked thread ended, libgomp let its team go
print(tasks() - before)
"""


def test_short_spin_parks_a_team_while_busy_and_lets_it_go():
    out = subprocess.run([sys.executable, "-c", _SHORT_SPIN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # cores + 1 OpenMP threads: the parked Python thread leads, libgomp starts 2 more;
    # more threads than CPUs is what makes libgomp spin 100 turns instead of 300,000.
    assert out.stdout.split("\n")[:5] == ["False 0", "True 3", "True 3", "False", "0"]


def test_without_libgomp_there_is_nothing_to_hold():
    # Before llama.cpp is loaded (or in a build without OpenMP) no team is parked.
    code = "from vlmduo.engine import threads; s = threads.ShortSpin(); print(s.follow(True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --- a whole ask on a busy machine -------------------------------------------------


@contextmanager
def busy_cores() -> Iterator[None]:
    """One busy process per core, each seen running (it has used CPU time) before the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(CORES)]
    try:
        deadline = time.monotonic() + 60  # a hang guard, not a timing claim
        for proc in procs:
            while int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[11]) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(CORES < 2 or not Path("/proc/stat").exists(), reason="needs two cores and /proc")
def test_on_a_busy_machine_every_stage_runs_one_thread_and_the_hand_over_too(image_file, isolated_env):
    args = [
        "ask",
        str(image_file),
        "Is it a cat? A. yes B. no",
        "--pair",
        "synthetic",
        "--threads",
        str(CORES),
    ]
    # --no-image-cache: the second ask encodes its image too (its threads are asserted)
    args += ["--policy", "always", "--think-budget", "24", "--json", "--no-image-cache"]
    with busy_cores():
        out = run_cli(args, isolated_env)
        fixed = run_cli(args, {**isolated_env, "VLMDUO_FIXED_THREADS": "1"})
    for done in (out, fixed):
        assert done.returncode == 0, done.stderr.decode()
    data, control = json.loads(out.stdout), json.loads(fixed.stdout)
    # Every stage, the transfer after the hand-over between the agents included, and the
    # vision encoders: one thread, no barrier to wait at for a thread the busy cores hold.
    assert data["transferred"]["threads"] == {"transfer_prefill": 1, "answer_decode": 1}
    assert data["transferred"]["waits"] == "short spin"  # libgomp's waits, read from the process
    for role in ("small", "large"):
        assert set(data[role]["threads"].values()) == {1}, data[role]["threads"]
    # Negative control: told to keep its threads, the same ask runs the configured count.
    assert control["transferred"]["threads"] == {"transfer_prefill": CORES, "answer_decode": CORES}
    assert control["large"]["threads"]["encode"] == CORES
    assert control["transferred"]["waits"] == "default"


@pytest.mark.skipif(CORES < 2 or not Path("/proc/stat").exists(), reason="needs two cores and /proc")
def test_doctor_reports_libgomps_settings_and_the_load(isolated_env):
    with busy_cores():
        out = run_cli(["doctor", "--json", "--no-self-test", "--pair", "synthetic"], isolated_env)
    assert out.returncode == 0, out.stderr.decode()
    now = json.loads(out.stdout)["threads"]
    assert now["gomp_spincount"] is not None  # read from libgomp itself (omp_display_env)
    assert now["cores"] == CORES and now["others_busy_cores"] >= CORES - 0.5 and now["threads_now"] == 1
    assert now["short_spin_now"] is True


@pytest.mark.skipif(CORES < 2 or not hasattr(os, "sched_setaffinity"), reason="needs two cores and affinity")
@pytest.mark.parametrize(("cores", "small_started"), [({0}, False), ({0, 1}, True)])
def test_on_one_core_the_duo_runs_one_agent_after_the_other(cores, small_started):
    # Sequential, a confident large answer means the small agent never starts; concurrent,
    # it starts beside the large one and is cancelled.
    code = (
        "import os, sys\n"
        f"os.sched_setaffinity(0, {cores!r})\n"
        "from vlmduo.agents.scripted import ScriptedAgent\n"
        "from vlmduo.duo.pipeline import AskOptions, ask, make_question\n"
        "small = ScriptedAgent('small').enqueue(answer='A', delays={'reason': 5.0})\n"
        "large = ScriptedAgent('large').enqueue(answer='A', probability=0.99, delays={'answer': 0.2})\n"
        "q = make_question('Which? A. x B. y', None, 'auto')\n"
        "ask(q, AskOptions(policy='confidence', confidence_threshold=0.5), small=small, large=large)\n"
        "print('reason' in small.calls)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(small_started)
