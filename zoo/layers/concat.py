"""concat: two or more (H, W, C_i) inputs of one H, W joined along the channels (inception branches)."""

from __future__ import annotations

from zoo.layers.base import Kind


class Concat(Kind):
    name = "concat"
    inputs = 0

    def check(self, cfg, shapes):
        if any(len(s) != len(shapes[0]) or s[:-1] != shapes[0][:-1] for s in shapes):
            raise ValueError(f"inputs differ in more than their channels: {shapes}")

    def output_shape(self, cfg, shapes):
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    def keras(self, node):
        from keras import layers

        return layers.Concatenate(axis=-1, name=node.name)

    def onnx(self, node, g, x):
        return g.node("Concat", x, name=node.name, axis=1)  # channels: axis 1 in NCHW and in (N, C)


KIND = Concat()
