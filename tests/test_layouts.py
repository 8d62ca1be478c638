"""The one foreign-to-canonical transform (zoo.layouts.rows_to_columns) against numpy's plain transposes."""

import numpy as np
import pytest

import zoo.layouts
from zoo.layouts import rows_to_columns


@pytest.mark.parametrize("threads", [1, 2])  # 2: the split that matrices of 64 MiB or more get, forced here
@pytest.mark.parametrize("shape, chw", [
    ((96, 3 * 11 * 11), (3, 11, 11)),  # conv1 OIHW -> HWIO
    ((70, 33), (33, 1, 1)),  # dense (out, in), rows not a multiple of the slab
    ((1000, 4096), (4096, 1, 1)),  # fc8: power-of-two pitch
    ((300, 64 * 6 * 6), (64, 6, 6)),  # dense after a C,H,W flatten: rows reordered to H,W,C
    ((5, 7), (7, 1, 1)),  # fewer rows than one slab
])
def test_rows_to_columns_matches_numpy(shape, chw, threads, monkeypatch):
    monkeypatch.setattr(zoo.layouts, "_THREADED", 1 << 26 if threads == 1 else 0)
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


def test_released_slabs_cover_every_row_once_and_the_result_holds(monkeypatch):
    """The release callback lets a mapped source's pages go while the output fills (on two threads, forced here),
    for a matrix over 16 MiB; a smaller one is released whole by its caller, not slab by slab."""
    monkeypatch.setattr(zoo.layouts, "_THREADED", 0)
    for rows, released in ((2100, 1), (1000, 0)):
        w = np.random.default_rng(2).standard_normal((rows, 2048), dtype=np.float32)
        out = np.empty((2048, rows), np.float32)
        seen = np.zeros(rows, int)
        base = w.__array_interface__["data"][0]

        def release(part, w=w, seen=seen, base=base):
            first = (part.__array_interface__["data"][0] - base) // w.strides[0]
            seen[first:first + part.shape[0]] += 1

        rows_to_columns(w, (2048, 1, 1), out, release)
        np.testing.assert_array_equal(out, w.T)
        assert (seen == released).all()


def _two_size_spec():
    """A conv whose kernel is small (computed into a buffer when written) and a dense over 16 MiB (computed in
    the mapped output file)."""
    from zoo.spec import ModelSpec

    return ModelSpec.from_dict({
        "family": "sizes", "version": "test", "input": {"size": [64, 64], "channels": 3}, "head": "fc", "num_classes": 400,
        "layers": [{"name": "conv", "kind": "conv", "filters": 3, "kernel": 3, "pad": 1},
                   {"name": "flatten", "kind": "flatten"},
                   {"name": "fc", "kind": "dense", "units": 400}]})


def _saved_or_refused(folder, spec, tensors: dict, bad: str | None) -> dict | None:
    """save_weights into `folder`: the file read back, or, where tensor `bad` holds NaN/inf, None once the
    refusal named it and left nothing behind."""
    from safetensors.numpy import load_file

    from zoo.errors import ZooError
    from zoo.weights import save_weights

    out = folder / "w.safetensors"
    if bad:
        with pytest.raises(ZooError, match=f"{bad} holds NaN"):
            save_weights(out, spec, tensors)
        assert list(folder.iterdir()) == []
        return None
    save_weights(out, spec, tensors)
    return load_file(out)


@pytest.mark.parametrize("bad", [None, "conv.kernel", "fc.kernel"])
def test_transforms_are_written_exactly_and_nan_is_caught_on_either_path(tmp_path, bad):
    from zoo.layouts import rows_to_canonical

    spec = _two_size_spec()
    rng = np.random.default_rng(3)
    rows = {"conv.kernel": (rng.standard_normal((3, 27), np.float32), (3, 3, 3)),
            "fc.kernel": (rng.standard_normal((400, 64 * 64 * 3), np.float32), (3, 64, 64))}  # C,H,W flatten order
    assert rows["fc.kernel"][0].nbytes > 1 << 24 > rows["conv.kernel"][0].nbytes
    if bad:
        rows[bad][0][-1, -1] = np.nan
    tensors = {name: rows_to_canonical(w, spec.tensors[name].shape, chw) for name, (w, chw) in rows.items()}
    tensors |= {"conv.bias": np.zeros(3, np.float32), "fc.bias": np.ones(400, np.float32)}
    got = _saved_or_refused(tmp_path, spec, tensors, bad)
    if got is None:
        return
    for name, (w, (c, h, wd)) in rows.items():
        expected = w.reshape(-1, c, h, wd).transpose(2, 3, 1, 0).reshape(spec.tensors[name].shape)
        np.testing.assert_array_equal(got[name], expected)


@pytest.mark.parametrize("bad", [None, "conv.kernel", "fc.kernel"])
def test_plain_arrays_are_written_exactly_from_either_thread_and_nan_is_caught(tmp_path, monkeypatch, bad):
    """Arrays of 32 MiB or more (lowered here) are written by the pool, smaller ones by the calling thread."""
    import threading

    import zoo.weights

    spec = _two_size_spec()
    rng = np.random.default_rng(4)
    tensors = {name: rng.standard_normal(t.shape, np.float32) for name, t in spec.tensors.items()}
    monkeypatch.setattr(zoo.weights, "_POOLED", tensors["fc.kernel"].nbytes)
    where, place = {}, zoo.weights._Placer.place

    def recorded(self, item):  # which thread placed each tensor
        where[item[0]] = threading.current_thread()
        return place(self, item)

    monkeypatch.setattr(zoo.weights._Placer, "place", recorded)
    if bad:
        tensors[bad].reshape(-1)[-1] = np.inf
    got = _saved_or_refused(tmp_path, spec, tensors, bad)
    if got is None:
        return
    assert where["fc.kernel"] is not threading.main_thread()
    assert all(where[name] is threading.main_thread() for name in tensors if name != "fc.kernel")
    for name, arr in tensors.items():
        np.testing.assert_array_equal(got[name], arr)
