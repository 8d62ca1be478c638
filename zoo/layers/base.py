"""What every layer kind is: its config schema, shapes, parameters, foreign layouts, Keras and ONNX forms.

A kind is one class in one file of this package (docs/formats.md lists them). The graph (zoo.graph)
applies the schema and asks the kind for output shapes and parameter tensors; readers hand the kind
a layer's parameters as a foreign framework names them; the Keras and ONNX drivers (zoo.backends) ask
it for its layer or nodes. Adding a kind is adding a file here and its tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REQUIRED = object()  # a schema default meaning "the spec must give it"

# Parameter conventions of the frameworks whose files zoo reads (docs/formats.md):
#   torch             state-dict names (weight, bias, running_mean, ...); conv (out, in/g, kh, kw), dense (out, in)
#   caffe             blobs by position ("0", "1", ...); the same layouts as torch
#   keras             variables by position ("0", "1", ...), as Keras itself loads h5 files; canonical layout
#   caffe-tensorflow  names (weights, biases, mean, variance, scale, offset); canonical layout
ROW_MAJOR = {"torch", "caffe"}  # conventions that store kernels as (out, in...) rows
CONVENTIONS = ("torch", "caffe", "keras", "caffe-tensorflow")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "conv1.kernel"
    layer: str
    param: str  # "kernel"
    shape: tuple[int, ...]
    layout: str
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Node:
    """A layer of a spec with what the graph derived for it. Shapes are per example: (H, W, C) or (N,)."""

    name: str
    kind: str
    config: dict  # the schema's defaults filled in
    inputs: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]
    flattened_from: tuple[int, int, int] | None = None  # the (H, W, C) map a flat input was flattened from

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def params(self) -> dict[str, TensorSpec]:
        return {t.param: t for t in self.tensors}


class Kind:
    """Base class of layer kinds. Subclasses set the class attributes and override what differs."""

    name = ""
    schema: dict = {}  # config key -> default (REQUIRED: must be given)
    computes: tuple[str, ...] | None = None  # keys that change the result, hence the fingerprint (None: all)
    inputs = 1  # how many inputs; 0 = two or more (add, concat)
    spatial = True  # needs an (H, W, C) input
    passthrough = False  # keeps a flat tensor's value order (dropout): a dense after it still sees the flatten
    foreign: dict[str, dict[str, str]] = {}  # convention -> {foreign param name: canonical param name}
    ignored: dict[str, tuple[str, ...]] = {}  # convention -> foreign params read and dropped (with a note)

    # --- the graph ---------------------------------------------------------------------------------

    def check(self, cfg: dict, shapes: list[tuple[int, ...]]) -> None:
        """Raise ValueError for a config or inputs this kind cannot compute."""

    def output_shape(self, cfg: dict, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return shapes[0]

    def params(self, cfg: dict, shapes: list[tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], str]]:
        """{param: (canonical shape, layout name)}, in Keras' variable order."""
        return {}

    def macs(self, node: Node) -> int:
        """Multiply-accumulates per image: the arithmetic that bounds a forward pass (zoo bench's limit).
        Kinds without weights do a few operations per value, negligible next to convs and dense layers."""
        return 0

    # --- foreign files ----------------------------------------------------------------------------

    def names_in(self, convention: str, node: Node) -> dict[str, str]:
        """{foreign name: canonical param} for `node`'s parameters in `convention`."""
        if convention in ("caffe", "keras"):  # positional: Keras' creation order is the canonical order
            return {str(i): p for i, p in enumerate(node.params)}
        table = self.foreign.get(convention, {})
        return {f: p for f, p in table.items() if p in node.params}

    def foreign_shape(self, convention: str, node: Node, param: str) -> tuple[int, ...]:
        """The shape `param` has in `convention`'s files (row-major conventions store kernels transposed)."""
        shape = node.params[param].shape
        if convention in ROW_MAJOR and len(shape) >= 2:
            return (shape[-1], shape[-2], *shape[:-2])
        return shape

    def rows_chw(self, node: Node, param: str) -> tuple[int, int, int]:
        """For a row-major kernel: the (C, H, W) order of one row's values (see zoo.layouts)."""
        kh, kw, cin, _ = node.params[param].shape
        return (cin, kh, kw)

    def import_params(self, convention: str, node: Node, arrays: dict[str, np.ndarray], release=None) -> dict:
        """Foreign arrays (already shape-checked against foreign_shape) -> {param: canonical array or Deferred}."""
        from zoo.layouts import rows_to_canonical

        names = self.names_in(convention, node)
        out = {}
        for foreign, arr in arrays.items():
            param = names[foreign]
            if convention in ROW_MAJOR and arr.ndim >= 2:
                out[param] = rows_to_canonical(arr, node.params[param].shape, self.rows_chw(node, param), release)
            else:
                out[param] = arr
        return out

    # --- folding for inference (zoo.fold) ------------------------------------------------------------

    def affine(self, cfg: dict, params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """(a, b), float64 per channel, when the layer computes y = a * x + b and nothing else (batch norm
        at inference, Scale); None otherwise."""
        return None

    def absorb(self, layer: dict, params: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray):
        """(layer dict, params) of this layer followed by y = a * x + b per output channel, as one layer of
        this kind; None when it cannot take it (an activation in between)."""
        return None

    # --- backends ---------------------------------------------------------------------------------

    def keras(self, node: Node):
        """The one Keras layer computing `node`, named `node.name`, taking NHWC input(s)."""
        raise NotImplementedError(f"kind {self.name!r} has no Keras form")

    def keras_classes(self) -> list[type]:
        """zoo's own Keras layer classes among those `keras` builds (Keras' own need nothing): what a saved
        .keras model needs registered to load."""
        return []

    def onnx(self, node: Node, g, x: list[str]) -> str:
        """Add `node`'s ONNX nodes to `g` (zoo.backends.onnx.GraphBuilder) on NCHW inputs `x`; return its output."""
        raise NotImplementedError(f"kind {self.name!r} has no ONNX form")


def pair(value) -> tuple[int, int]:
    """3 -> (3, 3); [3, 5] -> (3, 5)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise ValueError(f"expected an int or two ints, not {value!r}")


def spatial(shapes) -> tuple[int, int, int]:
    if len(shapes[0]) != 3:
        raise ValueError(f"needs an (H, W, C) input, got {shapes[0]}")
    return shapes[0]

