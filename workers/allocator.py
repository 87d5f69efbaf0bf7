"""glibc malloc tunables for worker processes, and the re-exec that applies them.

Torch-free, so launchers import it without loading torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ALLOCATOR_ENV: dict[str, str] = {
    # glibc serves blocks above the mmap threshold (dynamic, at most 32 MiB) with fresh mmap
    # pages and unmaps them on free, so every batched pass page-faults its activations in
    # again (200k faults per efficientnet-lite0 forward at batch 16). Keeping them on the
    # heap, never trimmed, removes 95% of those faults; measured figures in
    # docs/performance.md. glibc reads these at process start only: launchers set them.
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
"""Environment for worker processes (glibc malloc tunables); set before the process starts."""


def exec_with_allocator_env(argv: list[str]) -> None:
    """Re-run ``python -m workers argv`` with :data:`ALLOCATOR_ENV` if it is not set yet:
    glibc reads these variables at process start only, so whatever launched the worker
    (compose, make run, a shell) gets them without having to know."""
    missing = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, "-m", "workers", *argv], {**os.environ, **missing})


def release_free_memory() -> bool:
    """Give the allocator's free memory back to the OS (glibc ``malloc_trim(0)``: the free
    top of every arena and the free pages inside them). The settings above keep freed blocks
    for the next batch, which is right within a job and wrong between jobs: a worker calls
    this after each job and after its warm-up, so its resident memory returns to near idle
    (docs/deployment.md). Returns whether anything was released; False where there is no
    glibc (musl, macOS)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.append(libc)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]
