"""adaptive_avgpool: PyTorch's AdaptiveAvgPool2d to an `output` x `output` map.

Only where the input tiles exactly (a multiple of the output: an ordinary average pool with window
and stride input/output, or an identity), which holds for the specs' input sizes; PyTorch's
overlapping windows for other sizes are refused rather than approximated. Config: output.
"""

from __future__ import annotations

from zoo.layers.base import REQUIRED, Kind, spatial


class AdaptiveAvgPool(Kind):
    name = "adaptive_avgpool"
    schema = {"output": REQUIRED}

    def check(self, cfg, shapes):
        h, w, _ = spatial(shapes)
        o = cfg["output"]
        if h % o or w % o:
            raise ValueError(f"input {h}x{w} is not a multiple of output {o}: not supported")

    def output_shape(self, cfg, shapes):
        return (cfg["output"], cfg["output"], shapes[0][2])

    def keras(self, node):
        from keras import layers

        f = tuple(n // node.config["output"] for n in node.input_shapes[0][:2])
        return layers.AveragePooling2D(f, name=node.name) if f != (1, 1) else layers.Identity(name=node.name)

    def onnx(self, node, g, x):
        f = [n // node.config["output"] for n in node.input_shapes[0][:2]]
        if f == [1, 1]:
            return g.node("Identity", x, name=node.name)
        return g.node("AveragePool", x, name=node.name, kernel_shape=f, strides=f)


KIND = AdaptiveAvgPool()
