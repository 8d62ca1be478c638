"""Tensors on their way to the canonical layout: the one foreign-to-canonical transpose, and Deferred
tensors that are computed only as the output file is written.

The canonical layout (docs/formats.md) is Keras': conv kernels HWIO, dense kernels (in, out) with the
inputs after a flatten in H,W,C order. Caffe and PyTorch store both as rows, (out, in...), with C,H,W
order inside a row: every transform between them is rows_to_columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Deferred:
    """A tensor computed only as the output file is written (a layout transform of a mapped source), into its
    place in the file or a small reused buffer written out from there (zoo.weights._Placer): no canonical copy
    of the model is ever held in memory.

    `fill(dst)` writes the tensor into `dst`, a C-contiguous array of `shape` and `dtype`: every value of it (`dst`
    may be a reused buffer holding another tensor's values)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]


_SLAB = 256  # source rows per step: permuted into a buffer, then written out tile by tile
_TILE = 64  # buffer columns per tile: the tile's output rows each get 256 contiguous values (1 KiB) per visit
_RELEASE_BY_SLAB = 1 << 24  # bytes of a source matrix over which its pages go slab by slab
# bytes of a matrix from which on two threads transpose it: a smaller one runs beside the other tensors on the
# writer's two threads (zoo.weights._place), where two more only contended (ResNet-50 from torch: writing
# 0.78x the time, VGG16 0.86x, with the threshold at 4 MiB before); fc6 and fc7 of VGG16 and AlexNet still split
_THREADED = 1 << 26
_PAD = 16  # floats added to the buffer's row pitch: a power-of-two pitch (fc7's 4096) thrashes cache sets


def rows_to_columns(w: np.ndarray, chw: tuple[int, int, int], out: np.ndarray, release=None) -> None:
    """out[(h, w, c), o] = w[o, (c, h, w)]: every foreign-to-canonical transform is this one transpose.

    Conv (out, in, kh, kw) -> HWIO is chw = (in, kh, kw); dense (out, in) -> (in, out) is (in, 1, 1); a
    dense layer after Caffe/PyTorch's C,H,W flatten is its feature map's (C, H, W). numpy copies a
    transposed view element by element with a large stride (0.5 s for fc7). Here a slab of 256 rows is
    copied into a padded buffer, permuting (c, h, w) -> (h, w, c) on the way, and the buffer is written
    out in tiles of 64 of its columns, so each output row gets 256 contiguous values per visit (before:
    32-row slabs written whole, 32 values, 128 bytes, per visit of each output row). Filling a
    fresh mapped file with all of VGG16's kernels: 0.31-0.44 s instead of 0.40-0.50 s (ResNet-50 0.08-0.11
    instead of 0.11-0.12). Matrices of 64 MiB or more use two threads (numpy copies release the GIL).

    `release(rows)`, if given, is called with each slab of a `w` over 16 MiB once it is in the buffer: a
    mapped source's pages go while the output fills, so the two are never both resident (VGG16's fc6,
    411 MB: peak 1.04x the file instead of 1.57x). A smaller `w` is left to its caller to release whole: a
    release drops the 2 MiB folios around the slab (zoo.mapped.release_pages), pages the next slabs still
    read, which were then faulted in again (ResNet-50's kernels from torch: 17,000 page faults more)."""
    rows, cols = w.shape
    c, h, wd = chw
    release = release if w.nbytes > _RELEASE_BY_SLAB else None

    def copy(lo, hi):
        buf = np.empty((min(_SLAB, hi - lo), cols + _PAD), dtype=w.dtype)
        for i in range(lo, hi, _SLAB):
            n = min(_SLAB, hi - i)
            slab = buf[:n, :cols]
            slab.reshape(n, h, wd, c)[...] = w[i:i + n].reshape(n, c, h, wd).transpose(0, 2, 3, 1)
            if release:
                release(w[i:i + n])
            for j in range(0, cols, _TILE):
                out[j:j + _TILE, i:i + n] = slab[:, j:j + _TILE].T

    half = rows // 2 // 16 * 16  # the threads' output columns meet at a cache line
    if w.nbytes < _THREADED or half == 0:
        copy(0, rows)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(copy, (0, half), (half, rows)))


def rows_to_canonical(w: np.ndarray, shape: tuple[int, ...], chw: tuple[int, int, int], release=None) -> Deferred:
    """A row-major kernel (out, ...) -> the canonical `shape` (..., out), as a Deferred: the transpose runs
    when the writer places the tensor, and `release(w)` follows (the source's pages are no longer needed)."""
    out = w.shape[0]

    def fill(dst):
        rows_to_columns(w.reshape(out, -1), chw, dst.reshape(-1, out), release)
        if release:
            release(w)

    return Deferred(tuple(shape), w.dtype, fill)
