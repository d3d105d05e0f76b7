"""Return the memory freed by PPO's update to the system as a run goes (glibc's malloc only).

glibc serves large allocations with mmap and unmaps them on free, but after the
first such free it raises that size limit (up to 32 MiB), so later activation
tensors come from the heap and stay resident once freed. Each update forward with
gradients allocates about 1 GiB of activations on GPT-2 small; by default the
process's resident memory climbs by that much per forward, to ~4.4 GiB, although
at most ~1.3 GiB is ever in use together.

`FreedMemory` switches the setting by phase:

    loading, update   tensors >= threshold (4 MiB) are mapped, and unmapped when freed
    rollout           the heap serves tensors up to 32 MiB: generation copies its KV cache one
                      token at a time, and mapping each copy cost +25% rollout time (measured)
    rollout -> update `malloc_trim` hands the heap's free pages back first

Within a phase the heap keeps the free pages at its top (trim threshold 1 GiB) for the next
tensors. With a fixed mmap threshold glibc's trim threshold stays at 128 KiB: nearly every
free at the heap's top gave pages back and the next allocation faulted them in again, zeroed.
On the demo's model that churn added 20-90% to an update micro-batch's time (measured). The
kept pages are reused, not added: `malloc_trim` at the phase switch hands them back.

GPU memory is not affected (CUDA has its own caching allocator); other C libraries
(musl, macOS) are left alone, as is a limit the user set with MALLOC_MMAP_THRESHOLD_.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_HEAP_TOP_MB = 1024  # trim threshold within a phase (see the module docstring)
MAX_THRESHOLD_MB = 32  # glibc refuses larger values on 64-bit systems


def _glibc() -> Any | None:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist only in glibc)
    except (OSError, AttributeError):
        return None
    return libc


class FreedMemory:
    """The phase-wise setting of the module docstring; does nothing when `threshold_mb` is 0 or not on glibc."""

    def __init__(self, threshold_mb: float):
        self.threshold_mb = threshold_mb
        self.libc = _glibc() if threshold_mb > 0 else None
        self.active = self.libc is not None
        if self.active:
            self.libc.mallopt(M_TRIM_THRESHOLD, KEEP_HEAP_TOP_MB * 2**20)
        self.update()

    def rollout(self) -> None:
        if self.active:
            self.libc.mallopt(M_MMAP_THRESHOLD, MAX_THRESHOLD_MB * 2**20)

    def update(self) -> None:
        if self.active:
            self.libc.malloc_trim(0)
            self.libc.mallopt(M_MMAP_THRESHOLD, int(min(self.threshold_mb, MAX_THRESHOLD_MB) * 2**20))
