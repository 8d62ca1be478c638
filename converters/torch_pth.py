"""Built-in plugin `torch`: PyTorch state dicts saved by torch.save, in either of its formats.

- the zip (torch >= 1.6): `<name>/data.pkl` and one member per storage;
- the legacy stream (torch < 1.6, or `_use_new_zipfile_serialization=False`): pickles of the magic number,
  the protocol version and sys_info, the object, the list of storage keys, then each storage's 8-byte
  element count and bytes.

Read without torch: the restricted unpickler (allowing only the container, tensor-rebuild and storage
globals) and the storages as zero-copy views of the memory-mapped file. No array exists until every tensor
is checked against its storage: inside it, no element read twice (a zero stride), no more elements taken
from a storage than it holds, so the output is bounded by the file's size. Tensors are grouped by module
(`layer1.0.bn1.running_mean` -> layer `layer1.0.bn1`, param `running_mean`) and matched to a spec by the
generic matcher: by name (torchvision's module names are the `@torchvision` specs' layer names), else by
the order and shapes of the weighted layers.
"""

from __future__ import annotations

import math
import re
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from zoo import safe_pickle
from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.mapped import MappedZip
from zoo.sources import Imported, Params, WeightSource, fit_params, map_file, mapping_notes, release_pages

# torch storage classes -> numpy dtypes (bfloat16 is read as its bits and widened to float32 after the checks)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization's MAGIC_NUMBER, PROTOCOL_VERSION
_MAGIC_LONG = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # LONG1 of the magic: how pickle protocols 2-5 write it


class _StorageType(NamedTuple):
    """`torch.FloatStorage` etc.: a tuple, which a pickle's BUILD cannot change (no __dict__, no __setstate__, no
    settable attribute; a frozen dataclass has a __setstate__), so no file changes what a name means for the next."""

    name: str


class _Storage:
    """A storage the pickle names: type and element count at once, its bytes (`array`) once the format finds them."""

    def __init__(self, kind: _StorageType, key: str, numel: int):
        self.kind, self.key, self.numel, self.array = kind, key, numel, None
        self.bfloat16 = kind.name == "BFloat16Storage"
        self.dtype = np.dtype(STORAGE_DTYPES[kind.name])

    def locate(self, buffer, offset: int = 0):
        """Its elements in `buffer` from `offset`: a zero-copy view, refused when they would run past the end."""
        nbytes = self.numel * self.dtype.itemsize
        if nbytes > len(buffer) - offset:
            raise ZooError(f"storage {self.key!r} claims {self.numel} elements of {self.dtype} "
                           f"({nbytes} bytes) where {len(buffer) - offset} remain (truncated?)")
        self.array = np.frombuffer(buffer, dtype=self.dtype, count=self.numel, offset=offset)


def _span(size: tuple, stride: tuple) -> int:
    """Storage elements from a tensor's first to its last, refusing layouts that read an element twice (a zero
    stride makes a 1-element storage a tensor of any size). Each dimension, by increasing stride, must step past
    the ones before: true of every slice, permutation and view; only as_strided interleaves dimensions."""
    if 0 in size:
        return 0
    span = 1
    for step, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if step < span:
            raise ZooError(f"tensor of size {size} with strides {stride} reads storage elements more than once")
        span += step * (n - 1)
    return span


class _Tensor:
    """A tensor rebuilt from the pickle: its storage and checked layout; the array is made on demand."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.count = math.prod(size)

    def numpy(self) -> np.ndarray:
        item = self.storage.dtype.itemsize
        # a stride moves nowhere along a dimension of size 1, nor in an empty tensor: unchecked, so unused
        strides = [s * item if n > 1 and self.count else 0 for n, s in zip(self.size, self.stride)]
        view = np.lib.stride_tricks.as_strided(self.storage.array[self.offset:], shape=self.size, strides=strides,
                                               writeable=False)
        if not self.storage.bfloat16:
            return view
        wide = view.astype(np.uint32)  # bfloat16 is the high half of a float32: widen exactly
        wide <<= 16
        return wide.view(np.float32)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)):
        raise ZooError("malformed tensor record")
    if any(not isinstance(n, int) or n < 0 for n in size + stride) or offset < 0:
        raise ZooError(f"tensor with negative size, stride or offset {size} {stride} {offset}")
    if math.prod(n or 1 for n in size) >= 2**40:  # even an empty one: numpy refuses such shapes
        raise ZooError(f"tensor of size {size}: too large")
    if offset + _span(size, stride) > storage.numel:
        raise ZooError(f"tensor of size {size} at offset {offset} reads past its storage of {storage.numel} elements")
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
} | {("torch", name): _StorageType(name) for name in STORAGE_DTYPES}


class _TorchFile:
    """What both formats share: the mapped file, and one _Storage per key the pickle names."""

    PID_LENGTH = 5  # ('storage', type, key, location, numel)

    def __init__(self, path: Path, data):
        self.path, self.data = path, data
        self.storages: dict[str, _Storage] = {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == self.PID_LENGTH and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise ZooError(f"unsupported persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid[:5]
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(kind, key, numel)
            self._found(storage)
        elif (storage.kind, storage.numel) != (kind, numel):
            raise ZooError(f"storage {key!r} is named both as {storage.numel} {storage.kind.name} and {numel} {kind.name}")
        return storage

    def _found(self, storage: _Storage):
        """A storage first named by the pickle (the zip locates it at once)."""


class ZipTorchFile(_TorchFile):
    """The zip format: the storages are members `<name>/data/<key>`, sliced out of the mapped file."""

    def __init__(self, path: Path, data):
        super().__init__(path, data)
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise ZooError(f"not a torch.save zip nor a legacy torch.save file ({e})", path) from None
        self.members = MappedZip(self.zip, data, path)
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ZooError("no <name>/data.pkl in the zip: not a torch.save file", path)
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._member(self.prefix + "byteorder", required=False)
        if byteorder is not None and bytes(byteorder) != b"little":
            raise ZooError(f"byte order {bytes(byteorder)[:16]!r}: only little-endian files are supported", path)

    def _member(self, name: str, required=True):
        try:
            return self.members.read(name)
        except KeyError:
            if required:
                raise ZooError(f"missing {name} in the zip", self.path) from None
            return None

    def _found(self, storage):
        storage.locate(self._member(f"{self.prefix}data/{storage.key}"))

    def load(self):
        return safe_pickle.load(self._member(self.prefix + "data.pkl"), ALLOWED, self.persistent_load, self.path)


class LegacyTorchFile(_TorchFile):
    """The legacy stream: the storages' bytes follow the pickles, so they are located after the object is read."""

    PID_LENGTH = 6  # ... and view_metadata

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is not None:  # torch has long written None here
            raise ZooError(f"storage view {str(pid[5])[:40]} (an early torch version's): not supported")
        return super().persistent_load(pid)

    def load(self):
        try:
            return self._load()
        except ZooError as e:  # the stream's own checks name no file
            raise (type(e)(safe_pickle.one_line(str(e)), self.path) if e.path is None else e) from None

    def _load(self):
        reader = safe_pickle.BufferReader(self.data)

        def unpickle():
            return safe_pickle.load_next(reader, ALLOWED, self.persistent_load, self.path, "legacy torch.save stream")

        magic, version, sys_info = unpickle(), unpickle(), unpickle()
        if magic != _MAGIC:
            raise ZooError("no torch magic number at the start of the legacy stream")
        if version != _LEGACY_PROTOCOL:
            raise ZooError(f"legacy torch.save protocol version {str(version)[:20]}: only {_LEGACY_PROTOCOL} is known")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise ZooError("not a little-endian file (its sys_info's little_endian is not True): only those are supported")
        obj = unpickle()
        self._locate(unpickle(), len(self.data) - reader.remaining)
        return obj

    def _locate(self, keys, pos: int):
        """Each storage in the order of `keys`: an 8-byte little-endian element count, then its bytes."""
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                and len(set(keys)) == len(keys) == len(self.storages) and set(keys) == set(self.storages)):
            raise ZooError("the list of storage keys does not match the storages the pickle names")
        for key in keys:
            storage = self.storages[key]
            if pos + 8 > len(self.data):
                raise ZooError(f"the file ends before storage {key!r} (truncated?)")
            (count,) = struct.unpack_from("<q", self.data, pos)
            if count != storage.numel:
                raise ZooError(f"storage {key!r} holds {count} elements where the pickle says {storage.numel}")
            storage.locate(self.data, pos + 8)
            pos += 8 + storage.numel * storage.dtype.itemsize


def _is_legacy(head: bytes) -> bool:
    return head[:1] == b"\x80" and _MAGIC_LONG in head[:24]  # a pickle (protocol >= 2) of the magic number


def open_torch_file(path: Path) -> _TorchFile:
    data = map_file(path)
    return (LegacyTorchFile if _is_legacy(bytes(data[:24])) else ZipTorchFile)(path, data)


def _tensors_of(obj) -> dict[str, _Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in obj.items()):
        return obj
    return None


def state_dict_of(obj, path) -> dict[str, _Tensor]:
    """The state dict inside what training scripts save: plain, under 'state_dict' or 'model', 'module.' prefixes."""
    found = _tensors_of(obj)
    if found is None and isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            found = _tensors_of(obj.get(key))
            if found is not None:
                break
    if found is None and isinstance(obj, dict):
        # a state dict with non-tensor entries mixed in (e.g. num_batches_tracked ints): take the tensors
        found = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, _Tensor)} or None
    if not found:
        raise ZooError("found no state dict of tensors (looked at the top level, 'state_dict' and 'model')", path)
    return {re.sub(r"^(module\.)+", "", k): v for k, v in found.items()}


def check_storage_use(state: dict[str, _Tensor], path):
    """No storage gives the state dict's tensors more elements than it holds (each tensor alone was checked
    inside it): what is widened and written is bounded by the file's size."""
    taken = Counter()
    for tensor in state.values():
        taken[tensor.storage] += tensor.count
    for storage, count in taken.items():
        if count > storage.numel:
            raise ZooError(f"tensors take {count} elements from storage {storage.key!r} of {storage.numel}: "
                           "they overlap", path)


def state_dict_params(state: dict[str, np.ndarray]) -> Params:
    """`<module>.<param>` keys grouped by module, in the file's order."""
    layers: Params = {}
    for key, arr in state.items():
        module, _, param = key.rpartition(".")
        layers.setdefault(module, {})[param] = arr
    return layers


class TorchStateDict(WeightSource):
    name = "torch"
    format = "PyTorch torch.save, zip or legacy (state dict)"
    extensions = (".pth", ".pt", ".bin", ".ckpt")

    def sniff(self, path, head):
        return (head.startswith(b"PK\x03\x04") and b"data.pkl" in head) or _is_legacy(head)

    def read(self, path, spec, options):
        try:
            torch_file = open_torch_file(path)
            state = state_dict_of(torch_file.load(), path)
        except (zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError, RuntimeError, EOFError, ValueError) as e:
            raise ZooError(f"corrupt torch.save file ({type(e).__name__}: {e})", path) from None
        check_storage_use(state, path)  # before any array exists: nothing is widened or copied unchecked
        widened = [k for k, t in state.items() if t.storage.bfloat16]
        layers = state_dict_params({k: t.numpy() for k, t in state.items()})
        release = partial(release_pages, torch_file.data)
        fit = fit_params(layers, "torch", spec, path, mapping=options.get("map"), release=release)
        notes = [f"converted bfloat16 to float32 (exact): {', '.join(widened)}"] if widened else []
        kind = "legacy" if isinstance(torch_file, LegacyTorchFile) else "zip"
        return Imported(fit.spec, fit.tensors, notes=notes + mapping_notes(fit), source_format=f"torch-{kind}-state-dict",
                        release=release)


@hookimpl
def zoo_weight_sources():
    return [TorchStateDict()]
