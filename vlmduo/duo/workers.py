"""Run agent work off the main thread, so Ctrl-C and failures are seen at once.

A long ``llama_decode`` or image encode holds the calling thread in C, where
Python cannot deliver KeyboardInterrupt. So the pipeline runs each agent on a
worker thread and the main thread only waits, interruptibly. Workers are
daemon threads: after Ctrl-C the process can exit without joining a worker
that is still inside an uninterruptible image encode.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, TypeVar

T = TypeVar("T")


class AnyOf:
    """A cancel flag set when any of its events is (what sessions read: ``is_set``)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        """True once any of the events is set."""
        return any(event.is_set() for event in self.events)


def spawn(fn: Callable[..., T], *args: Any, name: str = "vlmduo-worker", **kwargs: Any) -> Future[T]:
    """Start ``fn(*args, **kwargs)`` on a daemon thread; its result or exception in a Future."""
    future: Future[T] = Future()
    threading.Thread(target=_run, args=(future, fn, args, kwargs), name=name, daemon=True).start()
    return future


class Lane:
    """A daemon thread that runs the work handed to it, one call after another, until
    closed.

    llama.cpp work handed from one thread to another changes OpenMP teams: libgomp lets a
    finished team's threads spin (``GOMP_SPINCOUNT``) before they sleep, and the new team
    runs beside them. On 2 cores a 24-token transfer after the small agent's reasoning
    took 26 ms on a new thread, 5 ms with a 10x shorter spin (benchmarks/busy_machine.py
    pair). Work handed on within one lane finds its team's threads still spinning and
    starts at once.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple, dict] | None]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` after what was handed to the lane before."""
        future: Future[T] = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def close(self) -> None:
        """End the thread once the work handed to it is done (returns at once)."""
        self._jobs.put(None)

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            _run(*job)


def _run(future: Future[T], fn: Callable[..., T], args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
        future.set_exception(exc)


def first_error(futures: list[Future[Any]], until: Future[Any] | list[Future[Any]] | None = None) -> None:
    """Wait until ``until`` is done (a list: any of them; default: all of ``futures``),
    raising the first exception any of them raised meanwhile."""
    pending = set(futures)
    watched = [until] if isinstance(until, Future) else until
    while pending and not (watched is not None and any(f.done() for f in watched)):
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]


def settle(futures: list[Future[Any]], timeout: float | None = None) -> None:
    """Wait for workers to stop (after a cancel), ignoring their outcome."""
    wait(futures, timeout=timeout)
