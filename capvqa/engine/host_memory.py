"""Keep freed host memory inside the allocator, so large CPU tensors stop costing page faults.

glibc malloc serves every allocation above its mmap threshold (128 KiB, raised dynamically to at most
32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``. CPU inference allocates tens of
megabytes per decoding step -- the vocabulary logits of 400 caption rows are 49 MB, the KV caches grow
by a copy every step, the FiD cross-attention cache is hundreds of megabytes -- so each step pays the
kernel to map and zero fresh pages. On the project's 2-core machine that was a sixth of PNP-VQA's fp32
time in ``capvqa bench`` (11.8 -> 9.8 s/question when measured; kernel time 14.5 -> 4.1 s).

Raising the mmap and trim thresholds makes malloc serve those blocks from its heap and keep freed ones
for reuse, which is what jemalloc or tcmalloc (recommended by PyTorch's CPU performance guide, but not
installable from pip) give. The cost: up to ``threshold`` bytes of freed memory stay with the process
instead of going back to the OS; peak memory is unchanged. Nothing is computed differently.

Applied once per process by :func:`capvqa.engine.runtime.make_runtime` when asked (the CLI and the
benchmark ask for CPU runs; a library call does not change process-wide state unless it passes
``keep_freed_host_memory=True``); set ``CAPVQA_KEEP_HOST_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

OPT_OUT_VARIABLE = "CAPVQA_KEEP_HOST_MEMORY"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_FALLBACK_THRESHOLD = 32 << 20  # the largest mmap threshold that older glibc versions accept

_applied: str | None = None


def keep_freed_host_memory(threshold_bytes: int = 1 << 30) -> str:
    """Tune glibc malloc (see the module docstring); returns a description of the allocator state.

    Idempotent. Returns "default allocator (...)" without changing anything when opted out or not on
    glibc (macOS, musl, Windows), where there is no such mmap-per-allocation cost to remove.
    """
    global _applied
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"default allocator ({OPT_OUT_VARIABLE}=0)"
    if _applied is not None:
        return _applied
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "default allocator (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for threshold in (threshold_bytes, _FALLBACK_THRESHOLD):
        if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, max(threshold, _FALLBACK_THRESHOLD))
            _applied = f"glibc malloc keeps freed memory (mmap threshold {threshold >> 20} MiB)"
            return _applied
    return "default allocator (mallopt refused)"


def host_allocator() -> str:
    """What :func:`keep_freed_host_memory` did in this process (for timings and benchmark records)."""
    return _applied or "default allocator"
