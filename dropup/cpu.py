"""Two facts about CPU training that the defaults get wrong, checked once per process.

- **Freed memory goes back to the kernel.** glibc serves allocations above its mmap threshold (at most 32 MiB
  with the dynamic default) with fresh `mmap`s and unmaps them on free, so every step's large activations and
  gradients are page-faulted and zeroed again. On 2 cores that was 15% of a training step of the small preset.
  `keep_freed_memory` raises the threshold and the trim threshold (glibc's `mallopt`), so a step reuses the
  previous step's pages; the process's peak memory grows by a few percent (the heap fragments a little).
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

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # only allocations above 1 GiB are mapped (and unmapped) on their own
TRIM_THRESHOLD = 1 << 30  # up to 1 GiB of freed heap is kept for the next step
TOP_PAD = 64 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse; True where it took effect. Idempotent."""
    if os.environ.get("DROPUP_CPU_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(option, value) == 1 for option, value in settings)


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
    if keep_freed_memory():
        say("CPU allocator: glibc keeps freed blocks up to 1 GiB for reuse (DROPUP_CPU_MALLOC=system to turn off)")
    if "bf16" in str(precision):
        slowdown = bf16_slowdown()
        if slowdown > 2.0:
            say(f"this CPU runs bf16 matrix products {slowdown:.0f}x slower than fp32 (no native bf16): "
                f"trainer.precision={precision} will be slow here; trainer.precision=32-true runs the same recipe "
                "in fp32, faster (its numbers differ slightly from bf16 runs)")
