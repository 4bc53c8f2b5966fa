"""Keeping freed memory in the process for reuse (glibc's ``malloc``, Linux).

Every training step, and every chunk of an evaluation, frees tensors of the
sizes it is about to allocate again. glibc's ``malloc`` serves a block above its
mmap threshold (128 KiB, raised as such blocks are freed, up to 32 MiB) with a
mapping of its own, unmapped when the block is freed, and hands free memory at
the top of its heap back to the kernel past its trim threshold (twice the mmap
threshold). Either way the next step writes to fresh pages: a page fault, and a
page the kernel zeroes, every 4 KiB. Measured in fresh processes
(``bench/allocator.py``, results/benchmarks.md), the eager ``log_likelihood`` at
K = 5000 lost about a quarter of its time to them, and the paper model's
training steps at k = 50 thousands of faults a step.

:func:`keep_freed_memory` fixes both thresholds higher, so that freed blocks
stay in the heap and the next step reuses them; blocks of the size of a data
set's arrays are still mapped and returned. ``pyro-iwae`` calls it when it
starts.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: Bytes from which a block still gets a mapping of its own, unmapped when
#: freed: 64 MiB, above any tensor of the paper model's steps and of an
#: evaluation's chunks (at most 32 MiB, ``infer.evaluation.LARGEST_TENSOR``), and
#: below the data set's arrays, so that what loading them frees goes back.
MMAP_THRESHOLD = 1 << 26

#: Bytes of free memory at the heap's top kept rather than returned: 256 MiB, an
#: evaluation chunk's memory budget (``infer.evaluation.DEFAULT_MEMORY_BUDGET``).
TRIM_THRESHOLD = 1 << 28

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: What a user sets these with; where one is set, the user has chosen.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raises glibc ``malloc``'s mmap threshold to ``MMAP_THRESHOLD`` (64 MiB) and its
    trim threshold to ``TRIM_THRESHOLD`` (256 MiB) for this process (see the module's
    documentation); returns whether it did.

    It does nothing, and returns False, where the C library is not glibc (macOS,
    Windows, musl), or where the environment sets malloc's thresholds already
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
    ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``): they stay as set.
    """
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
    except (ValueError, OSError, AttributeError):
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 where it took the value, 0 where it refused it.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
