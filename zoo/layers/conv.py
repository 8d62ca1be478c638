"""conv: 2-D convolution, optionally grouped, with or without bias, any padding, fused ReLU.

Config: filters, kernel (int or [kh, kw]), stride (1), pad (0; see zoo.layers.window), groups (1),
bias (true), activation (null or "relu"). Parameters: kernel (kh, kw, in/groups, filters) HWIO and
bias (filters,). Group g reads input channels [g*in/G, (g+1)*in/G) and writes outputs
[g*out/G, (g+1)*out/G) in every framework here, so no regrouping is needed between layouts.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from zoo.layers.base import REQUIRED, Kind, Node, pair, spatial
from zoo.layers.window import geometry


class Conv(Kind):
    name = "conv"
    schema = {"filters": REQUIRED, "kernel": REQUIRED, "stride": 1, "pad": 0, "groups": 1, "bias": True, "activation": None}
    foreign = {"torch": {"weight": "kernel", "bias": "bias"}, "caffe-tensorflow": {"weights": "kernel", "biases": "bias"}}

    def check(self, cfg, shapes):
        _, _, c = spatial(shapes)
        g, f = cfg["groups"], cfg["filters"]
        if g < 1 or c % g or f % g:
            raise ValueError(f"groups={g} must divide input channels {c} and filters {f}")
        if cfg["activation"] not in (None, "relu"):
            raise ValueError(f"activation must be null or relu, not {cfg['activation']!r}")

    def output_shape(self, cfg, shapes):
        h, w, _ = shapes[0]
        *_, out, _ = geometry(cfg, "kernel", (h, w))
        return (*out, cfg["filters"])

    def params(self, cfg, shapes):
        c = shapes[0][2]
        kh, kw = pair(cfg["kernel"])  # checked by output_shape
        out = {"kernel": ((kh, kw, c // cfg["groups"], cfg["filters"]), "HWIO")}
        return out | ({"bias": ((cfg["filters"],), "O")} if cfg["bias"] else {})

    def macs(self, node: Node) -> int:
        h, w, _ = node.output_shape
        return h * w * math.prod(node.params["kernel"].shape)  # each output position: one kernel's worth per filter

    def absorb(self, layer, params, a, b):  # kernel * a over its output channels, bias * a + b; not through a fused ReLU
        if layer.get("activation"):
            return None
        bias = params.get("bias", 0.0)
        return dict(layer, bias=True), {"kernel": (params["kernel"] * a).astype(np.float32), "bias": (bias * a + b).astype(np.float32)}

    def keras_classes(self):
        return [_keras_class()]

    def keras(self, node: Node):
        cfg = node.config
        (kh, kw), stride, pads, _, _ = geometry(cfg, "kernel", node.input_shapes[0][:2])
        return _keras_class()(cfg["filters"], (kh, kw), stride, pads, cfg["groups"], cfg["bias"], cfg["activation"], name=node.name)

    def onnx(self, node: Node, g, x):
        cfg = node.config
        window, stride, pads, _, _ = geometry(cfg, "kernel", node.input_shapes[0][:2])
        inputs = [x[0], g.weight(node, "kernel", lambda k: k.transpose(3, 2, 0, 1))]  # HWIO -> OIHW
        if cfg["bias"]:
            inputs.append(g.weight(node, "bias"))
        out = g.node("Conv", inputs, name=node.name, kernel_shape=list(window), strides=list(stride), pads=list(pads),
                     group=cfg["groups"])
        return g.node("Relu", [out]) if cfg["activation"] == "relu" else out


@cache
def _keras_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable("zoo")
    class SpecConv2D(keras.layers.Layer):
        """Conv with explicit (top, left, bottom, right) padding and groups; kernel (kh, kw, in/groups, out).
        Groups run in split form (a conv per group, concatenated): on CPU about 2x faster to train than
        Keras' XLA-wrapped Conv2D(groups=...), and exportable (docs/performance.md)."""

        def __init__(self, filters, kernel_size, strides, pads, groups=1, use_bias=True, activation=None,
                     kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
            super().__init__(**kwargs)
            self.filters, self.kernel_size, self.strides = filters, tuple(kernel_size), tuple(strides)
            self.pads, self.groups, self.use_bias, self._activation = tuple(pads), groups, use_bias, activation
            self.kernel_initializer = keras.initializers.get(kernel_initializer)
            self.bias_initializer = keras.initializers.get(bias_initializer)
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            kh, kw = self.kernel_size
            self.kernel = self.add_weight(name="kernel", shape=(kh, kw, input_shape[-1] // self.groups, self.filters),
                                          initializer=self.kernel_initializer)
            if self.use_bias:
                self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)
            h, w = input_shape[1:3]
            # TensorFlow's own "same" padding where it equals ours: no separate pad op
            same = h is not None and w is not None and self.pads == _same_pads(self.kernel_size, self.strides, (h, w))
            self._padding = "same" if same and any(self.pads) else "valid"
            self._explicit = not same and any(self.pads)

        def call(self, x):
            if self._explicit:
                t, left, b, r = self.pads
                x = ops.pad(x, [[0, 0], [t, b], [left, r], [0, 0]])
            if self.groups == 1:
                y = ops.conv(x, self.kernel, strides=self.strides, padding=self._padding)
            else:
                xs = ops.split(x, self.groups, axis=-1)
                ks = ops.split(self.kernel, self.groups, axis=-1)
                y = ops.concatenate([ops.conv(xi, ki, strides=self.strides, padding=self._padding) for xi, ki in zip(xs, ks)], axis=-1)
            return self.activation(ops.add(y, self.bias) if self.use_bias else y)

        def compute_output_shape(self, input_shape):
            n, h, w, _ = input_shape
            (kh, kw), (sh, sw), (t, left, b, r) = self.kernel_size, self.strides, self.pads
            return (n, (h + t + b - kh) // sh + 1, (w + left + r - kw) // sw + 1, self.filters)

        def get_config(self):
            return super().get_config() | {
                "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides, "pads": self.pads,
                "groups": self.groups, "use_bias": self.use_bias, "activation": self._activation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}

    return SpecConv2D


def _same_pads(window, stride, size):
    from zoo.layers.window import pads

    return pads("same", window, stride, size)


KIND = Conv()
