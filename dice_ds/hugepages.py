"""Transparent huge pages, populated up front, for large CPU tensors about to be written and kept.

Owns ``advise_huge_pages(tensors)``: ``madvise(MADV_HUGEPAGE)`` over the 2 MiB-aligned part of each
large CPU tensor's memory, then ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) over all of it,
before anything touches it. On this kind of VM a fresh page costs a fault on first write, which
made filling a 3 GB model from the page cache several times slower than reading the same bytes.
Measured on 3 GB here (docs/scale.md): first writes into 4 KiB pages 1.4-1.8 s; into huge pages
faulted one by one 3.8-6.8 s (each fault may compact memory); huge pages populated by one call
0.4-0.8 s in all. Linux with THP in ``always`` or ``madvise`` mode honours the first; kernels
without ``MADV_POPULATE_WRITE`` skip the second; elsewhere (or if libc refuses) nothing happens.

Also owns ``trim_heap()``: glibc's ``malloc_trim(0)``, returning freed heap memory to the system.
Buffers just under glibc's dynamic mmap threshold (up to 32 MiB: a load's scratch slots at G/2
width are 32 MiB) are carved from a heap arena and stay resident after ``free``; a load calls it
once when done.

Invariants: advice only, never required for correctness; no effect on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import sys

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_PAGE = 4096
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


def advise_huge_pages(tensors, min_bytes: int = 4 * _HUGE, populate: bool = True) -> int:
    """Advise huge pages for each CPU tensor of at least ``min_bytes`` and (``populate``) fault
    its memory in now, in one call; returns bytes advised."""
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
        if populate:  # the whole 4 KiB-aligned range; EINVAL on kernels before 5.14: ignored
            lo, hi = start & ~(_PAGE - 1), (end + _PAGE - 1) & ~(_PAGE - 1)
            madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_WRITE)
    return advised


def trim_heap() -> bool:
    """``malloc_trim(0)`` where glibc has it; True if memory was returned."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
