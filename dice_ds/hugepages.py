"""Transparent huge pages for large CPU tensors that are about to be written once and kept.

Owns ``advise_huge_pages(tensors)``: ``madvise(MADV_HUGEPAGE)`` over the 2 MiB-aligned part of each
large CPU tensor's memory, before anything touches it. On this kind of VM a fresh 4 KiB page costs
a fault on first write, which made filling a 3 GB model from the page cache several times slower
than reading the same bytes (docs/scale.md); 2 MiB pages cut the faults 512-fold. Linux with THP in
``always`` or ``madvise`` mode honours it; elsewhere (or if libc refuses) it does nothing.

Invariants: advice only, never required for correctness; no effect on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import sys

_MADV_HUGEPAGE = 14
_HUGE = 1 << 21
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _libc = False
    return _libc


def advise_huge_pages(tensors, min_bytes: int = 4 * _HUGE) -> int:
    """Advise huge pages for each CPU tensor of at least ``min_bytes``; returns bytes advised."""
    madvise = _madvise() if sys.platform.startswith("linux") else False
    if not madvise:
        return 0
    advised = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if t.device.type != "cpu" or n < min_bytes:
            continue
        start, end = t.data_ptr(), t.data_ptr() + n
        lo, hi = (start + _HUGE - 1) & ~(_HUGE - 1), end & ~(_HUGE - 1)
        if hi > lo and madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE) == 0:
            advised += hi - lo
    return advised
