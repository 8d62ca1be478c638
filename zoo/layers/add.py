"""add: the sum of two or more inputs of one shape (residual connections); ONNX: a chain of Add."""

from __future__ import annotations

from zoo.layers.base import Kind


class Add(Kind):
    name = "add"
    inputs = 0
    spatial = False

    def check(self, cfg, shapes):
        if len(set(shapes)) != 1:
            raise ValueError(f"inputs differ in shape: {shapes}")

    def keras(self, node):
        from keras import layers

        return layers.Add(name=node.name)

    def onnx(self, node, g, x):
        out = x[0]
        for i, other in enumerate(x[1:]):
            out = g.node("Add", [out, other], name=node.name if i == len(x) - 2 else None)
        return out


KIND = Add()
