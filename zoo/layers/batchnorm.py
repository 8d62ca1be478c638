"""batchnorm: inference-time batch normalization over channels (the last axis).

y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta, as Keras, PyTorch, Caffe
and ONNX compute it. Config: epsilon (1e-3, Keras' default: specs state the framework's, 1e-5 for
PyTorch and Caffe, 1.001e-5 for Keras Applications' ResNet), scale (true: has gamma), center (true:
has beta). Parameters in Keras' order: gamma, beta, moving_mean, moving_variance, each (C,).
Caffe's BatchNorm has no gamma/beta (scale=false, center=false; a Scale layer follows) and stores
running sums: mean = blobs[0] / f, variance = blobs[1] / f with f = blobs[2][0] (f = 0: zeros).
PyTorch's num_batches_tracked is read and dropped (it only matters to a momentum-free update).
"""

from __future__ import annotations

import numpy as np

from zoo.layers.base import Kind, spatial


class BatchNorm(Kind):
    name = "batchnorm"
    schema = {"epsilon": 1e-3, "scale": True, "center": True, "momentum": 0.99}
    computes = ("epsilon", "scale", "center")  # momentum only matters to training
    foreign = {
        "torch": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"},
        "caffe-tensorflow": {"scale": "gamma", "offset": "beta", "mean": "moving_mean", "variance": "moving_variance"},
    }
    ignored = {"torch": ("num_batches_tracked",)}

    def check(self, cfg, shapes):
        spatial(shapes)
        if not cfg["epsilon"] > 0:
            raise ValueError("epsilon must be positive")

    def params(self, cfg, shapes):
        c = (shapes[0][-1],)
        names = (["gamma"] if cfg["scale"] else []) + (["beta"] if cfg["center"] else []) + ["moving_mean", "moving_variance"]
        return {n: (c, "C") for n in names}

    def names_in(self, convention, node):
        if convention == "caffe":
            return {"0": "moving_mean", "1": "moving_variance", "2": "factor"}
        return super().names_in(convention, node)

    def foreign_shape(self, convention, node, param):
        return (1,) if param == "factor" else super().foreign_shape(convention, node, param)

    def import_params(self, convention, node, arrays, release=None):
        if convention != "caffe":
            return super().import_params(convention, node, arrays, release)
        f = float(arrays["2"].reshape(-1)[0])
        scale = np.float32(0.0 if f == 0 else 1.0 / f)
        return {"moving_mean": (arrays["0"] * scale).astype(np.float32), "moving_variance": (arrays["1"] * scale).astype(np.float32)}

    def affine(self, cfg, params):
        a = params.get("gamma", 1.0) / np.sqrt(params["moving_variance"].astype(np.float64) + cfg["epsilon"])
        return a, params.get("beta", 0.0) - params["moving_mean"] * a

    def absorb(self, layer, params, a, b):  # a Scale after a bias-free batch norm: Keras' batch norm with gamma, beta
        gamma, beta = params.get("gamma", 1.0) * a, params.get("beta", 0.0) * a + b
        return dict(layer, scale=True, center=True), {"gamma": gamma.astype(np.float32), "beta": beta.astype(np.float32),
                                                      "moving_mean": params["moving_mean"], "moving_variance": params["moving_variance"]}

    def keras(self, node):
        from keras import layers

        cfg = node.config
        return layers.BatchNormalization(axis=-1, epsilon=cfg["epsilon"], momentum=cfg["momentum"], scale=cfg["scale"],
                                         center=cfg["center"], name=node.name)

    def onnx(self, node, g, x):
        c = node.output_shape[-1]
        gamma = g.weight(node, "gamma") if node.config["scale"] else g.constant(f"{node.name}.ones", np.ones(c, np.float32))
        beta = g.weight(node, "beta") if node.config["center"] else g.constant(f"{node.name}.zeros", np.zeros(c, np.float32))
        return g.node("BatchNormalization", [x[0], gamma, beta, g.weight(node, "moving_mean"), g.weight(node, "moving_variance")],
                      name=node.name, epsilon=node.config["epsilon"])


KIND = BatchNorm()
