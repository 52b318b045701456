"""glibc's malloc settings for this process, in one place. Each is process-wide and idempotent, and does
nothing where there is no glibc `mallopt` (macOS, musl)."""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8  # malloc.h


def _mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> None:
    """Let glibc keep the big blocks a CPU forward frees instead of giving each back to the OS: by default every
    allocation above 32 MiB is a fresh mmap, page-faulted on first touch and unmapped when freed, so each large
    activation costs page faults (docs/design.md has the measurement)."""
    mallopt = _mallopt()
    if mallopt is None:
        return
    if not mallopt(M_MMAP_THRESHOLD, 1 << 30):  # a glibc that caps the threshold: no mmap at all then
        mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def limit_arenas(n: int) -> bool:
    """At most n heaps ("arenas") for the process, unless MALLOC_ARENA_MAX is set; whether it was done.

    glibc opens a heap for each thread that finds the others busy, up to 8 per core, and with
    `keep_freed_memory` each heap keeps its own high-water mark. A server whose batches run on several threads
    then holds more memory and settles later (docs/design.md "Serving"). Heaps opened before the call stay:
    call it before any thread allocates (polars' pool does as soon as polars is imported)."""
    mallopt = None if "MALLOC_ARENA_MAX" in os.environ else _mallopt()
    return mallopt is not None and mallopt(M_ARENA_MAX, n) == 1
