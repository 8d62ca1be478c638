"""Reading pickles from untrusted files without running their code.

`pickle` calls whatever global a stream names; `np.load(allow_pickle=True)` and `torch.load` on a
foreign file therefore run foreign code (CVE-2019-6446). Here `find_class` answers only from an
explicit allow-list, and even numpy's own reconstructors are replaced by stand-ins that check every
shape against the bytes actually present before any array exists. Reads are bounded by the file's
size, so a header claiming 100 GB fails before anything is allocated; big blobs are not copied.
"""

from __future__ import annotations

import io
import math
import pickle
import struct

import numpy as np

from zoo.errors import ZooError

# numpy dtypes a weights pickle may hold; structured and exotic dtypes are refused
_SIMPLE_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1", "O8", "O4"}


class UnsafePickle(ZooError):
    pass


class BufferReader:
    """A file-like reader over a buffer (an mmap'ed file, bytes) for the unpickler.

    A read past the end fails before anything is allocated for it; large reads come back as
    zero-copy memoryviews, so arrays built on them share the mapped file's pages.
    """

    ZERO_COPY_MIN = 1 << 16  # smaller reads are bytes: they may become dict keys or strings

    def __init__(self, buffer):
        self._buf = memoryview(buffer).cast("B")
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n) -> memoryview:
        if n is None or n < 0:
            n = self.remaining
        if n > self.remaining:
            raise EOFError(f"data claims {n} bytes where only {self.remaining} remain")
        view = self._buf[self._pos:self._pos + n]
        self._pos += n
        return view

    def read(self, n=-1):
        view = self._take(n)
        return view if len(view) >= self.ZERO_COPY_MIN else view.tobytes()

    def readinto(self, buffer):
        out = memoryview(buffer).cast("B")
        view = self._take(min(len(out), self.remaining))
        out[:len(view)] = view
        return len(view)

    def readline(self, size=-1):
        # only GLOBAL/INST opcodes read lines (module and attribute names): scan a little at a time
        end = len(self._buf) if size is None or size < 0 else min(len(self._buf), self._pos + size)
        pos = self._pos
        while pos < end:
            i = bytes(self._buf[pos:min(pos + 256, end)]).find(b"\n")
            if i >= 0:
                return self._take(pos + i + 1 - self._pos).tobytes()
            pos += 256
        return self._take(end - self._pos).tobytes()


class _NDArrayClass:
    """Stands for `numpy.ndarray` in a stream: only usable as `_reconstruct`'s first argument."""


class _PendingDtype:
    def __init__(self, spec, align=False, copy=True):
        spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
        if not isinstance(spec, str) or spec not in _SIMPLE_DTYPES:
            raise UnsafePickle(f"refused numpy dtype {spec!r}")
        self.spec, self.byteorder = spec, "|"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or any(s is not None for s in state[2:5]):
            raise UnsafePickle("refused a structured or sub-array numpy dtype")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise UnsafePickle(f"refused numpy byte order {order!r}")
        self.byteorder = order

    def resolve(self) -> np.dtype:
        order = self.byteorder if self.byteorder in "<>" else "="
        return np.dtype(self.spec).newbyteorder(order) if self.spec[0] != "O" else np.dtype(object)


def _checked_array(data, dtype, shape, order: str) -> np.ndarray:
    if not isinstance(dtype, _PendingDtype):
        raise UnsafePickle("array without a numpy dtype")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and 0 <= n < 2**40 for n in shape):
        raise UnsafePickle(f"bad array shape {shape!r}")
    dt = dtype.resolve()
    count = math.prod(shape)
    if dt == object:
        if not isinstance(data, list) or len(data) != count:
            raise UnsafePickle(f"object array of shape {shape} with {type(data).__name__} data")
        arr = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            arr[i] = item
        return arr.reshape(shape, order=order)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsafePickle(f"array data is a {type(data).__name__}, not bytes")
    if count * dt.itemsize != len(data):
        raise ZooError(f"array of shape {shape} {dt} needs {count * dt.itemsize} bytes, the file holds {len(data)}")
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order)


class _PendingArray:
    """What `numpy.core.multiarray._reconstruct` returns here; BUILD fills it from checked state."""

    array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickle("bad numpy array state")
        shape, dtype, fortran, data = state[-4:]
        self.array = _checked_array(data, dtype, shape, "F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    # numpy always writes _reconstruct(ndarray, (0,), b'b'); anything else is not numpy's doing
    if cls is not _NDArrayClass or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickle(f"refused numpy _reconstruct{(cls, shape, typecode)!r}")
    return _PendingArray()


def _frombuffer(buf, dtype, shape, order):
    return _checked_array(bytes(buf) if isinstance(buf, pickle.PickleBuffer) else buf, dtype, shape, order)


def _latin1_encode(text, encoding="latin1"):
    # how Python 3 pickles bytes under protocol 2: _codecs.encode(str, "latin1"); no other codec is allowed
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickle(f"refused _codecs.encode with {encoding!r}")
    return text.encode("latin1")


NUMPY_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NDArrayClass,
    ("numpy", "dtype"): _PendingDtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler: it asks the reader for each length before allocating for it,
    where the C one allocates first (a 100 GB claim would be malloc'ed). Weight pickles hold few
    opcodes and large blobs, so the Python loop costs nothing measurable."""

    def __init__(self, file, allowed: dict, persistent_load=None):
        # encoding="bytes": Python 2 strings arrive as bytes, which become array buffers without a copy
        super().__init__(file, encoding="bytes")
        self._allowed = allowed
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refused to load: the pickle calls {module}.{name}, which is not on zoo's allow-list "
                "(the file may be malicious; nothing from it was run)"
            ) from None


def resolve(obj, depth: int = 0):
    """Replace the stand-ins left by unpickling with real arrays, through dicts, lists and tuples."""
    if depth > 64:
        raise ZooError("pickle nests containers too deeply")
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise UnsafePickle("numpy array without state")
        arr = obj.array
        if arr.dtype == object:
            out = np.empty(arr.size, dtype=object)
            for i, item in enumerate(arr.ravel()):
                out[i] = resolve(item, depth + 1)
            return out.reshape(arr.shape)
        return arr
    if isinstance(obj, dict):
        return {resolve(k, depth + 1): resolve(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(x, depth + 1) for x in obj)
    if isinstance(obj, _PendingDtype):
        return obj.resolve()
    return obj


SMALL = 1 << 20  # bytes: a pickle this size is copied and read through io.BytesIO (torch's data.pkl: 3x faster)


class SmallReader(io.BytesIO):
    """A small pickle in memory: BytesIO's reads, refusing a length claim past the end as BufferReader does."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.size = len(data)

    def read(self, n=-1):
        if n is not None and n > self.size - self.tell():
            raise EOFError(f"data claims {n} bytes where only {self.size - self.tell()} remain")
        return super().read(n)


def load(buffer, allowed: dict = NUMPY_GLOBALS, persistent_load=None, path=None):
    """Unpickle one object from `buffer` (bytes, or a slice of a mapped file) with only `allowed` globals.
    Either reader is bounded by the buffer: a short read ends the load, nothing is allocated for a claim."""
    try:
        file = SmallReader(bytes(buffer)) if len(buffer) <= SMALL else BufferReader(buffer)
        raw = RestrictedUnpickler(file, allowed, persistent_load).load()
        return resolve(raw)
    except ZooError as e:
        raise type(e)(str(e), path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, MemoryError, OverflowError,
            KeyError, IndexError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        raise ZooError(f"not a valid pickle ({type(e).__name__}: {e})", path) from None
