"""The one foreign-to-canonical transform (zoo.layouts.rows_to_columns) against numpy's plain transposes."""

import numpy as np
import pytest

from zoo.layouts import rows_to_columns


@pytest.mark.parametrize("shape, chw", [
    ((96, 3 * 11 * 11), (3, 11, 11)),  # conv1 OIHW -> HWIO
    ((70, 33), (33, 1, 1)),  # dense (out, in), rows not a multiple of the slab
    ((1000, 4096), (4096, 1, 1)),  # fc8: two threads, power-of-two pitch
    ((300, 64 * 6 * 6), (64, 6, 6)),  # dense after a C,H,W flatten: rows reordered to H,W,C
    ((5, 7), (7, 1, 1)),  # fewer rows than one slab
])
def test_rows_to_columns_matches_numpy(shape, chw):
    w = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    c, h, wd = chw
    expected = w.reshape(shape[0], c, h, wd).transpose(2, 3, 1, 0).reshape(-1, shape[0])
    out = np.full(expected.shape, np.nan, np.float32)
    rows_to_columns(w, chw, out)
    np.testing.assert_array_equal(out, expected)


def test_rows_to_columns_casts_into_the_output_dtype():
    w = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float16)
    out = np.empty((48, 64), np.float32)
    rows_to_columns(w, (48, 1, 1), out)
    np.testing.assert_array_equal(out, w.T.astype(np.float32))


def test_released_slabs_cover_every_row_once_and_the_result_holds():
    """The release callback lets a mapped source's pages go while the output fills (two threads here)."""
    w = np.random.default_rng(2).standard_normal((1000, 2048), dtype=np.float32)
    out = np.empty((2048, 1000), np.float32)
    seen = np.zeros(1000, int)
    base = w.__array_interface__["data"][0]

    def release(rows):
        first = (rows.__array_interface__["data"][0] - base) // w.strides[0]
        seen[first:first + rows.shape[0]] += 1

    rows_to_columns(w, (2048, 1, 1), out, release)
    np.testing.assert_array_equal(out, w.T)
    assert (seen == 1).all()
