"""Built-in plugin `torch`: PyTorch state dicts saved by torch.save (zip format, torch >= 1.6).

Read without torch: zipfile for the directory, the restricted unpickler for `data.pkl` (allowing only
the container, tensor-rebuild and storage globals), and the storages as zero-copy views of the
memory-mapped file. Tensors are grouped by module (`layer1.0.bn1.running_mean` -> layer `layer1.0.bn1`,
param `running_mean`) and matched to a spec by the generic matcher: by name (torchvision's module names
are the `@torchvision` specs' layer names), else by the order and shapes of the weighted layers.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from zoo import safe_pickle
from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.sources import Imported, Params, WeightSource, fit_params, map_file, mapping_notes, release_pages

# torch storage classes -> numpy dtypes (bfloat16 is widened to float32 after reading)
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's pre-1.6 magic number


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Tensor:
    """A tensor rebuilt from the pickle: a checked strided view of its storage."""

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array, self.bfloat16 = array, bfloat16

    def numpy(self) -> np.ndarray:
        if self.bfloat16:  # bfloat16 is the high half of a float32: widen exactly
            return (np.ascontiguousarray(self.array).astype(np.uint32) << 16).view(np.float32)
        return self.array


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    data, bfloat16 = storage
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise ZooError("malformed tensor record")
    if any(not isinstance(n, int) or n < 0 for n in size + stride) or offset < 0:
        raise ZooError(f"tensor with negative size, stride or offset {size} {stride} {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= data.size:
        raise ZooError(f"tensor of size {size} at offset {offset} reads past its storage of {data.size} elements")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size, strides=[s * item for s in stride], writeable=False)
    return _Tensor(view, bfloat16)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
} | {("torch", name): _StorageType(name) for name in STORAGE_DTYPES}


class TorchFile:
    """The storages of a torch.save zip, sliced out of the mapped file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = map_file(path)
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            if bytes(self.data[:len(_LEGACY_MAGIC)]) == _LEGACY_MAGIC:
                raise ZooError("pre-1.6 torch.save format (not a zip): re-save it with torch>=1.6, "
                               "e.g. torch.save(torch.load(f, weights_only=True), 'new.pth')", path) from None
            raise ZooError(f"not a torch.save zip file ({e})", path) from None
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ZooError("no <name>/data.pkl in the zip: not a torch.save file", path)
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._member(self.prefix + "byteorder", required=False)
        if byteorder is not None and bytes(byteorder) != b"little":
            raise ZooError(f"byte order {bytes(byteorder)[:16]!r}: only little-endian files are supported", path)
        self.storages: dict[str, tuple] = {}

    def _member(self, name: str, required=True):
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            if required:
                raise ZooError(f"missing {name} in the zip", self.path) from None
            return None
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; a small one is fine to inflate
            if info.file_size > len(self.data) * 4:
                raise ZooError(f"{name} claims {info.file_size} bytes", self.path)
            return memoryview(self.zip.read(name))
        # the data follows the local header: 30 bytes + name + extra field
        start = info.header_offset
        if not 0 <= start <= len(self.data) - 30 or bytes(self.data[start:start + 4]) != b"PK\x03\x04":
            raise ZooError(f"{name}: no local zip header where the directory says", self.path)
        name_len, extra_len = struct.unpack("<HH", self.data[start + 26:start + 30])
        begin = start + 30 + name_len + extra_len
        if begin + info.file_size > len(self.data):
            raise ZooError(f"{name} claims {info.file_size} bytes past the end of the file (truncated?)", self.path)
        return memoryview(self.data)[begin:begin + info.file_size]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ZooError(f"unsupported persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if (kind.name, key) not in self.storages:
            dtype = STORAGE_DTYPES[kind.name]
            bfloat16 = dtype == "bfloat16"
            dtype = np.dtype(np.uint16 if bfloat16 else dtype)
            raw = self._member(f"{self.prefix}data/{key}")
            if not isinstance(numel, int) or numel * dtype.itemsize > len(raw):
                raise ZooError(f"storage {key} claims {numel} elements of {dtype} in {len(raw)} bytes")
            self.storages[(kind.name, key)] = (np.frombuffer(raw, dtype=dtype, count=numel), bfloat16)
        return self.storages[(kind.name, key)]

    def load(self):
        return safe_pickle.load(self._member(self.prefix + "data.pkl"), ALLOWED, self.persistent_load, self.path)


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


def state_dict_params(state: dict[str, np.ndarray]) -> Params:
    """`<module>.<param>` keys grouped by module, in the file's order."""
    layers: Params = {}
    for key, arr in state.items():
        module, _, param = key.rpartition(".")
        layers.setdefault(module, {})[param] = arr
    return layers


class TorchStateDict(WeightSource):
    name = "torch"
    format = "PyTorch torch.save zip (state dict)"
    extensions = (".pth", ".pt", ".bin", ".ckpt")

    def sniff(self, path, head):
        return (head.startswith(b"PK\x03\x04") and b"data.pkl" in head) or head.startswith(_LEGACY_MAGIC)

    def read(self, path, spec, options):
        try:
            torch_file = TorchFile(path)
            state = state_dict_of(torch_file.load(), path)
        except (zipfile.BadZipFile, zlib.error, struct.error, NotImplementedError, RuntimeError, EOFError, ValueError) as e:
            raise ZooError(f"corrupt torch.save zip ({type(e).__name__}: {e})", path) from None
        widened = [k for k, t in state.items() if t.bfloat16]
        layers = state_dict_params({k: t.numpy() for k, t in state.items()})
        fit = fit_params(layers, "torch", spec, path, mapping=options.get("map"),
                         release=lambda w: release_pages(torch_file.data, w))
        notes = [f"converted bfloat16 to float32 (exact): {', '.join(widened)}"] if widened else []
        return Imported(fit.spec, fit.tensors, notes=notes + mapping_notes(fit), source_format="torch-zip-state-dict")


@hookimpl
def zoo_weight_sources():
    return [TorchStateDict()]
