"""Built-in plugin `h5`: Keras weights in HDF5.

- Keras 3 `model.save_weights("x.weights.h5")`: `layers/<auto name>/vars/0..n`; the layer's real name
  is the `name` attribute of `vars`.
- legacy `model.save("x.h5")` (and Keras 2 `save_weights("x.h5")`): `[model_weights/]<layer>/...`
  with `layer_names` and per-layer `weight_names` attributes.

Keras' layout is zoo's canonical one, so tensors are taken as they are. A layer's variables are taken
by position, as Keras itself loads these files (the names inside differ across Keras versions);
layers are matched to the spec by name, else by order and shape (printed), or by `--map`.
"""

from __future__ import annotations

import re

import numpy as np

from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.sources import Imported, Params, WeightSource, fit_params, mapping_notes

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _natural(name: str):
    """conv2d, conv2d_1, conv2d_2, ..., conv2d_10: Keras' creation order of auto-named layers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


class _Reader:
    def __init__(self, path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes

    def array(self, dataset) -> np.ndarray:
        import h5py

        if not isinstance(dataset, h5py.Dataset):
            raise ZooError(f"{dataset.name} is not a dataset", self.path)
        if not np.issubdtype(dataset.dtype, np.floating):
            raise ZooError(f"{dataset.name} is {dataset.dtype}, not float", self.path)
        nbytes = int(np.prod(dataset.shape, dtype=np.int64)) * dataset.dtype.itemsize
        if nbytes > self.max_bytes:  # checked before reading: a corrupt header must not allocate gigabytes
            raise ZooError(f"{dataset.name} claims {nbytes:,} bytes, more than any tensor of a registered spec", self.path)
        return dataset[()]

    def keras3(self, group, prefix="") -> Params:
        layers = {}
        for key in sorted(group, key=_natural):
            sub = group[key]
            name = prefix + _text(sub["vars"].attrs.get("name", key)) if "vars" in sub else prefix + key
            if "vars" in sub and len(sub["vars"]):
                layers[name] = {str(i): self.array(sub["vars"][str(i)]) for i in range(len(sub["vars"]))}
            if "layers" in sub:  # a nested model
                layers.update(self.keras3(sub["layers"], name + "/"))
        return layers

    def legacy(self, root) -> Params:
        layers = {}
        for name in (_text(n) for n in root.attrs["layer_names"]):
            weight_names = [_text(n) for n in root[name].attrs.get("weight_names", [])]
            if weight_names:  # in the layer's variable order, as Keras' own loader takes them
                layers[name] = {str(i): self.array(root[name][wn]) for i, wn in enumerate(weight_names)}
        return layers


def read_h5_params(path, max_bytes: int) -> Params:
    import h5py

    reader = _Reader(path, max_bytes)
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

        candidates = [spec] if spec else all_specs().values()
        largest = max(t.size * np.dtype(np.float64).itemsize for s in candidates for t in s.tensors.values())
        layers = read_h5_params(path, largest)
        if not layers:
            raise ZooError("holds no layer with weights", path)
        fit = fit_params(layers, "keras", spec, path, mapping=options.get("map"))
        return Imported(fit.spec, fit.tensors, notes=mapping_notes(fit), source_format="keras-h5")


@hookimpl
def zoo_weight_sources():
    return [KerasH5()]
