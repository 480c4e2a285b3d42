"""Host memory on Linux: hand freed activation buffers back to the system instead of keeping them.

A CPU training step allocates and frees many large tensors (activations, attention score matrices,
dequantized 4-bit weights). glibc serves allocations above a threshold with ``mmap`` and returns
them on free, but it raises that threshold each time such a block is freed (up to 32 MiB). After
the first step, blocks of a few MiB to 32 MiB come from the heap instead, where freed memory
fragments and stays resident: measured on the Disfl-QA QLoRA recipe with gradient checkpointing,
the process grew to several GiB more than the step ever held at once
(``benchmarks/qlora_rss.py``). Fixing the threshold at 64 KiB stops the growth; PyTorch's own
CPU allocator does not cache, so nothing else holds those blocks.

:func:`return_freed_memory` sets it once per process, on glibc only, and leaves it alone when the
user set ``MALLOC_MMAP_THRESHOLD_`` themselves or ``FINETUNE_GLIBC_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 64 * 1024
_applied: bool | None = None


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 64 KiB (once per process); return whether it is in effect.

    Example:
        >>> isinstance(return_freed_memory(), bool)
        True
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FINETUNE_GLIBC_MALLOC") == "default" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _applied
    name = ctypes.util.find_library("c")
    if not name or not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower():
        return _applied
    try:
        _applied = bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError, ValueError):
        return _applied
    logger.info("glibc mmap threshold fixed at %d KiB: freed buffers go back to the system", THRESHOLD // 1024)
    return _applied
