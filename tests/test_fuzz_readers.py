"""Mutated bytes of small valid files: every case is a result or a ZooError, never another exception."""

import pickle

import numpy as np
import pytest
from conftest import mutations, small_layers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo.converters.caffe_npy import npy_params, read_npy_object

from zoo import ZooError, safe_pickle


@pytest.mark.parametrize("protocol", [2, 4])
def test_mutated_npy_files_fail_cleanly(tmp_path, protocol):
    arr = np.empty((), dtype=object)
    arr[()] = small_layers()
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (63 - len(header)) + b"\n"
    valid = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + pickle.dumps(arr, protocol=protocol)
    path = tmp_path / "m.npy"
    outcomes = {"ok": 0, "error": 0}
    for data in mutations(valid, 300, seed=protocol):
        path.write_bytes(data)
        try:
            npy_params(read_npy_object(path), path)
            outcomes["ok"] += 1
        except ZooError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100  # most mutations must be caught, not silently accepted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_another_exception(data):
    try:
        safe_pickle.load(data)
    except ZooError:
        pass


def test_huge_length_claims_are_refused_before_allocating():
    import struct

    # BINBYTES8 claiming 100 GB with 10 bytes present
    data = b"\x80\x04\x8e" + struct.pack("<Q", 100 * 2**30) + b"x" * 10 + b"."
    with pytest.raises(ZooError, match="claims"):
        safe_pickle.load(data)
