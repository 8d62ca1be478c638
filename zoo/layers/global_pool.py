"""global_avgpool: the mean over all positions, (H, W, C) -> (C,).

What Keras' GlobalAveragePooling2D, PyTorch's AdaptiveAvgPool2d(1) + flatten and ONNX's
GlobalAveragePool + Flatten compute. Config: none.
"""

from __future__ import annotations

from zoo.layers.base import Kind, spatial


class GlobalAvgPool(Kind):
    name = "global_avgpool"

    def output_shape(self, cfg, shapes):
        return (spatial(shapes)[2],)

    def keras(self, node):
        from keras import layers

        return layers.GlobalAveragePooling2D(name=node.name)

    def onnx(self, node, g, x):
        return g.node("Flatten", [g.node("GlobalAveragePool", x, name=node.name)], axis=1)


KIND = GlobalAvgPool()
