"""maxpool and avgpool: windowed pooling with padding and floor or ceil rounding.

Config: size (int or [kh, kw]), stride (the size), pad (0; see zoo.layers.window), rounding
("floor", or "ceil": Caffe's pooling, torch's ceil_mode). Max pooling treats padding as -inf (Caffe,
PyTorch, ONNX). Average pooling divides by the window's cells inside the input plus the explicit
padding (Caffe; PyTorch's and ONNX's count_include_pad), never by cells that ceil rounding adds past
the padding; with pad "same" it divides by the cells inside the input (TensorFlow's rule).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from zoo.layers.base import REQUIRED, Kind, spatial
from zoo.layers.window import geometry


class Pool(Kind):
    schema = {"size": REQUIRED, "stride": None, "pad": 0, "rounding": "floor"}
    mode = ""

    def check(self, cfg, shapes):
        spatial(shapes)
        window, _, (t, left, b, r), _, _ = geometry(cfg, "size", shapes[0][:2])
        if max(t, b) >= window[0] or max(left, r) >= window[1]:
            raise ValueError(f"padding {cfg['pad']!r} must be smaller than the window {window}")

    def output_shape(self, cfg, shapes):
        h, w, c = shapes[0]
        *_, out, _ = geometry(cfg, "size", (h, w))
        return (*out, c)

    def keras_classes(self):
        return [_keras_class()]

    def keras(self, node):
        window, stride, pads, _, extra = geometry(node.config, "size", node.input_shapes[0][:2])
        count_pad = node.config["pad"] != "same"
        return _keras_class()(self.mode, window, stride, pads, extra, count_pad, name=node.name)

    def onnx(self, node, g, x):
        """Ceil rounding as explicit end padding (no ceil_mode: ONNX's shape inference before opset 19 misses
        torch's drop rule); average pooling over zero padding, then rescaled by the cells that count."""
        window, stride, (t, left, b, r), out, (eh, ew) = geometry(node.config, "size", node.input_shapes[0][:2])
        attrs = {"kernel_shape": list(window), "strides": list(stride), "pads": [t, left, b + eh, r + ew]}
        if self.mode == "max":
            return g.node("MaxPool", x, name=node.name, **attrs)
        pooled = g.node("AveragePool", x, name=None if any(attrs["pads"]) else node.name, count_include_pad=1, **attrs)
        if not any(attrs["pads"]):
            return pooled
        counted = _counted_cells(node.input_shapes[0][:2], window, stride, (t, left, b, r), out, node.config["pad"] != "same")
        scale = (window[0] * window[1] / counted).astype(np.float32).reshape(1, 1, *out)
        return g.node("Mul", [pooled, g.constant(f"{node.name}.count_scale", scale)], name=node.name)


def _counted_cells(size, window, stride, pads, out, count_pad: bool) -> np.ndarray:
    """How many cells of each output window count in an average: inside the input, plus the explicit
    padding when `count_pad` (never the cells ceil rounding adds)."""
    (h, w), (t, left, b, r) = size, pads
    mask = np.zeros((h + t + b + window[0] + stride[0], w + left + r + window[1] + stride[1]), np.float32)
    if count_pad:
        mask[:h + t + b, :w + left + r] = 1
    else:
        mask[t:t + h, left:left + w] = 1
    return np.array([[mask[i * stride[0]:i * stride[0] + window[0], j * stride[1]:j * stride[1] + window[1]].sum()
                      for j in range(out[1])] for i in range(out[0])])


class MaxPool(Pool):
    name, mode = "maxpool", "max"


class AvgPool(Pool):
    name, mode = "avgpool", "avg"


@cache
def _keras_class():
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable("zoo")
    class SpecPool2D(keras.layers.Layer):
        """Max or average pooling over explicitly padded input: pads (top, left, bottom, right) and the
        ceil rounding's extra (bottom, right). Without either it is plain Keras valid pooling."""

        def __init__(self, mode, pool_size, strides, pads=(0, 0, 0, 0), extra=(0, 0), count_pad=True, **kwargs):
            super().__init__(**kwargs)
            self.mode, self.pool_size, self.strides = mode, tuple(pool_size), tuple(strides)
            self.pads, self.extra, self.count_pad = tuple(pads), tuple(extra), count_pad

        def _padding(self):
            t, left, b, r = self.pads
            return [[0, 0], [t, b + self.extra[0]], [left, r + self.extra[1]], [0, 0]]

        def call(self, x):
            padded = any(self.pads) or any(self.extra)
            if self.mode == "max":
                if padded:
                    x = ops.pad(x, self._padding(), constant_values=float("-inf"))
                return ops.max_pool(x, self.pool_size, self.strides, padding="valid")
            if not padded:
                return ops.average_pool(x, self.pool_size, self.strides, padding="valid")
            # the mean over the cells that count: window sums of x and of a mask of counted cells
            t, left, b, r = self.pads
            ones = ops.ones_like(x[:1, :, :, :1])
            if self.count_pad:
                ones = ops.pad(ones, [[0, 0], [t, b], [left, r], [0, 0]], constant_values=1.0)
                ones = ops.pad(ones, [[0, 0], [0, self.extra[0]], [0, self.extra[1]], [0, 0]])
            else:
                ones = ops.pad(ones, self._padding())
            total = ops.average_pool(ops.pad(x, self._padding()), self.pool_size, self.strides, padding="valid")
            return total / ops.average_pool(ones, self.pool_size, self.strides, padding="valid")

        def compute_output_shape(self, input_shape):
            n, h, w, c = input_shape
            (kh, kw), (sh, sw), (t, left, b, r), (eh, ew) = self.pool_size, self.strides, self.pads, self.extra
            return (n, (h + t + b + eh - kh) // sh + 1, (w + left + r + ew - kw) // sw + 1, c)

        def get_config(self):
            return super().get_config() | {"mode": self.mode, "pool_size": self.pool_size, "strides": self.strides,
                                           "pads": self.pads, "extra": self.extra, "count_pad": self.count_pad}

    return SpecPool2D


KINDS = (MaxPool(), AvgPool())
