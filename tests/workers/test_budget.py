"""The memory watchdog of jobs (``workers.budget``), on this process: a block that grows
resident memory past its budget is stopped with ``MemoryBudgetExceeded``; one within it is not."""

from __future__ import annotations

import mmap
import threading
import time

import pytest

from schemas.errors import MemoryBudgetExceeded
from workers.budget import MemoryWatch


def _watchdog(watch: MemoryWatch, stop: threading.Event) -> threading.Thread:
    def beat() -> None:
        while not stop.wait(0.05):
            watch.check()

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    return t


def _fresh_mib(n: int) -> mmap.mmap:
    """``n`` MiB of new anonymous pages, touched. Not from malloc: with the workers' allocator
    settings (``ALLOCATOR_ENV``, set by the Makefile) memory freed by earlier tests stays
    resident in the heap, and a ``malloc`` of 200 MiB can reuse it without growing the RSS."""
    block = mmap.mmap(-1, n * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_a_job_growing_past_its_budget_is_stopped_and_one_within_is_not():
    watch, stop = MemoryWatch(), threading.Event()
    _watchdog(watch, stop)
    held = []  # kept to the end: each block needs fresh pages (freed ones may stay resident)
    try:
        with watch.applied(10_000):  # 10 GB: 200 MiB is within it
            held.append(_fresh_mib(200))
            time.sleep(0.3)
        with pytest.raises(MemoryBudgetExceeded) as caught:
            with watch.applied(50):
                held.append(_fresh_mib(200))  # 200 MiB, touched (may be stopped in here)
                for _ in range(100):  # a job at work: the watchdog interrupts it
                    time.sleep(0.05)
                raise AssertionError("not stopped")
        assert caught.value.type == "memory_budget" and "budget is 50 MiB" in caught.value.message
        with watch.applied(0):  # no budget: never watched
            held.append(_fresh_mib(200))
            time.sleep(0.3)
    finally:
        stop.set()
