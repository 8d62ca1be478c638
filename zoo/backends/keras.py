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
from zoo.graph import INPUT
from zoo.layers import KINDS
from zoo.registry import load_weights, resolve_spec
from zoo.spec import ModelSpec
from zoo.store import resolve as resolve_stored
from zoo.weights import Weights


class _FromArray(keras.initializers.Initializer):
    """A variable's initial value taken from loaded weights, so that it is created holding them: no random
    initialisation, and no later assign (Keras' set_weights held 3 copies of fc6 at once, measured)."""

    def __init__(self, name: str, array: np.ndarray, release=None):
        self.name, self.array, self.release = name, array, release

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.array.shape:
            raise ZooError(f"{self.name}: shape {self.array.shape} does not fit the layer's {tuple(shape)}")
        value = tf.convert_to_tensor(self.array, dtype=dtype)
        if self.release:  # a mapped array's pages are copied now: let them go before the variable copies them
            self.release(self.array)
        return value


def call_layers(nodes, layers: dict, tensors: dict) -> dict:
    """Call each node's Keras layer on its inputs' tensors, in order; `tensors` holds the inputs given."""
    for node in nodes:
        x = [tensors[i] for i in node.inputs]
        tensors[node.name] = layers[node.name](x if KINDS[node.kind].inputs == 0 else x[0])
    return tensors


def _layer(node, weights: dict, release):
    """The node's Keras layer, its variables created holding `weights` where all of them are given."""
    layer = KINDS[node.kind].keras(node)
    given = node.params if node.tensors and all(t.name in weights for t in node.tensors) else {}
    for param, t in given.items():  # the layers read `<param>_initializer` when they build
        setattr(layer, f"_zoo_{param}", getattr(layer, f"{param}_initializer"))
        setattr(layer, f"{param}_initializer", _FromArray(t.name, weights[t.name], release))
    return layer, list(given)


def build_model(spec: ModelSpec, weights: dict[str, np.ndarray] | None = None, release=None, part: Part | None = None) -> keras.Model:
    """A keras.Model computing `spec` (or the `part` of it that zoo.features.select chose) on inputs
    preprocessed as the spec says, its weighted layers created holding `weights` (canonical names) where
    given, randomly initialised otherwise. `release(array)` follows each use of a weight (mapped weights let
    their pages go). One output is the model's output; several are a list, in the order given (timm's
    features_only). `model.zoo_part` is the part: its `input` says how to preprocess images for the model."""
    part = part or select(spec)
    weights = weights or {}
    layers, loaded = {}, []
    for node in part.nodes:
        layers[node.name], params = _layer(node, weights, release)
        if params:
            loaded.append((layers[node.name], params))
    inputs = keras.Input(shape=part.input_shape, name="image")
    tensors = call_layers(part.nodes, layers, {INPUT: inputs})
    for layer, params in loaded:  # the arrays were for building only: the config says what a fresh layer would use
        for param in params:
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
                 pooling: str | None = None, outputs=None, input_size=None) -> keras.Model:
    """Build `name` and load `weights` (a verified safetensors path or a `Weights`).

    With `num_classes` different from the weights', the head is dropped and re-initialised (timm-style).
    As Keras Applications: `include_top=False` ends at the trunk's output map (zoo.graph.trunk), `pooling`
    "avg" or "max" pools it to one value per channel, `input_size=(h, w)` where every layer kept allows it;
    as timm's features_only: `outputs=[layer, ...]` gives those layers' outputs (zoo.features.select).
    """
    weights = resolve_stored(weights, name)  # "stored", a stored name (zoo weights) -> its file; "random" -> None
    if weights is not None and not isinstance(weights, Weights):
        weights = load_weights(weights)
    base = resolve_spec(name, weights)
    spec = base.with_num_classes(num_classes) if num_classes else base
    part = select(spec, include_top, pooling, outputs, input_size)
    if weights is None:
        return build_model(spec, part=part)
    head = {t.name for t in spec.node(spec.head).tensors} if spec.num_classes != base.num_classes else set()
    return build_model(spec, {k: v for k, v in weights.tensors.items() if k not in head}, weights.release, part)
