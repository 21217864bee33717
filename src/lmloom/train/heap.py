"""Keep the memory a CPU training step frees mapped for the next step (glibc on Linux).

glibc gives the top of its heap back to the kernel whenever more than M_TRIM_THRESHOLD of it is free: by
default twice the largest block it has served by mmap, so at most 64 MiB. A training step frees most of
its activations at the end of backward, so the next forward takes the same memory back from the kernel
a page at a time: a minor page fault, and a page of zeroes, per 4 KiB. On this project's CPU the
compiled quickstart model took 6,000-19,000 such faults a step (up to ~75 ms of a ~870 ms step).

`keep_freed_memory` sets the trim threshold to 1 GiB and fixes the mmap threshold at glibc's largest,
32 MiB, once per process: freed blocks stay in the heap for the next step to reuse, and the process keeps
up to its peak (plus 1 GiB) mapped until it exits. It does nothing where the user chose for themselves
(any MALLOC_* environment variable, which glibc reads at start-up) or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as described above, once per process; True when they are in effect."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, since setting it stops glibc's own
    # adjustment of both thresholds, which would otherwise move the trim threshold back down.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
