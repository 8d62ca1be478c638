"""Built-in plugin `h5`: Keras weights in HDF5.

- Keras 3 `model.save_weights("x.weights.h5")`: `layers/<auto name>/vars/0..n`; the layer's real name
  is the `name` attribute of `vars`.
- legacy `model.save("x.h5")` (and Keras 2 `save_weights("x.h5")`): `[model_weights/]<layer>/...`
  with `layer_names` and per-layer `weight_names` attributes.

Keras' layout is zoo's canonical one, so tensors are taken as they are. A layer's variables are taken
by position, as Keras itself loads these files (the names inside differ across Keras versions);
layers are matched to the spec by name, else by order and shape (printed), or by `--map`.

A dataset stored contiguously (h5py's default, and what Keras writes) is taken as a zero-copy view of
the memory-mapped file, handed to the core as a Deferred copy that lets the source's pages go behind
it: no copy of the model in memory (ResNet-50: peak 1.7x the file's size before, 100 MB read through
HDF5 into fresh memory and then copied again). Other layouts (chunked, compressed, compact, external)
are read through h5py.
"""

from __future__ import annotations

import re

import numpy as np

from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.layouts import Deferred
from zoo.sources import Imported, Params, WeightSource, fit_params, map_file, mapping_notes, release_pages

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _natural(name: str):
    """conv2d, conv2d_1, conv2d_2, ..., conv2d_10: Keras' creation order of auto-named layers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


class _Reader:
    def __init__(self, path, max_bytes: int, data=b""):
        self.path, self.max_bytes, self.data = path, max_bytes, data  # data: the mapped file (map_file)

    def array(self, dataset) -> np.ndarray:
        import h5py

        if not isinstance(dataset, h5py.Dataset):
            raise ZooError(f"{dataset.name} is not a dataset", self.path)
        dtype = dataset.dtype
        if not np.issubdtype(dtype, np.floating):
            raise ZooError(f"{dataset.name} is {dtype}, not float", self.path)
        shape = dataset.shape
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > self.max_bytes:  # checked before reading: a corrupt header must not allocate gigabytes
            raise ZooError(f"{dataset.name} claims {count * dtype.itemsize:,} bytes, more than any tensor of a registered spec", self.path)
        # stored contiguously, in the IEEE format numpy reads (not a custom float HDF5 would convert): the bytes as they are
        if (dataset.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS and dataset.id.get_type() == h5py.h5t.py_create(dtype)
                and (offset := dataset.id.get_offset()) is not None and count and offset + count * dtype.itemsize <= len(self.data)):
            return np.frombuffer(self.data, dtype, count, offset).reshape(shape)
        return dataset[()]

    def keras3(self, group, prefix="") -> Params:
        layers = {}
        for key in sorted(group, key=_natural):
            sub = group[key]
            members = set(sub)
            variables = sub["vars"] if "vars" in members else None
            name = prefix + (key if variables is None else _text(variables.attrs.get("name", key)))
            if variables is not None and (n := len(variables)):
                layers[name] = {str(i): self.array(variables[str(i)]) for i in range(n)}
            if "layers" in members:  # a nested model
                layers.update(self.keras3(sub["layers"], name + "/"))
        return layers

    def legacy(self, root) -> Params:
        layers = {}
        for name in (_text(n) for n in root.attrs["layer_names"]):
            weight_names = [_text(n) for n in root[name].attrs.get("weight_names", [])]
            if weight_names:  # in the layer's variable order, as Keras' own loader takes them
                layers[name] = {str(i): self.array(root[name][wn]) for i, wn in enumerate(weight_names)}
        return layers


def read_h5_params(path, max_bytes: int, data=b"") -> Params:
    """{layer: {position: array}}; with `data` (the file, mapped), contiguous datasets are views of it."""
    import h5py

    reader = _Reader(path, max_bytes, data)
    try:
        with h5py.File(path, "r") as f:
            if "layers" in f and "layer_names" not in f.attrs:
                return reader.keras3(f["layers"])
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise ZooError("an HDF5 file, but neither Keras 3 weights (layers/...) nor a legacy Keras h5 (layer_names)", path)
            return reader.legacy(root)
    except ZooError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # h5py's errors for corrupt files
        raise ZooError(f"not a readable Keras HDF5 file ({type(e).__name__}: {e})", path) from None


class KerasH5(WeightSource):
    name = "h5"
    format = "Keras HDF5 weights (.weights.h5, legacy .h5)"
    extensions = (".h5", ".hdf5", ".keras")

    def sniff(self, path, head):
        return head.startswith(_HDF5_MAGIC)

    def read(self, path, spec, options):
        from zoo.registry import all_specs

        candidates = [spec] if spec else list(all_specs().values())
        largest = max(t.size * np.dtype(np.float64).itemsize for s in candidates for t in s.tensors.values())
        data = map_file(path)
        layers = read_h5_params(path, largest, data)
        if not layers:
            raise ZooError("holds no layer with weights", path)
        fit = fit_params(layers, "keras", spec, path, mapping=options.get("map"), candidates=candidates)
        tensors = {name: _copy_of(arr, data) for name, arr in fit.tensors.items()}
        return Imported(fit.spec, tensors, notes=mapping_notes(fit), source_format="keras-h5")


_CHUNK = 1 << 22  # elements copied between releases of the source's pages


def _copy_of(arr, data):
    """A Deferred copy that lets the mapped source's pages go behind it (release_pages ignores arrays in memory)."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        return arr

    def fill(dst):
        src, flat = arr.reshape(-1), dst.reshape(-1)
        for i in range(0, src.size, _CHUNK):
            flat[i:i + _CHUNK] = src[i:i + _CHUNK]
            release_pages(data, src[i:i + _CHUNK])

    return Deferred(arr.shape, arr.dtype, fill)


@hookimpl
def zoo_weight_sources():
    return [KerasH5()]
