"""Memory budgets of jobs: a watchdog that stops a job growing its worker past its budget.

A worker runs jobs in its own process (no fork per job), so one job that needs too much
memory would take the worker, and the models it keeps warm, down with it (the kernel's OOM
killer), or leave it bloated for every job after. Each job carries its kind's budget in MiB
(``meta["memory_mb"]``, from ``schemas.kinds.budgets``). While it runs, the worker's
heartbeat thread calls :meth:`MemoryWatch.check` every beat; when the process's resident
memory has grown by more than the budget since the job started, it raises
``MemoryBudgetExceeded`` in the job's thread (as RQ's ``TimerDeathPenalty`` raises its
timeout), the job fails with error type ``memory_budget``, and its memory is freed. Growth
between two beats is not seen until the next one: the budget bounds what a job keeps, at a
resolution of ``worker_heartbeat_s``. A job that loads a model pays for the model.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rq.timeouts import JobTimeoutException

from schemas.errors import MemoryBudgetExceeded

log = logging.getLogger(__name__)


JOB_STOPS: tuple[type[BaseException], ...] = (JobTimeoutException, MemoryBudgetExceeded)
"""What a running job's budgets raise into it (RQ's death penalty for time, :class:`MemoryWatch`
for memory). Code with a broad ``except Exception`` on a job's path (the engine's exporter
fallbacks) re-raises these first: a swallowed budget lets the job run on past it."""


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread at its next bytecode (None: withdraw a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


@dataclass
class _Running:
    thread_id: int
    baseline_mb: float
    budget_mb: int
    fired: bool = False


class MemoryWatch:
    """The budget of the job running now in this process (at most one: workers run one job)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: _Running | None = None

    @contextmanager
    def applied(self, budget_mb: int) -> Iterator[None]:
        """Watch the calling thread's job while the block runs (``budget_mb`` 0: not at all)."""
        if budget_mb <= 0:
            yield
            return
        with self._lock:
            self._running = _Running(threading.get_ident(), rss_mb(), budget_mb)
        try:
            yield
        finally:
            with self._lock:
                running, self._running = self._running, None
                if running is not None and running.fired:
                    _raise_in(running.thread_id, None)  # not delivered yet: it must not escape the job
            if running is not None and running.fired:
                gc.collect()

    def check(self) -> None:
        """From another thread: stop the job if it is over its budget."""
        with self._lock:
            r = self._running
            if r is None or r.fired:
                return
            grown = rss_mb() - r.baseline_mb
            if grown <= r.budget_mb:
                return
            r.fired = True
            message = f"the job grew the worker's memory by {grown:.0f} MiB; its budget is {r.budget_mb} MiB"
            log.warning("%s: stopping it", message)
            exc = type(
                "MemoryBudgetExceeded", (MemoryBudgetExceeded,), {"message_default": message, "__module__": __name__}
            )
            _raise_in(r.thread_id, exc)


MEMORY = MemoryWatch()
