"""The seeded AlexNet of tests/data/caffe_alexnet_seed1234.npz (real BVLC Caffe outputs), regenerated."""

import numpy as np

LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
W_STD = {"conv1": 0.05, "conv2": 0.02, "conv3": 0.02, "conv4": 0.03, "conv5": 0.03, "fc6": 0.01, "fc7": 0.015, "fc8": 0.01}
B_STD = {name: 1.0 for name in LAYERS} | {"fc8": 0.1}
CAFFE_W_SHAPE = {
    "conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3), "conv4": (384, 192, 3, 3),
    "conv5": (256, 192, 3, 3), "fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (1000, 4096),
}


def caffe_weights(seed=1234):
    """{layer: (W, b)} in Caffe's own layout: conv (out, in/groups, kh, kw), fc (out, in) with C,H,W inputs."""
    rng = np.random.RandomState(seed)
    out = {}
    for name in LAYERS:
        w = rng.normal(0.0, W_STD[name], size=CAFFE_W_SHAPE[name]).astype(np.float32)
        b = rng.normal(0.0, B_STD[name], size=(CAFFE_W_SHAPE[name][0],)).astype(np.float32)
        out[name] = (w, b)
    return out


def caffe_tensorflow_layout(weights):
    """What caffe-tensorflow writes into bvlc_alexnet.npy: HWIO convs, (in, out) fc, fc6 rows in H,W,C order."""
    out = {}
    for name, (w, b) in weights.items():
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        elif name == "fc6":
            w = w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096)
        else:
            w = w.T
        out[name] = (np.ascontiguousarray(w), b)
    return out


def caffe_input(seed=5678):
    """The Caffe `data` blob (BGR, mean subtracted) as NHWC."""
    x = np.random.RandomState(seed).uniform(0.0, 255.0, size=(10, 3, 227, 227)).astype(np.float32)
    x -= np.array([104.0, 117.0, 123.0], np.float32).reshape(1, 3, 1, 1)
    return x.transpose(0, 2, 3, 1)
