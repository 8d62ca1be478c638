"""Memory-mapped files: zero-copy reading (of zip members too), and letting pages go once they are no longer needed.

A mapped page that was read or written counts in the process's resident memory until it is dropped;
the file keeps it in the page cache, so dropping costs nothing but a re-read if it is touched again.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile

import numpy as np

from zoo.errors import ZooError


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


_FOLIO = 1 << 21  # the page cache holds a file in folios of up to 2 MiB, and touching one byte maps its whole folio


def release_pages(data, arr: np.ndarray) -> None:
    """Drop the pages around `arr`, a view of the shared mapping `data` (map_file's, or an output file's); no-op
    for anything else. The span is widened to the 2 MiB folios it lies in: reading a 1 KiB bias maps 2 MiB of
    the file into the process (kernel 6.18, ext4), which an exact release would leave (ResNet-50 from torch: 42
    MB of its 103 left mapped). Dropping more than was used is harmless on a shared mapping, even where another
    thread is writing: what was written is in the page cache, and the next access maps it again."""
    if not isinstance(data, mmap.mmap) or arr.size == 0:
        return
    base = np.frombuffer(data, np.uint8).ctypes.data
    lo, hi = np.lib.array_utils.byte_bounds(arr)
    if base <= lo and hi <= base + len(data):
        drop_pages(data, (lo - base) // _FOLIO * _FOLIO, -(-(hi - base) // _FOLIO) * _FOLIO)


INFLATE_RATIO = 4  # float weights deflate by far less: an archive claiming more is corrupt or hostile
_LOCAL_HEADER = b"PK\x03\x04"


class MappedZip:
    """The members of a zip archive whose bytes are `data` (map_file): a stored member is a zero-copy view of
    them, a compressed one is inflated. All members inflated together stay within INFLATE_RATIO times the
    archive's size: a cap per member would let many members add up to any size."""

    def __init__(self, archive: zipfile.ZipFile, data, path=None):
        self.archive, self.data, self.path = archive, data, path
        self.inflatable = INFLATE_RATIO * len(data)

    def read(self, name: str) -> memoryview:
        """The member's bytes (KeyError when there is none)."""
        info = self.archive.getinfo(name)
        if info.flag_bits & 1:
            raise ZooError(f"{name} is encrypted", self.path)
        if info.compress_type != zipfile.ZIP_STORED:
            if info.file_size > self.inflatable:  # zipfile inflates no more than the size claimed
                raise ZooError(f"{name} claims {info.file_size:,} bytes inflated: with the members before it, "
                               f"over {INFLATE_RATIO}x the archive", self.path)
            self.inflatable -= info.file_size
            return memoryview(self.archive.read(name))
        start = info.header_offset  # the data follows the local header: 30 bytes, the name, an extra field
        header = self._header(start) if 0 <= start <= len(self.data) - 30 else b""
        if header[:4] != _LOCAL_HEADER:
            raise ZooError(f"{name}: no local zip header where the directory says", self.path)
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        begin = start + 30 + name_len + extra_len
        if begin + info.file_size > len(self.data):
            raise ZooError(f"{name} claims {info.file_size:,} bytes past the end of the archive (truncated?)", self.path)
        return memoryview(self.data)[begin:begin + info.file_size]

    def _header(self, start: int) -> bytes:
        """A member's 30-byte local header, read from the archive's file: through the mapping, the kernel's
        fault-around would map the pages around each header into this process (53 MB of ResNet-50's 103 MB
        for its 320 storages, resident beside the output until each tensor is written)."""
        self.archive.fp.seek(start)
        return self.archive.fp.read(30)
