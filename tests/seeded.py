"""Deterministic, numpy-only weights for PyTorch state-dict style names.

`seeded_state` lets the tests rebuild the exact weights behind the reference outputs
in tests/data/torchvision/ (made by tests/references/make_torchvision.py) without
torchvision: the keys and shapes are stored beside the outputs, and the weights are
drawn here from one seed.
"""

import json
from pathlib import Path

import numpy as np

TORCHVISION = Path(__file__).parent / "data" / "torchvision"


def seeded_state(shapes, seed, scales=None, fixed=None):
    """Fill a state dict {name: shape} from one np.random.RandomState(seed), keys in the given order.

    By the last part of each name:
      weight, ndim >= 2      N(0, sqrt(2 / fan_in)), fan_in = prod(shape[1:])  (He init)
      weight, ndim == 1      U(0.5, 1.5)      (batch-norm gamma)
      bias                   N(0, 0.1)        (conv, linear and batch-norm beta alike)
      running_mean           N(0, 0.2)
      running_var            U(0.5, 2.0)
      num_batches_tracked    np.array(0, int64)
    Floats are float32. Afterwards each tensor named in `scales` is multiplied by its
    factor (float32), e.g. LSUV-style calibration factors recorded by the generator, and
    each tensor named in `fixed` is replaced by the given array (its draw still happens,
    so the other tensors do not move), e.g. a data-dependent classifier bias.
    """
    rng = np.random.RandomState(seed)
    out = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        kind = name.rsplit(".", 1)[-1]
        if kind == "num_batches_tracked":
            out[name] = np.array(0, dtype=np.int64)
            continue
        if kind == "weight" and len(shape) >= 2:
            a = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif kind == "weight":
            a = rng.uniform(0.5, 1.5, shape)
        elif kind == "bias":
            a = rng.normal(0.0, 0.1, shape)
        elif kind == "running_mean":
            a = rng.normal(0.0, 0.2, shape)
        elif kind == "running_var":
            a = rng.uniform(0.5, 2.0, shape)
        else:
            raise ValueError(f"seeded_state: no rule for {name!r}")
        out[name] = a.astype(np.float32)
    for name, factor in (scales or {}).items():
        out[name] = out[name] * np.float32(factor)
    for name, value in (fixed or {}).items():
        value = np.asarray(value, dtype=out[name].dtype)
        if value.shape != out[name].shape:
            raise ValueError(f"seeded_state: {name} is {out[name].shape}, fixed value {value.shape}")
        out[name] = value
    return out


def torchvision_state(name):
    """The seeded state dict of tests/data/torchvision/NAME.npz (its keys in the state dict's own order)."""
    z = np.load(TORCHVISION / f"{name}.npz")
    shapes = json.loads(str(z["shapes"]))
    shapes = {k: shapes[k] for k in z["keys"].tolist()}
    return seeded_state(shapes, int(z["seed"]), dict(zip(z["scale_keys"].tolist(), z["scale_values"].tolist())),
                        {str(z["fixed_key"]): z["fixed_value"]})


LOGIT_STD = 3.0


def set_head(dense, features: np.ndarray) -> None:
    """A classifier head for seeded networks (Keras 3's or tf_keras' Dense): a random kernel with its components
    along the batch's centred features whitened (random features of natural photos differ mostly along one
    direction, which alone would give the photos opposite logits, two top-1s for four photos), scaled so the
    logits' std is LOGIT_STD; the bias centres the logits over the batch (bias = -mean features @ W)."""
    f = features.astype(np.float64)
    mean = f.mean(0)
    _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
    v = vt[: len(f) - 1].T  # the n-1 directions centred features span
    w0 = dense.kernel.numpy().astype(np.float64)
    along = v.T @ w0
    w = w0 - v @ along + v @ ((s[0] / s[: len(f) - 1])[:, None] * along)
    w *= LOGIT_STD / ((f - mean) @ w).std()
    dense.kernel.assign(w.astype(np.float32))
    dense.bias.assign((-mean @ w).astype(np.float32))
