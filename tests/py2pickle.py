"""Writes .npy files byte-for-byte the way numpy under Python 2 did (cPickle protocol 2, `str` data).

No Python 2 exists here, so this emits the opcodes Python 2's cPickle writes for `np.save(dict)`:
arrays as `numpy.core.multiarray._reconstruct` + BUILD with a BINSTRING payload, dict keys as
SHORT_BINSTRING. numpy's own `np.load(..., allow_pickle=True, encoding="latin1")` reads these files
(tests check that), so they are faithful to the format users have.
"""

import struct

import numpy as np


def _str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def _int(n: int) -> bytes:
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def _dtype(dt: np.dtype) -> bytes:
    code = b"O8" if dt == object else dt.str[1:].encode()
    order = b"|" if dt.str[0] == "|" else b"<"
    return (b"cnumpy\ndtype\n" + _str(code) + _int(0) + _int(1) + b"\x87R"
            + b"(" + _int(3) + _str(order) + b"NNN" + _int(-1) + _int(-1) + _int(dt.flags) + b"tb")


def _array(a: np.ndarray) -> bytes:
    head = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b") + b"\x87R"
    shape = b"(" + b"".join(_int(n) for n in a.shape) + b"t"
    if a.dtype == object:
        data = b"]" + b"(" + b"".join(_obj(x) for x in a.ravel()) + b"e"
    else:
        data = _str(np.ascontiguousarray(a).tobytes())
    return head + b"(" + _int(1) + shape + _dtype(a.dtype) + b"\x89" + data + b"tb"


def _obj(x) -> bytes:
    if isinstance(x, np.ndarray):
        return _array(x)
    if isinstance(x, str):
        return _str(x.encode("latin1"))
    if isinstance(x, dict):
        return b"}(" + b"".join(_obj(k) + _obj(v) for k, v in x.items()) + b"u"
    if isinstance(x, (list, tuple)):
        return b"](" + b"".join(_obj(v) for v in x) + b"e"
    raise TypeError(type(x))


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _obj(obj) + b"."


def save_py2_npy(path, obj) -> None:
    """np.save(path, obj) as numpy under Python 2 wrote it, for a dict/list of float arrays."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += " " * (16 - (10 + len(header) + 1) % 16) + "\n"
    payload = py2_pickle(np.array(obj, dtype=object) if not isinstance(obj, dict) else _wrap(obj))
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1") + payload)


def _wrap(d: dict) -> np.ndarray:
    arr = np.empty((), dtype=object)
    arr[()] = d
    return arr
