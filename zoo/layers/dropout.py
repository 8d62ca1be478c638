"""dropout: Keras' inverted dropout while training (config: rate), the identity at inference.

A flat tensor keeps its value order through it, so a dense layer after flatten + dropout still
knows its inputs' H,W,C order (`passthrough`)."""

from __future__ import annotations

from zoo.layers.base import REQUIRED, Kind


class Dropout(Kind):
    name = "dropout"
    schema = {"rate": REQUIRED}
    spatial = False
    passthrough = True

    def check(self, cfg, shapes):
        if not 0 <= cfg["rate"] < 1:
            raise ValueError("rate must be in [0, 1)")

    def keras(self, node):
        from keras import layers

        return layers.Dropout(node.config["rate"], name=node.name)

    def onnx(self, node, g, x):
        return x[0]  # inference


KIND = Dropout()
