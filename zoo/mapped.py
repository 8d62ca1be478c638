"""Memory-mapped files: zero-copy reading, and letting pages go once they are no longer needed.

A mapped page that was read or written counts in the process's resident memory until it is dropped;
the file keeps it in the page cache, so dropping costs nothing but a re-read if it is touched again.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


def map_file(path):
    """The file's bytes, memory-mapped read-only (zero-copy for readers that slice it); b"" when empty."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def drop_pages(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the whole pages of the byte range [start, end) of `mapped` from this process's memory."""
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, min(end, len(mapped)) // mmap.PAGESIZE * mmap.PAGESIZE
    if 0 <= lo < hi:
        mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def release_pages(data, arr: np.ndarray) -> None:
    """Drop the pages under `arr`, a view of the mapping `data` (map_file); no-op for anything else."""
    if not isinstance(data, mmap.mmap) or arr.size == 0:
        return
    base = np.frombuffer(data, np.uint8).ctypes.data
    lo, hi = np.lib.array_utils.byte_bounds(arr)
    if base <= lo and hi <= base + len(data):
        drop_pages(data, lo - base, hi - base)
