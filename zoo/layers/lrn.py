"""lrn: local response normalization across channels, with Caffe's parameters.

y = x / (k + alpha / size * sum of x^2 over `size` neighbouring channels) ** beta. Caffe, PyTorch's
LocalResponseNorm and ONNX's LRN take this alpha; TensorFlow's does not divide by size, so the Keras
form passes alpha / size. Config: size (odd), alpha, beta, k (1).
"""

from __future__ import annotations

from functools import cache

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
        c = node.config
        return g.node("LRN", [x[0]], name=node.name, size=c["size"], alpha=c["alpha"], beta=c["beta"], bias=c["k"])


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


KIND = LRN()
