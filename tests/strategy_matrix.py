"""Every optimizer zoo offers, trained a few steps on a tiny model under a tf.distribute strategy, to compare with
the same training on one device: tests/test_finetune.py (MirroredStrategy over two logical CPUs) and
tests/test_multiworker.py (zoo's MultiWorkerMirroredStrategy over two workers of `zoo launch`) run it in the
processes they start anyway (a TensorFlow start and a collective setup cost seconds; the matrix ~3 s of CPU), and
check() compares what it wrote there.

On one device each row trains with Keras' fit, as zoo does. Under the strategy all rows train together: one traced
function runs each model's own Keras train_step on every replica (strategy.run, as fit's train function does), over
one distributed iterator of the global batches, sharded as zoo shards them. Fit per row would trace a train function
and start distributed iterators for each model: twice the CPU. The optimizers' distributed path is the same: Keras'
optimizer.apply in replica context, gradients all-reduced across replicas before the update.
"""

from __future__ import annotations

import os
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
# 8 steps (4 images a replica with two replicas) over the data twice: the schedules are planned for EPOCHS epochs
# of SAMPLES // GLOBAL_BATCH steps
GLOBAL_BATCH, SAMPLES, EPOCHS = 8, 32, 2
# (rtol, atol) against one device: each replica's gradient is a mean over 4 images, all-reduced, where one device
# takes one mean over 8 (float32 rounding, a few ulps a step); mixed_float16 computes in 16 bits (11 of mantissa)
TOLERANCE = {"float32": (1e-5, 1e-6), "float16": (2e-3, 2e-3)}


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
    return [rng.normal(scale=0.5, size=s).astype("float32") for s in ((6, 3), (3,))]


def build(name: str):
    """The tiny model with the row's optimizer, compiled and built, under the current strategy's scope."""
    import keras

    from zoo.finetune.engine import precision

    row = ROWS[name]
    with precision(row.get("precision", "float32")):
        # one layer: under MultiWorkerMirroredStrategy every variable's creation is a broadcast from worker 0
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
        model.set_weights(initial_weights())
        model.compile(optimizer(row), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    if row.get("precision") == "mixed_float16":  # Keras wrapped it: the loss is scaled, the weights stay float32
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer), type(model.optimizer)
        assert model.layers[0].compute_dtype == "float16" and model.layers[0].kernel.dtype == "float32"  # logits too
    return model


def batches():
    """The global batches, EPOCHS passes over the data, sharded by data as zoo shards (distributed.shard)."""
    import tensorflow as tf

    from zoo.finetune.distributed import shard

    return shard(tf.data.Dataset.from_tensor_slices(data()).repeat(EPOCHS).batch(GLOBAL_BATCH))


def train(name: str) -> list[np.ndarray]:
    """The row's weights after Keras' fit on one device."""
    model = build(name)
    model.fit(batches(), epochs=1, verbose=0, shuffle=False)
    return model.get_weights()


def train_all(strat) -> dict[str, list[np.ndarray]]:
    """Every row's weights after training under `strat`, all rows in one traced step (the module's docstring)."""
    import tensorflow as tf

    with strat.scope():
        models = {name: build(name) for name in ROWS}

    @tf.function
    def step(batch):
        for model in models.values():
            strat.run(model.train_step, args=(batch,))

    for i, batch in enumerate(strat.experimental_distribute_dataset(batches())):
        if i == 0:  # each replica has its part of the global batch, not all of it
            sizes = strat.experimental_local_results(strat.run(lambda b: tf.shape(b[0])[0], args=(batch,)))
            assert [int(n) for n in sizes] == [GLOBAL_BATCH // strat.num_replicas_in_sync] * len(sizes), sizes
        step(batch)
    return {name: model.get_weights() for name, model in models.items()}


def run(strategy: str, out) -> None:
    """The matrix under zoo's strategy for `strategy` (made once a process: the one a zoo finetune in this process
    used), written to OUT/<worker index>.npz: {"<row>/<i>": weight i}; worker 0 then trains every row on one device,
    outside the strategy, to OUT/one-device.npz (the test's own process need not start TensorFlow)."""
    from zoo.finetune import distributed

    strat = distributed.strategy(strategy)
    assert strat.num_replicas_in_sync == 2, strat.num_replicas_in_sync
    index = distributed.worker_index(strat)
    _save(os.path.join(out, f"{index}.npz"), train_all(strat))
    if index == 0:
        _save(os.path.join(out, "one-device.npz"), {name: train(name) for name in ROWS})


def _save(path: str, weights: dict[str, list[np.ndarray]]) -> None:
    np.savez(path, **{f"{name}/{i}": w for name, ws in weights.items() for i, w in enumerate(ws)})


def check(folder: Path, workers: int) -> dict[str, float]:
    """Assert that run()'s weights in `folder` are those trained on one device within the rows' tolerance, and
    those of every worker the same, bit for bit (mirrored variables). Returns each row's largest difference
    relative to the weights' scale, max |a - b| / max |b|."""
    got = [dict(np.load(folder / f"{i}.npz")) for i in range(workers)]
    for other in got[1:]:
        for key, w in got[0].items():
            np.testing.assert_array_equal(other[key], w, err_msg=key)
    want, start, worst = dict(np.load(folder / "one-device.npz")), initial_weights(), {}
    assert set(want) == set(got[0]) == {f"{name}/{i}" for name in ROWS for i in range(len(start))}
    for name in ROWS:
        rtol, atol = TOLERANCE["float16" if "float16" in name else "float32"]
        keys = [f"{name}/{i}" for i in range(len(start))]
        for key in keys:
            np.testing.assert_allclose(got[0][key], want[key], rtol=rtol, atol=atol, err_msg=key)
        assert not np.allclose(want[keys[0]], start[0]), name  # the steps did move the weights
        worst[name] = max(float(np.abs(got[0][k] - want[k]).max() / np.abs(want[k]).max()) for k in keys)
    return worst
