"""Build a keras.Model from a spec and load verified weights into it. Imports TensorFlow.

One Keras layer per spec layer, named as the spec names it, so layers can be frozen, inspected and
replayed (feature caching) by name.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.fold import fold
from zoo.graph import INPUT
from zoo.layers import KINDS
from zoo.registry import load_weights, resolve_spec
from zoo.spec import ModelSpec
from zoo.store import resolve as resolve_stored
from zoo.weights import Weights

_SLAB_BYTES = 1 << 24  # rows written per assign: the only copy of a weight besides its variable


def _fill(variable, array: np.ndarray, name: str, release=None) -> None:
    """Write a loaded weight into its freshly created (zeros) variable a 16 MiB slab of rows at a time,
    releasing the source's pages behind it. Assigned whole, a weight held its converted tensor beside the
    variable: +392 MiB for VGG16's fc6 (measured). ResourceStridedSliceAssign leaves the variable in
    TensorFlow's copy-on-read mode, where every read copies it (a 64 MB variable's `v + 0`: 0.6 ms before,
    144 ms after; zoo's ResNet-50 forward was 0.82-0.89x Keras Applications'), so the mode is turned off
    once the weight is in. Distributed variables take the whole array through their own assign (every replica)."""
    if tuple(variable.shape) != array.shape:
        raise ZooError(f"{name}: shape {array.shape} does not fit the layer's {tuple(variable.shape)}")
    target = variable.value
    if array.ndim == 0 or isinstance(target, tf.distribute.DistributedValues):
        variable.assign(array)
    else:
        step = max(1, _SLAB_BYTES // max(1, array[:1].nbytes))
        for i in range(0, array.shape[0], step):
            end = min(i + step, array.shape[0])
            tf.raw_ops.ResourceStridedSliceAssign(  # on the handle: a var[i:j].assign would read (and copy) the variable
                ref=target.handle, begin=[i] + [0] * (array.ndim - 1), end=[end, *array.shape[1:]], strides=[1] * array.ndim,
                value=tf.constant(array[i:end], dtype=target.dtype))
            if release:
                release(array[i:end])
        tf.raw_ops.DisableCopyOnRead(resource=target.handle)
    if release:
        release(array)


def call_layers(nodes, layers: dict, tensors: dict) -> dict:
    """Call each node's Keras layer on its inputs' tensors, in order; `tensors` holds the inputs given."""
    for node in nodes:
        x = [tensors[i] for i in node.inputs]
        tensors[node.name] = layers[node.name](x if KINDS[node.kind].inputs == 0 else x[0])
    return tensors


def _layer(node, weights: dict):
    """The node's Keras layer; where all its weights are given, its variables are created as zeros (no random
    initialisation, which is as costly as the copy) for _fill to write them in."""
    layer = KINDS[node.kind].keras(node)
    given = node.params if node.tensors and all(t.name in weights for t in node.tensors) else {}
    for param in given:  # the layers read `<param>_initializer` when they build
        setattr(layer, f"_zoo_{param}", getattr(layer, f"{param}_initializer"))
        setattr(layer, f"{param}_initializer", keras.initializers.Zeros())
    return layer, given


def build_model(spec: ModelSpec, weights: dict[str, np.ndarray] | None = None, release=None, part: Part | None = None,
                folded: bool = False) -> keras.Model:
    """A keras.Model computing `spec` (or the `part` of it that zoo.features.select chose) on inputs
    preprocessed as the spec says, its weighted layers filled with `weights` (canonical names, _fill) where
    given, randomly initialised otherwise. `release(array)` follows each use of a weight (mapped weights let
    their pages go). One output is the model's output; several are a list, in the order given (timm's
    features_only). `model.zoo_part` is the part: its `input` says how to preprocess images for the model.
    `folded`: for running the model only, batch norms and Scale layers folded into the convs before them
    (zoo.fold), which TensorFlow then runs as one op with the bias and ReLU."""
    part = part or select(spec)
    weights = weights or {}
    if folded:
        part, weights = fold(part, weights, release)
    layers, loaded = {}, []
    for node in part.nodes:
        layers[node.name], params = _layer(node, weights)
        if params:
            loaded.append((layers[node.name], params))
    inputs = keras.Input(shape=part.input_shape, name="image")
    tensors = call_layers(part.nodes, layers, {INPUT: inputs})
    for layer, params in loaded:
        variables = {v.name: v for v in layer.variables}
        for param, t in params.items():
            _fill(variables[param], weights[t.name], t.name, release)
            # the config says what a fresh layer would use
            setattr(layer, f"{param}_initializer", getattr(layer, f"_zoo_{param}"))
    outputs = [_pooled(tensors[name], name, part.pooling) for name in part.outputs]
    model = keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=spec.id.replace("@", "_"))
    model.zoo_part = part
    return model


def _pooled(tensor, name: str, pooling: str | None):
    """Keras Applications' `pooling` on an output map: one value per channel."""
    if pooling is None:
        return tensor
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    return pool(name=f"{name}_{pooling}_pool")(tensor)


def model_tensors(model: keras.Model, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The model's weights under the spec's canonical names (the inverse of build_model's `weights`)."""
    out = {}
    for node in spec.weighted_nodes:
        variables = {v.name: v for v in model.get_layer(node.name).variables}
        for t in node.tensors:
            out[t.name] = variables[t.param].numpy()
    return out


def create_model(name="alexnet", weights=None, num_classes: int | None = None, include_top: bool = True,
                 pooling: str | None = None, outputs=None, input_size=None, folded: bool = False) -> keras.Model:
    """Build `name` and load `weights` (a verified safetensors path or a `Weights`).

    With `num_classes` different from the weights', the head is dropped and re-initialised (timm-style).
    As Keras Applications: `include_top=False` ends at the trunk's output map (zoo.graph.trunk), `pooling`
    "avg" or "max" pools it to one value per channel, `input_size=(h, w)` where every layer kept allows it;
    as timm's features_only: `outputs=[layer, ...]` gives those layers' outputs (zoo.features.select).
    `folded=True`: for running the model only (build_model).
    """
    weights = resolve_stored(weights, name)  # "stored", a stored name (zoo weights) -> its file; "random" -> None
    if weights is not None and not isinstance(weights, Weights):
        weights = load_weights(weights, mapped=True)  # views of the file: build_model releases each once in its variable
    base = resolve_spec(name, weights)
    spec = base.with_num_classes(num_classes) if num_classes else base
    part = select(spec, include_top, pooling, outputs, input_size)
    if weights is None:
        return build_model(spec, part=part, folded=folded)
    head = {t.name for t in spec.node(spec.head).tensors} if spec.num_classes != base.num_classes else set()
    return build_model(spec, {k: v for k, v in weights.tensors.items() if k not in head}, weights.release, part, folded)
