"""Every optimizer zoo offers, trained a few steps on a tiny model under one tf.distribute strategy: the weights
after training, to compare with the single-device run's (tests/test_multiworker.py::test_every_optimizer_*).

As a script it trains the whole matrix in one process, under the strategy zoo makes for its name
(zoo.finetune.distributed.strategy: its own MultiWorkerMirroredStrategy subclass), the data sharded as zoo shards it:

    python strategy_matrix.py mirrored OUT      # two logical CPU devices of this process
    python strategy_matrix.py multiworker OUT   # one worker of `zoo launch`'s TF_CONFIG: zoo.finetune.launch

and writes OUT/<worker index>.npz: {"<optimizer>/<i>": weight i}. One process a strategy, every optimizer in it:
a TensorFlow start and a collective setup cost seconds, a row's training a fraction of one.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np

# the rows: what the finetune CLI builds (zoo.finetune.engine.optimizer: each --optimizer, each --schedule, SGD with
# --momentum 0, which FusedSGD hands to Keras' own update) and what zoo.optimizers covers beyond the CLI (Nesterov,
# fused; amsgrad, Keras' own update); --precision mixed_float16 wraps the optimizer in Keras' LossScaleOptimizer
ROWS = {
    "sgd": dict(cfg=dict(optimizer="sgd", lr=0.05)),  # FusedSGD, momentum 0.9: the CLI's default
    "sgd-momentum0-cosine": dict(cfg=dict(optimizer="sgd", lr=0.05, momentum=0.0, schedule="cosine")),
    "sgd-nesterov": dict(fused=("FusedSGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True))),
    "adam-step": dict(cfg=dict(optimizer="adam", lr=0.01, schedule="step")),
    "adam-amsgrad": dict(fused=("FusedAdam", dict(learning_rate=0.01, amsgrad=True))),
    "sgd-mixed_float16": dict(cfg=dict(optimizer="sgd", lr=0.05), precision="mixed_float16"),
}
# 8 steps (4 images a replica with two replicas), as one fit epoch over the data twice: the schedules are planned for
# EPOCHS epochs of SAMPLES // GLOBAL_BATCH steps; each fit epoch starts a distributed iterator (a second here)
GLOBAL_BATCH, SAMPLES, EPOCHS = 8, 32, 2
# (rtol, atol) against one device: each replica's gradient is a mean over 4 images, all-reduced, where one device
# takes one mean over 8 (float32 rounding, a few ulps a step); mixed_float16 computes in 16 bits (11 of mantissa)
TOLERANCE = {"float32": (1e-5, 1e-6), "float16": (1e-3, 1e-3)}


def optimizer(row: dict):
    from zoo import optimizers
    from zoo.finetune.config import FinetuneConfig
    from zoo.finetune.engine import optimizer as cli_optimizer

    if "cfg" in row:
        return cli_optimizer(FinetuneConfig(**row["cfg"], epochs=EPOCHS), SAMPLES // GLOBAL_BATCH)
    name, kw = row["fused"]
    return getattr(optimizers, name)(**kw)


def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(SAMPLES, 6)).astype("float32"), rng.integers(0, 3, SAMPLES).astype("int64")


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.normal(scale=0.5, size=s).astype("float32") for s in ((6, 5), (5,), (5, 3), (3,))]


def train(name: str, strat) -> list[np.ndarray]:
    """The row's weights after EPOCHS passes over the data of the tiny model under `strat` (the default strategy: one device)."""
    import keras
    import tensorflow as tf

    from zoo.finetune.distributed import shard
    from zoo.finetune.engine import precision

    row = ROWS[name]
    x, y = data()
    with precision(row.get("precision", "float32")), strat.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                                  keras.layers.Dense(3, dtype="float32")])  # float32 logits, as zoo's head
        model.set_weights(initial_weights())
        model.compile(optimizer(row), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ds = shard(tf.data.Dataset.from_tensor_slices((x, y)).repeat(EPOCHS).batch(GLOBAL_BATCH))
        model.fit(ds, epochs=1, verbose=0, shuffle=False)
        if row.get("precision") == "mixed_float16":  # Keras wrapped it: the loss is scaled, the weights stay float32
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer), type(model.optimizer)
            assert model.layers[0].compute_dtype == "float16" and model.layers[0].kernel.dtype == "float32"
        return model.get_weights()


def run(strategy: str, out) -> None:
    """The matrix under zoo's strategy for `strategy` (made once a process: the one a zoo finetune in this process
    used), written to OUT/<worker index>.npz."""
    from zoo.finetune import distributed

    strat = distributed.strategy(strategy)
    assert strat.num_replicas_in_sync == 2, strat.num_replicas_in_sync
    weights = {f"{name}/{i}": w for name in ROWS for i, w in enumerate(train(name, strat))}
    np.savez(os.path.join(out, f"{distributed.worker_index(strat)}.npz"), **weights)


@functools.cache
def one_device() -> dict[str, list[np.ndarray]]:
    """Every row trained on one device (the default strategy), once a test session."""
    import tensorflow as tf

    return {name: train(name, tf.distribute.get_strategy()) for name in ROWS}


def check(folder: Path, workers: int) -> dict[str, float]:
    """Assert that run()'s weights in `folder` are one_device()'s within the rows' tolerance, and those of every
    worker the same, bit for bit (mirrored variables). Returns each row's largest difference relative to the
    weights' scale, max |a - b| / max |b|."""
    got = [dict(np.load(folder / f"{i}.npz")) for i in range(workers)]
    for other in got[1:]:
        for key, w in got[0].items():
            np.testing.assert_array_equal(other[key], w, err_msg=key)
    start, worst = initial_weights(), {}
    for name, want in one_device().items():
        rtol, atol = TOLERANCE["float16" if "float16" in name else "float32"]
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[0][f"{name}/{i}"], w, rtol=rtol, atol=atol, err_msg=f"{name}, weight {i}")
        assert not np.allclose(want[0], start[0]), name  # the steps did move the weights
        worst[name] = max(float(np.abs(got[0][f"{name}/{i}"] - w).max() / np.abs(w).max()) for i, w in enumerate(want))
    return worst


def main(strategy: str, out: str) -> None:
    if strategy == "mirrored":  # before TensorFlow's context starts
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    run(strategy, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
