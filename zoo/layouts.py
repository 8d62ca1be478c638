"""Tensors on their way to the canonical layout: the one foreign-to-canonical transpose, and Deferred
tensors that are computed straight into their place in the output file.

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
    """A tensor computed straight into its place in the output file (a layout transform of a mapped
    source): no canonical copy of the model is ever held in memory.

    `fill(dst)` writes the tensor into `dst`, a C-contiguous array of `shape` and `dtype`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]


_SLAB = 32  # source rows per step: the slab (plus padding) stays in L2 while it is scattered into columns
_PAD = 16  # floats added to the slab's row pitch: a power-of-two pitch (fc7's 4096) thrashes cache sets


def rows_to_columns(w: np.ndarray, chw: tuple[int, int, int], out: np.ndarray) -> None:
    """out[(h, w, c), o] = w[o, (c, h, w)]: every foreign-to-canonical transform is this one transpose.

    Conv (out, in, kh, kw) -> HWIO is chw = (in, kh, kw); dense (out, in) -> (in, out) is (in, 1, 1); a
    dense layer after Caffe/PyTorch's C,H,W flatten is its feature map's (C, H, W). numpy copies a
    transposed view element by element with a large stride (0.5 s for fc7); copying a slab of rows into
    a padded buffer first, permuting (c, h, w) -> (h, w, c) on the way, then writing the slab's columns
    is 5-6x faster. Big matrices use two threads (numpy copies release the GIL)."""
    rows, cols = w.shape
    c, h, wd = chw

    def copy(lo, hi):
        pad = np.empty((_SLAB, cols + _PAD), dtype=w.dtype)
        for i in range(lo, hi, _SLAB):
            n = min(_SLAB, hi - i)
            slab = pad[:n, :cols]
            slab.reshape(n, h, wd, c)[...] = w[i:i + n].reshape(n, c, h, wd).transpose(0, 2, 3, 1)
            out[:, i:i + n] = slab.T

    half = rows // 2 // _SLAB * _SLAB
    if w.nbytes < 1 << 22 or half == 0:
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
        rows_to_columns(w.reshape(out, -1), chw, dst.reshape(-1, out))
        if release:
            release(w)

    return Deferred(tuple(shape), w.dtype, fill)
