"""relu: max(x, 0), as its own layer (conv and dense also take it as a fused activation)."""

from __future__ import annotations

from zoo.layers.base import Kind


class ReLU(Kind):
    name = "relu"
    spatial = False

    def keras(self, node):
        from keras import layers

        return layers.ReLU(name=node.name)

    def onnx(self, node, g, x):
        return g.node("Relu", x, name=node.name)


KIND = ReLU()
