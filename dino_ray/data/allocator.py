"""Process-level memory setting for data workers (glibc malloc), opt-in and explicit."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc <malloc.h> parameter numbers for mallopt().
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses larger values on 64-bit


def reduce_allocator_churn(threshold_bytes: int = 256 * 2**20) -> bool:
    """Keep freed heap memory in this process instead of handing it back to the OS (glibc only).

    The photometric ops allocate float temporaries of ~0.1-2 MB per op. Above glibc's (dynamic)
    mmap / trim thresholds every such buffer is returned to the kernel on free and page-faulted in
    again on the next allocation, which measured at about half of the photometric time. Raising
    both thresholds makes the allocator reuse the memory. This is process-wide, so it is NOT done
    on import or construction: data-worker processes call it once (the Ray Data actors and the
    benchmark's DataLoader workers do). Returns False where glibc's ``mallopt`` is unavailable.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, _MMAP_THRESHOLD_MAX))) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
