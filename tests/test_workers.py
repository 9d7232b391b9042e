"""Worker threads: a lane runs what it is handed in order, on one OS thread, until closed."""

from __future__ import annotations

import threading

import pytest

from vlmduo.duo import workers


def test_a_lane_runs_its_work_in_order_on_one_thread_and_ends_when_closed():
    seen: list[tuple[int, int]] = []
    gate = threading.Event()
    with workers.Lane("test-lane") as lane:
        first = lane.submit(lambda: gate.wait(5.0) and seen.append((1, threading.get_native_id())))
        second = lane.submit(lambda: seen.append((2, threading.get_native_id())) or "done")
        assert not second.done()  # queued behind the first
        gate.set()
        assert second.result(timeout=5.0) == "done" and first.result(timeout=5.0) is None
    assert [n for n, _ in seen] == [1, 2]
    assert seen[0][1] == seen[1][1] != threading.get_native_id()
    lane_threads = [t for t in threading.enumerate() if t.name == "test-lane"]
    for thread in lane_threads:
        thread.join(timeout=5.0)  # closed: the thread ends
        assert not thread.is_alive()


def test_a_failure_reaches_the_caller_and_the_lane_goes_on():
    with workers.Lane("test-lane") as lane:
        failed = lane.submit(lambda: 1 / 0)
        after = lane.submit(lambda: "still running")
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=5.0)
        assert after.result(timeout=5.0) == "still running"
