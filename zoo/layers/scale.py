"""scale: Caffe's Scale layer, a per-channel multiply with an optional per-channel bias.

y = x * gamma + beta. Config: bias (true). Parameters: gamma (C,), beta (C,). Caffe puts one after
each bias-free BatchNorm; caffe-tensorflow files carry them as the BatchNorm entry's scale/offset.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from zoo.layers.base import Kind, spatial


class Scale(Kind):
    name = "scale"
    schema = {"bias": True}
    foreign = {"torch": {"weight": "gamma", "bias": "beta"}, "caffe-tensorflow": {"scale": "gamma", "offset": "beta"}}

    def check(self, cfg, shapes):
        spatial(shapes)

    def params(self, cfg, shapes):
        c = (shapes[0][-1],)
        return {"gamma": (c, "C")} | ({"beta": (c, "C")} if cfg["bias"] else {})

    def affine(self, cfg, params):
        return params["gamma"].astype(np.float64), params.get("beta", 0.0)

    def keras_classes(self):
        return [_keras_class()]

    def keras(self, node):
        return _keras_class()(node.config["bias"], name=node.name)

    def onnx(self, node, g, x):
        out = g.node("Mul", [x[0], g.weight(node, "gamma", lambda a: a.reshape(-1, 1, 1))], name=node.name)
        if node.config["bias"]:
            out = g.node("Add", [out, g.weight(node, "beta", lambda a: a.reshape(-1, 1, 1))])
        return out


@cache
def _keras_class():
    import keras

    @keras.saving.register_keras_serializable("zoo")
    class ChannelScale(keras.layers.Layer):
        """x * gamma + beta over the last axis (Caffe's Scale)."""

        def __init__(self, use_bias=True, gamma_initializer="ones", beta_initializer="zeros", **kwargs):
            super().__init__(**kwargs)
            self.use_bias = use_bias
            self.gamma_initializer = keras.initializers.get(gamma_initializer)
            self.beta_initializer = keras.initializers.get(beta_initializer)

        def build(self, input_shape):
            self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer=self.gamma_initializer)
            if self.use_bias:
                self.beta = self.add_weight(name="beta", shape=(input_shape[-1],), initializer=self.beta_initializer)

        def call(self, x):
            return x * self.gamma + self.beta if self.use_bias else x * self.gamma

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return super().get_config() | {"use_bias": self.use_bias,
                                           "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
                                           "beta_initializer": keras.initializers.serialize(self.beta_initializer)}

    return ChannelScale


KIND = Scale()
