"""softmax: over the channels (the last axis; axis 1 in ONNX's NCHW and in (N, C)), for specs that end in
probabilities."""

from __future__ import annotations

from zoo.layers.base import Kind


class Softmax(Kind):
    name = "softmax"
    spatial = False

    def keras(self, node):
        from keras import layers

        return layers.Softmax(axis=-1, name=node.name)

    def onnx(self, node, g, x):
        return g.node("Softmax", x, name=node.name, axis=1)  # channels: axis 1 in NCHW and in (N, C)


KIND = Softmax()
