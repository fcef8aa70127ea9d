"""Keep freed memory in the process (glibc's malloc), so a CPU training loop stops paying page faults.

A training step on the CPU allocates and frees the same few megabyte-sized activations every step. glibc serves
blocks that large with mmap and hands them back to the kernel on free (and trims the heap's top the same way), so
every step touches fresh pages and the kernel zeroes each one on its first write: a quarter of a step's faults
and, at evaluation's batch of 1000, half its time (`make bench-trainer`). Raising both thresholds keeps that
memory for reuse, as PyTorch's GPU allocator does; the process keeps its peak size until it exits. Other C
libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit machines (HEAP_MAX / 2); larger blocks are still mapped.
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024  # keep up to 1 GiB of free heap top instead of returning it


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks; True when it took the settings (once per process)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
