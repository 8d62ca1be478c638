"""lrn: local response normalization across channels, with Caffe's parameters.

y = x / (k + alpha / size * sum of x^2 over `size` neighbouring channels) ** beta. Caffe, PyTorch's
LocalResponseNorm and ONNX's LRN take this alpha; TensorFlow's does not divide by size, so the Keras
form passes alpha / size. Config: size (odd), alpha, beta, k (1).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from zoo.layers.base import REQUIRED, Kind, spatial


class LRN(Kind):
    name = "lrn"
    schema = {"size": REQUIRED, "alpha": REQUIRED, "beta": REQUIRED, "k": 1.0}

    def check(self, cfg, shapes):
        spatial(shapes)
        if cfg["size"] % 2 == 0:
            raise ValueError("size must be odd")

    def keras_classes(self):
        return [_keras_class()]

    def keras(self, node):
        c = node.config
        return _keras_class()(c["size"], c["alpha"], c["beta"], c["k"], name=node.name)

    def onnx(self, node, g, x):
        """Not ONNX's LRN, which ONNX Runtime computes on one thread with a scalar pow per value (AlexNet's two
        LRNs were 37% of its batch-1 time, GoogLeNet's 49%; docs/performance.md, issue 18), but the same sums
        in operators it runs fast: the squares' window over channels as a 1x1 Conv with a band of alpha/size
        (bias k; C MACs per value instead of `size`, on ONNX Runtime's vectorised, threaded conv path), then
        the power by square roots where beta is a multiple of 1/4 up to 1, else exp(-beta log s)."""
        cfg, channels = node.config, node.output_shape[-1]
        half = cfg["size"] // 2
        index = np.arange(channels)
        band = (np.abs(index[:, None] - index[None, :]) <= half) * np.float32(cfg["alpha"] / cfg["size"])
        squares = g.node("Mul", [x[0], x[0]])
        s = g.node("Conv", [squares, g.constant(f"{node.name}.window", band.astype(np.float32)[:, :, None, None]),
                            g.constant(f"{node.name}.k", np.full(channels, cfg["k"], np.float32))], kernel_shape=[1, 1])
        power = _power(g, s, cfg["beta"])
        if power is None:
            return g.node("Mul", [x[0], g.node("Exp", [g.node("Mul", [g.node("Log", [s]), g.constant(
                f"{node.name}.minus_beta", np.array(-cfg["beta"], np.float32))])])], name=node.name)
        return g.node("Div", [x[0], power], name=node.name)


@cache
def _keras_class():
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable("zoo")
    class CaffeLRN(keras.layers.Layer):
        """Local response normalization across channels with Caffe's parameters (alpha divided by size)."""

        def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0, **kwargs):
            super().__init__(**kwargs)
            self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

        def call(self, x):
            return tf.nn.local_response_normalization(x, depth_radius=self.size // 2, bias=self.k,
                                                      alpha=self.alpha / self.size, beta=self.beta)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return super().get_config() | {"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}

    return CaffeLRN


def _power(g, s: str, beta: float) -> str | None:
    """s ** beta from square roots and products, for beta in 1/4, 1/2, 3/4, 1; None for any other beta."""
    quarters = beta * 4
    if quarters not in (1, 2, 3, 4):
        return None
    if quarters == 4:
        return s
    root = g.node("Sqrt", [s])
    if quarters == 2:
        return root
    fourth = g.node("Sqrt", [root])
    return fourth if quarters == 1 else g.node("Mul", [root, fourth])


KIND = LRN()
