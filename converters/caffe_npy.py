"""Built-in plugin `caffe`: caffe-tensorflow's .npy (bvlc_alexnet.npy and friends).

The file is `np.save` of a dict, so an npy header with dtype object and one pickle stream. Two forms
exist: the seed's `{'conv1': [W, b], ...}` pickled under Python 2, and newer caffe-tensorflow's
`{'conv1': {'weights': W, 'biases': b}}`. caffe-tensorflow already wrote TensorFlow's layout (HWIO
convs, (in, out) dense with fc6 rows in H,W,C order), which is zoo's canonical layout: no transform.
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from zoo import safe_pickle
from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.sources import Imported, Params, WeightSource, fit_params, map_file, mapping_notes

_NPY_MAGIC = b"\x93NUMPY"


def _text(key) -> str:
    return key.decode("latin1") if isinstance(key, bytes) else str(key)


def read_npy_object(path: Path):
    """The object pickled inside an object-dtype .npy file, read through the restricted unpickler."""
    data = map_file(path)  # arrays become views of the mapped file: no copy of the weights
    f = io.BytesIO(data[:65536])  # numpy's header parser wants a file; headers are far shorter
    try:
        version = npy_format.read_magic(f)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except (ValueError, SyntaxError, EOFError, TypeError, tokenize.TokenError) as e:  # numpy parses the header
        raise ZooError(f"not a valid .npy file ({e})", path) from None
    if dtype != object:
        raise ZooError(f"holds a plain {dtype} array of shape {shape}, not caffe-tensorflow's dict of layers", path)
    arr = safe_pickle.load(memoryview(data)[f.tell():], path=path)
    if not isinstance(arr, np.ndarray) or arr.shape != ():
        raise ZooError("expected one pickled dict of layers", path)
    return arr.item()


def npy_params(obj, path) -> Params:
    """{layer: [W, b]} or {layer: {'weights': W, 'biases': b, ...}} -> {layer: {param: array}}."""
    if not isinstance(obj, dict) or not obj:
        raise ZooError(f"expected a dict of layers, found {type(obj).__name__}", path)
    layers = {}
    for key, value in obj.items():
        layer = _text(key)
        if isinstance(value, dict):
            params = {_text(k): v for k, v in value.items()}
        elif isinstance(value, (list, tuple)) and 1 <= len(value) <= 2:
            params = dict(zip(("weights", "biases"), value))
        else:
            raise ZooError(f"layer {layer!r}: expected [weights, biases] or a dict of parameters, found {type(value).__name__}", path)
        for name, arr in params.items():
            if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
                raise ZooError(f"layer {layer!r}: {name} is not a float array", path)
        layers[layer] = params
    return layers


class CaffeNpy(WeightSource):
    name = "caffe"
    format = "caffe-tensorflow .npy (dict of layers, TensorFlow layout)"
    extensions = (".npy",)

    def sniff(self, path, head):
        return head.startswith(_NPY_MAGIC) and b"'descr': '|O'" in head[:512]

    def read(self, path, spec, options):
        fit = fit_params(npy_params(read_npy_object(path), path), "caffe-tensorflow", spec, path, mapping=options.get("map"))
        return Imported(fit.spec, fit.tensors, notes=mapping_notes(fit), source_format="caffe-tensorflow-npy")


@hookimpl
def zoo_weight_sources():
    return [CaffeNpy()]
