"""dense: fully connected, y = x @ kernel + bias, optional fused ReLU.

Config: units, bias (true), activation (null or "relu"). Parameters: kernel (in, units) and bias.
A dense layer right after a flatten (dropouts between are fine) sees its inputs in H,W,C order,
Keras' flatten order; Caffe and PyTorch flatten C,H,W, so their rows are reordered on import.
"""

from __future__ import annotations

import math

from zoo.layers.base import REQUIRED, Kind, Node


class Dense(Kind):
    name = "dense"
    schema = {"units": REQUIRED, "bias": True, "activation": None}
    spatial = False
    foreign = {"torch": {"weight": "kernel", "bias": "bias"}, "caffe-tensorflow": {"weights": "kernel", "biases": "bias"}}

    def check(self, cfg, shapes):
        if len(shapes[0]) != 1:
            raise ValueError(f"needs a flat input, got {shapes[0]}; add a flatten or global pool before it")
        if cfg["activation"] not in (None, "relu"):
            raise ValueError(f"activation must be null or relu, not {cfg['activation']!r}")

    def output_shape(self, cfg, shapes):
        return (cfg["units"],)

    def params(self, cfg, shapes):
        out = {"kernel": ((shapes[0][0], cfg["units"]), "IO")}
        return out | ({"bias": ((cfg["units"],), "O")} if cfg["bias"] else {})

    def macs(self, node: Node) -> int:
        return math.prod(node.params["kernel"].shape)

    def rows_chw(self, node: Node, param):
        if node.flattened_from:  # a foreign row holds the flattened map in C,H,W order
            h, w, c = node.flattened_from
            return (c, h, w)
        return (node.input_shapes[0][0], 1, 1)

    def keras(self, node):
        from keras import layers

        cfg = node.config
        return layers.Dense(cfg["units"], activation=cfg["activation"], use_bias=cfg["bias"], name=node.name)

    def onnx(self, node, g, x):
        inputs = [x[0], g.weight(node, "kernel")] + ([g.weight(node, "bias")] if node.config["bias"] else [])
        out = g.node("Gemm", inputs, name=node.name)
        return g.node("Relu", [out]) if node.config["activation"] == "relu" else out


KIND = Dense()
