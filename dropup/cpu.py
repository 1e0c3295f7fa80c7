"""Two facts about CPU training that the defaults get wrong, checked once per process.

- **Freed memory goes back to the kernel.** glibc serves allocations above its mmap threshold (at most 32 MiB
  with the dynamic default) with fresh `mmap`s and unmaps them on free, so every step's large activations and
  gradients are page-faulted and zeroed again. On 2 cores that was 15% of a training step of the small preset.
  `keep_freed_memory` raises the threshold and the trim threshold (glibc's `mallopt`), so a step reuses the
  previous step's pages; the process's peak memory grows by a few percent (the heap fragments a little), and each
  process (each CPU rank) may hold up to 1 GiB of freed heap beyond its live tensors.
  Elsewhere (macOS, musl) it does nothing. `DROPUP_CPU_MALLOC=system` turns it off.
- **bf16 is not always faster.** On CPUs without native bf16 (AVX2-only ones) a bf16 matrix product is emulated
  and runs two orders of magnitude slower than fp32, so a `bf16-mixed` run there crawls. `bf16_slowdown`
  measures it; `prepare_cpu_process` says so in one log line, with the fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import time

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
# Only allocations above 1 GiB are mapped (and unmapped) on their own; glibc versions that cap the threshold at
# 32 MiB (HEAP_MAX / 2) get that instead.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30  # up to 1 GiB of freed heap is kept for the next step (per process: each rank keeps its own)
TOP_PAD = 64 << 20
BF16_EMULATED_ABOVE = 2.0  # a bf16 matmul this many times slower than fp32 means the CPU emulates bf16


@functools.cache
def keep_freed_memory() -> int:
    """Make glibc keep freed large blocks for reuse. Returns the mmap threshold that took effect (bytes), 0 where
    nothing did (not glibc, or turned off). Idempotent."""
    if os.environ.get("DROPUP_CPU_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return 0
    threshold = next((value for value in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, value) == 1), 0)
    if threshold:  # setting any of these freezes glibc's dynamic threshold: only worth it with a raised one
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        mallopt(_M_TOP_PAD, TOP_PAD)
    return threshold


def _matmul_seconds(dtype: torch.dtype, n: int) -> float:
    a, b = torch.ones(n, n, dtype=dtype), torch.ones(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


@functools.cache
def bf16_slowdown(n: int = 256) -> float:
    """How many times longer a bf16 n x n matrix product takes than an fp32 one here (best of 3 each)."""
    fp32 = min(_matmul_seconds(torch.float32, n) for _ in range(3))
    bf16 = min(_matmul_seconds(torch.bfloat16, n) for _ in range(3))
    return bf16 / max(fp32, 1e-9)


def prepare_cpu_process(precision: str, say=log.info) -> None:
    """Before CPU training: keep freed memory, and warn when the precision asks for bf16 this CPU emulates."""
    threshold = keep_freed_memory()
    if threshold:
        say(f"CPU allocator: glibc keeps freed blocks up to {threshold >> 20} MiB for reuse, and up to "
            f"{TRIM_THRESHOLD >> 20} MiB of freed heap (DROPUP_CPU_MALLOC=system to turn off)")
    if "bf16" in str(precision):
        slowdown = bf16_slowdown()
        if slowdown > BF16_EMULATED_ABOVE:
            say(f"this CPU runs bf16 matrix products {slowdown:.0f}x slower than fp32 (no native bf16): "
                f"trainer.precision={precision} will be slow here; trainer.precision=32-true runs the same recipe "
                "in fp32, faster (its numbers differ slightly from bf16 runs)")
