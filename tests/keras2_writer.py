"""Write Keras 2 files with real Keras 2 (tf-keras): run as a script, in its own process.

    python tests/keras2_writer.py NAME SEED CROPS.npy FOLDER KINDS

builds `tf_keras.applications.<NAME>(weights=None)` seeded by `tf_keras.utils.set_random_seed(SEED)`, makes its
weights tell the photos in CROPS.npy (uint8, NxHxWx3 RGB) apart, saves it in each of KINDS (comma-separated):
`weights` as Keras Applications' published files were saved (`model.save_weights("....h5")`, the legacy h5
format), `model` as a whole model (`model.save("....h5")`: the weights under `model_weights`), and writes `reference.npz` in FOLDER: the input
after tf_keras' own `preprocess_input` (`x`), tf_keras' logits (`logits`, its softmax head made linear) and
probabilities (`probs`), and tf_keras' version.

tf_keras and Keras 3 must not share a process (the test process runs zoo on Keras 3), hence the script.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TF_USE_LEGACY_KERAS", None)  # tf_keras is imported by name; tf.keras stays whatever it is
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from seeded import set_head  # noqa: E402  (tests/ is this script's folder: on its path)

MODELS = {"resnet50": ("ResNet50", "resnet50"), "vgg16": ("VGG16", "vgg16")}  # class, module
FILES = {"weights": "{}_weights_tf_dim_ordering_tf_kernels.h5", "model": "{}_model.h5"}


def set_batchnorm(tf_keras, model, x, rng) -> int:
    """Every BatchNormalization's gamma U(0.5, 1.5), beta N(0, 0.1), and moving statistics from the photos: one
    training-mode pass with momentum 0 sets each layer's moving mean and variance to its batch's, which are then
    perturbed (mean + N(0, 0.2) std, variance * U(0.5, 2)) so that no two channels or layers hold alike values."""
    layers = [layer for layer in model.layers if isinstance(layer, tf_keras.layers.BatchNormalization)]
    for layer in layers:
        n = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
        layer.beta.assign((rng.standard_normal(n) * 0.1).astype(np.float32))
        layer.momentum, momentum = 0.0, layer.momentum
    model(x, training=True)
    for layer in layers:
        layer.momentum = momentum
        n = layer.gamma.shape[0]
        var = layer.moving_variance.numpy()
        layer.moving_mean.assign((layer.moving_mean.numpy() + rng.standard_normal(n) * 0.2 * np.sqrt(var))
                                 .astype(np.float32))
        layer.moving_variance.assign((var * rng.uniform(0.5, 2.0, n)).astype(np.float32))
    return len(layers)


def scale_convs(tf_keras, model, x) -> None:
    """A plain chain (VGG16): each conv and hidden dense layer's kernel and bias divided by its output's std on
    the photos, so the activations stay near 1 through the network."""
    for layer in model.layers[1:]:
        if layer.name == "predictions":
            return
        if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
            std = float(np.std(layer(x).numpy()))
            for v in layer.weights:
                v.assign(v.numpy() / np.float32(std))
        x = layer(x)


def main(name: str, seed: int, crops_path: str, folder: str, kinds: list[str]) -> None:
    import tf_keras

    folder = Path(folder)
    cls, module = MODELS[name]
    tf_keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    crops = np.load(crops_path)
    x = np.asarray(getattr(tf_keras.applications, module).preprocess_input(crops.astype(np.float32)), np.float32)
    model = getattr(tf_keras.applications, cls)(weights=None)
    batchnorms = set_batchnorm(tf_keras, model, x, rng)
    if not batchnorms:
        scale_convs(tf_keras, model, x)
    head = model.get_layer("predictions")
    set_head(head, tf_keras.Model(model.input, head.input)(x, training=False).numpy())
    save = {"weights": model.save_weights, "model": model.save}
    for kind in kinds:
        save[kind](str(folder / FILES[kind].format(name)))
    probs = model(x, training=False).numpy()
    head.activation = tf_keras.activations.linear  # eager calls read it each time
    logits = model(x, training=False).numpy()
    np.savez(folder / "reference.npz", x=x, logits=logits, probs=probs, batchnorms=batchnorms,
             version=tf_keras.__version__)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(","))
