"""Build a keras.Model from a spec and load verified weights into it. Imports TensorFlow.

Layer names are the spec's (conv1 ... fc8), so layers can be frozen and inspected by name.
Grouped convolutions run in split form (one conv per group, then concatenate) inside one layer that
owns a single HWIO kernel: on this CPU it trains about 2x faster than Keras' XLA-wrapped
Conv2D(groups=2), and tf2onnx turns it into valid ONNX (design.md measured both).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from zoo.errors import ZooError
from zoo.spec import ModelSpec
from zoo.weights import Weights, load_weights, resolve_spec


@keras.saving.register_keras_serializable("zoo")
class SpecConv2D(layers.Layer):
    """Conv with Caffe/PyTorch-style symmetric padding and groups; kernel (kh, kw, in/groups, out)."""

    def __init__(self, filters, kernel_size, stride=1, pad=0, groups=1, activation=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.stride, self.pad, self.groups = filters, kernel_size, stride, pad, groups
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.activation = keras.activations.get(activation)
        self._activation_name = activation
        # symmetric padding that "same" reproduces exactly: odd kernel, stride 1
        self._same = stride == 1 and kernel_size % 2 == 1 and pad == kernel_size // 2

    def build(self, input_shape):
        in_channels = input_shape[-1]
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, in_channels // self.groups, self.filters),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)

    def call(self, x):
        padding = "same" if self._same else "valid"
        if self.pad and not self._same:
            p = self.pad
            x = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        if self.groups == 1:
            y = ops.conv(x, self.kernel, strides=self.stride, padding=padding)
        else:
            xs = ops.split(x, self.groups, axis=-1)
            ks = ops.split(self.kernel, self.groups, axis=-1)
            y = ops.concatenate([ops.conv(xi, ki, strides=self.stride, padding=padding) for xi, ki in zip(xs, ks)], axis=-1)
        return self.activation(ops.add(y, self.bias))

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        k, s, p = self.kernel_size, self.stride, self.pad
        return (n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, self.filters)

    def get_config(self):
        return super().get_config() | {"filters": self.filters, "kernel_size": self.kernel_size, "stride": self.stride,
                                       "pad": self.pad, "groups": self.groups, "activation": self._activation_name,
                                       "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                                       "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


@keras.saving.register_keras_serializable("zoo")
class CaffeLRN(layers.Layer):
    """Local response normalization across channels with Caffe's parameters (alpha is divided by size)."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def call(self, x):
        # Caffe: x / (k + alpha/size * sum of squares over `size` channels) ** beta; TF does not divide alpha
        return tf.nn.local_response_normalization(x, depth_radius=self.size // 2, bias=self.k,
                                                  alpha=self.alpha / self.size, beta=self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return super().get_config() | {"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


def _keras_layer(info, init: dict):
    c, name = info.config, info.name
    if info.kind == "conv":
        return SpecConv2D(c["filters"], c["kernel"], c.get("stride", 1), c.get("pad", 0), c.get("groups", 1),
                          c.get("activation"), name=name, **init)
    if info.kind == "lrn":
        return CaffeLRN(c["size"], c["alpha"], c["beta"], c.get("k", 1.0), name=name)
    if info.kind in ("maxpool", "avgpool"):
        pool = layers.MaxPooling2D if info.kind == "maxpool" else layers.AveragePooling2D
        return pool(c["size"], c.get("stride", c["size"]), padding="valid", name=name)
    if info.kind == "adaptive_avgpool":
        return None  # resolved by the caller, which knows the input size
    if info.kind == "flatten":
        return layers.Flatten(name=name)
    if info.kind == "dense":
        return layers.Dense(c["units"], activation=c.get("activation"), name=name, **init)
    if info.kind == "dropout":
        return layers.Dropout(c["rate"], name=name)
    raise ZooError(f"layer kind {info.kind!r} has no Keras builder")


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


_DEFAULT_INIT = {"kernel_initializer": "glorot_uniform", "bias_initializer": "zeros"}


def build_model(spec: ModelSpec, weights: dict[str, np.ndarray] | None = None, release=None) -> keras.Model:
    """A keras.Model computing `spec` on inputs preprocessed as the spec says, its weighted layers created
    holding `weights` (canonical names) where given, randomly initialised otherwise. `release(array)`
    follows each use of a weight (mapped weights let their pages go)."""
    weights = weights or {}
    inputs = keras.Input(shape=spec.input_shape, name="image")
    x = inputs
    previous = spec.input_shape
    loaded = []
    for info in spec.layer_infos:
        names = [t.name for t in info.tensors]
        init = {}
        if names and all(n in weights for n in names):
            init = {k: _FromArray(n, weights[n], release) for k, n in zip(_DEFAULT_INIT, names)}
        layer = _keras_layer(info, init)
        if layer is None:  # adaptive average pooling: the spec checked that the input tiles exactly
            factor = previous[0] // info.config["output"]
            layer = layers.AveragePooling2D(factor, name=info.name) if factor > 1 else layers.Identity(name=info.name)
        x = layer(x)
        previous = info.output_shape
        if init:
            loaded.append(layer)
    for layer in loaded:  # the arrays were for building only: the config says what a fresh layer would use
        layer.kernel_initializer, layer.bias_initializer = (keras.initializers.get(v) for v in _DEFAULT_INIT.values())
    return keras.Model(inputs, x, name=spec.id.replace("@", "_"))


def model_tensors(model: keras.Model, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The model's weights under the spec's canonical names (the inverse of build_model's `weights`)."""
    out = {}
    for info in spec.weighted_layers:
        for t, value in zip(info.tensors, model.get_layer(info.name).get_weights()):
            out[t.name] = value
    return out


def create_model(name="alexnet", weights=None, num_classes: int | None = None) -> keras.Model:
    """Build `name` and load `weights` (a verified safetensors path or a `Weights`).

    With `num_classes` different from the weights', the head is dropped and re-initialised (timm-style).
    """
    if weights is not None and not isinstance(weights, Weights):
        weights = load_weights(weights)
    base = resolve_spec(name, weights)
    spec = base.with_num_classes(num_classes) if num_classes else base
    if weights is None:
        return build_model(spec)
    head = {t.name for t in spec.layer(spec.head).tensors} if spec.num_classes != base.num_classes else set()
    return build_model(spec, {k: v for k, v in weights.tensors.items() if k not in head}, weights.release)
