"""Reading pickles from untrusted files without running their code.

`pickle` calls whatever global a stream names; `np.load(allow_pickle=True)` and `torch.load` on a
foreign file therefore run foreign code (CVE-2019-6446). Here `find_class` answers only from an
explicit allow-list, and even numpy's own reconstructors are replaced by stand-ins that check every
shape against the bytes actually present before any array exists. Reads are bounded by the file's
size, so a header claiming 100 GB fails before anything is allocated; big blobs are not copied.

A pickle can also make work without code: its memo hands out one object many times, so a few hundred
bytes describe a list holding one list twice, 40 deep (2**40 leaves when walked as a tree), or a key
nested 150,000 deep that overflows the C stack when hashed. Every walk and every call the unpickler
makes is therefore charged to a `Budget` proportional to the stream, nesting is bounded, and a load
may fill only the containers and stand-ins it created itself, never an allow-list value (which would
change how every later file in the process is read).
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from collections import OrderedDict
from itertools import chain

import numpy as np

from zoo.errors import ZooError

# numpy dtypes a weights pickle may hold; structured and exotic dtypes are refused
_SIMPLE_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1", "O8", "O4"}
MAX_DEPTH = 64  # containers nested deeper are refused: weights pickles nest a handful of levels


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
        self.size = len(self._buf)  # the unpickler's Budget is proportional to it

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

# calls whose result is always a new object that the pickle then fills (SETITEMS) or builds (BUILD)
_FACTORY_IDS = frozenset(map(id, (OrderedDict, _PendingDtype, _reconstruct)))
_BUILT = (_PendingArray, _PendingDtype, OrderedDict)  # stand-ins BUILD may set up; an OrderedDict's state is dropped
_DICTS = (dict, OrderedDict)
_WALKED = frozenset({tuple, list, set, frozenset, dict, OrderedDict, _PendingArray})
_BLOBS = frozenset({str, bytes, bytearray, memoryview})
_BLOB_BYTES = 64  # a string or bytes counts one unit more per 64 bytes: calls may copy it (_codecs.encode)
_KEYS = frozenset({str, bytes, int, bool, type(None)})


def _tree_units(obj, left: int, depth: int = 0) -> int:
    """`obj` walked as a tree: one unit per object reached (a shared one each time), stopping once past
    `left`, so a 2**40-leaf expansion costs `left` steps. Deeper than MAX_DEPTH is refused."""
    kind = type(obj)
    if kind not in _WALKED:
        return 1 + len(obj) // _BLOB_BYTES if kind in _BLOBS else 1
    if depth > MAX_DEPTH:
        raise UnsafePickle(f"refused: the pickle nests containers more than {MAX_DEPTH} deep")
    if kind is _PendingArray:
        if obj.array is None or not obj.array.dtype.hasobject:
            return 1
        items = obj.array.flat
    else:
        items = chain.from_iterable(obj.items()) if kind in _DICTS else obj
    units = 1
    for item in items:
        kind = type(item)
        # scalars inline: most of what is walked (a call per item would double a torch load's overhead)
        units += _tree_units(item, left - units, depth + 1) if kind in _WALKED or kind in _BLOBS else 1
        if units > left:
            break
    return units


class Budget:
    """What one stream may make the unpickler build or walk beyond reading it: PER_BYTE objects per byte of the
    stream, plus BASE. Every call's arguments, BUILD's state, each persistent id and the loaded object are
    walked as trees and charged (weights pickles spend under 0.25 per byte)."""

    PER_BYTE, BASE = 2, 1 << 16

    def __init__(self, size: int):
        self.size, self.spent = size, 0
        self.allowance = self.PER_BYTE * size + self.BASE

    def charge(self, obj) -> None:
        left = self.allowance - self.spent
        units = _tree_units(obj, left)
        if units > left:
            raise UnsafePickle(f"refused: the pickle expands to more than {self.allowance:,} objects, out of proportion "
                               f"to its {self.size:,} bytes (references shared or repeated many times)")
        self.spent += units


def _key(key):
    # dict keys and set members are hashed on insertion: a tuple nested 150k deep overflows the C stack in
    # hash(), ints beyond 64 bits can all collide; weights pickles key by names and small numbers
    kind = type(key)
    if kind not in _KEYS or (kind is int and not -2**63 <= key < 2**63):
        raise UnsafePickle(f"refused a dict key or set member of type {kind.__name__}")
    return key


def _refused(opcode: str):
    def load_refused(self):
        raise UnsafePickle(f"refused opcode {opcode}: numpy and torch never write it")
    return load_refused


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler: it asks the reader for each length before allocating for it,
    where the C one allocates first (a 100 GB claim would be malloc'ed). Weight pickles hold few
    opcodes and large blobs, so the Python loop costs nothing measurable.

    `file` is a BufferReader or SmallReader (their `size` sets the Budget). On top of pickle's
    opcodes: calls go only to allow-list values and are charged their arguments; dict keys are
    scalars; containers are filled and stand-ins built only when this unpickler made them; `load`
    returns resolved objects (real arrays and dtypes)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, allowed: dict, persistent_load=None):
        # encoding="bytes": Python 2 strings arrive as bytes, which become array buffers without a copy
        super().__init__(file, encoding="bytes")
        self._allowed = allowed
        self._callables = {id(v) for v in allowed.values()}
        self._made = {}  # id -> object, for what this unpickler created (held, so no id is reused)
        self.budget = Budget(file.size)
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def load(self):
        obj = super().load()
        self.budget.charge(obj)  # bounds what resolve and any later walk of the result do
        return resolve(obj)

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"refused to load: the pickle calls {module}.{name}, which is not on zoo's allow-list "
                "(the file may be malicious; nothing from it was run)"
            ) from None

    def _new(self, obj):
        self._made[id(obj)] = obj
        return obj

    def _own(self, obj, kinds):
        if type(obj) not in kinds or self._made.get(id(obj)) is not obj:
            raise UnsafePickle(f"refused: the pickle changes a {type(obj).__name__} it did not create")
        return obj

    def _call(self, func, args):
        if id(func) not in self._callables:
            raise UnsafePickle(f"refused a call of a {type(func).__name__}: only allow-list globals are called")
        self.budget.charge(args)
        obj = func(*args)
        return self._new(obj) if id(func) in _FACTORY_IDS else obj

    def _instantiate(self, klass, args):  # INST and OBJ: a call, with the class's own checks (its __init__)
        self.append(self._call(klass, args))

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_reduce  # cls(*args): no instance skips its __init__ checks

    def load_build(self):
        state = self.stack.pop()
        inst = self._own(self.stack[-1], _BUILT)
        self.budget.charge(state)
        if type(inst) is not OrderedDict:  # an OrderedDict's attributes (torch's _metadata) are not needed
            inst.__setstate__(state)
    dispatch[pickle.BUILD[0]] = load_build

    def load_binpersid(self):
        pid = self.stack.pop()
        self.budget.charge(pid)
        self.append(self.persistent_load(pid))
    dispatch[pickle.BINPERSID[0]] = load_binpersid

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # pickle allocates n bytes before reading them
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_empty_list(self):
        self.append(self._new([]))
    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list

    def load_empty_dictionary(self):
        self.append(self._new({}))
    dispatch[pickle.EMPTY_DICT[0]] = load_empty_dictionary

    def load_empty_set(self):
        self.append(self._new(set()))
    dispatch[pickle.EMPTY_SET[0]] = load_empty_set

    # pop_mark first, then self.append: it switches the stack, and with it the bound append
    def load_list(self):
        items = self.pop_mark()
        self.append(self._new(items))
    dispatch[pickle.LIST[0]] = load_list

    def load_dict(self):
        items = self.pop_mark()
        self.append(self._new(dict(zip(map(_key, items[::2]), items[1::2]))))
    dispatch[pickle.DICT[0]] = load_dict

    def load_frozenset(self):
        items = self.pop_mark()
        self.append(frozenset(map(_key, items)))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_append(self):
        value = self.stack.pop()
        self._own(self.stack[-1], (list,)).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._own(self.stack[-1], (list,)).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._own(self.stack[-1], _DICTS)[_key(key)] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._own(self.stack[-1], _DICTS).update(zip(map(_key, items[::2]), items[1::2]))
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        self._own(self.stack[-1], (set,)).update(map(_key, items))
    dispatch[pickle.ADDITEMS[0]] = load_additems

    # NEWOBJ_EX is only needed for keyword-only constructors; EXT* read copyreg's process-wide registry and cache
    for _opcode in ("NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _opcode)[0]] = _refused(_opcode)
    del _opcode


def resolve(obj, depth: int = 0):
    """Replace the stand-ins left by unpickling with real arrays, through dicts, lists and tuples.
    RestrictedUnpickler.load has done so (within its budget): what it returns is resolved already."""
    if depth > MAX_DEPTH:
        raise UnsafePickle(f"refused: the pickle nests containers more than {MAX_DEPTH} deep")
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
        data = io.BytesIO.read(self, n)  # BytesIO allocates only what is there; checking after is faster
        if n is not None and len(data) < n:
            raise EOFError(f"data claims {n} bytes where only {len(data)} remained")
        return data


def one_line(message: str, limit: int = 400) -> str:
    """`message` as one line of at most `limit` characters: names and reprs in it come from the file, so what
    would break the line is escaped and what is long is cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[:limit])
    return text + ("..." if len(message) > limit else "")


# what pickle raises on a malformed stream
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, MemoryError, OverflowError,
                  KeyError, IndexError, AttributeError, UnicodeDecodeError, RecursionError)


def load(buffer, allowed: dict = NUMPY_GLOBALS, persistent_load=None, path=None):
    """Unpickle one object from `buffer` (bytes, or a slice of a mapped file) with only `allowed` globals.
    Either reader is bounded by the buffer: a short read ends the load, nothing is allocated for a claim."""
    return load_next(SmallReader(bytes(buffer)) if len(buffer) <= SMALL else BufferReader(buffer), allowed, persistent_load, path)


def load_next(reader, allowed: dict = NUMPY_GLOBALS, persistent_load=None, path=None, what: str = "pickle"):
    """The next pickle from `reader` (a BufferReader or SmallReader), with a memo of its own: a stream of pickles
    (torch's legacy format) is read one call each. Any failure is a one-line ZooError naming `path`; a malformed
    stream is "not a valid `what`"."""
    try:
        return RestrictedUnpickler(reader, allowed, persistent_load).load()
    except ZooError as e:
        if e.path is not None:
            raise
        raise type(e)(one_line(str(e)), path) from None
    except _PICKLE_ERRORS as e:
        raise ZooError(one_line(f"not a valid {what} ({type(e).__name__}: {e})"), path) from None
