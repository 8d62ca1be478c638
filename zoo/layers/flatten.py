"""flatten: (H, W, C) -> (H*W*C,) in H,W,C order, Keras'.

A dense layer after it knows the map's shape (Node.flattened_from), so weights from C,H,W-flattening
frameworks (Caffe, PyTorch) are reordered on import, and the ONNX graph transposes back to NHWC before
its Flatten."""

from __future__ import annotations

import math

from zoo.layers.base import Kind


class Flatten(Kind):
    name = "flatten"
    spatial = False

    def output_shape(self, cfg, shapes):
        return (math.prod(shapes[0]),)

    def keras(self, node):
        from keras import layers

        return layers.Flatten(name=node.name)

    def onnx(self, node, g, x):
        if len(node.input_shapes[0]) == 3:
            x = [g.node("Transpose", x, perm=[0, 2, 3, 1])]
        return g.node("Flatten", x, name=node.name, axis=1)


KIND = Flatten()
