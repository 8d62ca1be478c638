"""The run: plan it (every check first), build the model with the frozen layers frozen, feed it (cached
features or images), fit with the callbacks, then write the verified weights with the new head."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from zoo.errors import ZooError
from zoo.finetune.config import FinetuneConfig, FinetuneResult, configure
from zoo.finetune.plan import Plan, make_plan, resume_state, say

# computed in float32 under a mixed policy: LRN has no bfloat16 kernel on CPU (TensorFlow: float32 and float16);
# the head, so that logits, softmax and loss are float32 (Keras' mixed-precision guide)
FLOAT32_KINDS = ("lrn",)


def finetune(config: FinetuneConfig | None = None, **overrides) -> FinetuneResult:
    """Fine-tune as `config` (or FinetuneConfig's defaults) with `overrides` says; see zoo.finetune.config."""
    plan = make_plan(configure(config, overrides))  # no TensorFlow yet: a plan's one-line refusal comes before its logs

    from zoo.finetune import distributed
    from zoo.finetune.checkpoints import lock_run

    strat = distributed.strategy(plan.cfg.strategy)
    distributed.agree(strat, plan.cfg)  # every worker has planned: only now may the chief write
    with distributed.writes_to(strat, plan.run, distributed.worker_index(strat)) as run, lock_run(run):
        if run != plan.run:  # not the chief: the same run, written to a folder removed after
            result = _start(replace(plan, run=run), strat)
            return replace(result, run_dir=plan.run, weights=plan.run / result.weights.name, chief=False)
        if resume_state(plan.cfg, plan.run) != plan.state:  # planned before the lock: another run may have written since
            raise ZooError("another zoo finetune wrote this run folder while this one was starting; check it", plan.run)
        return _start(plan, strat)


def _start(plan: Plan, strat) -> FinetuneResult:
    import keras

    from zoo.finetune import distributed
    from zoo.finetune.checkpoints import atomic_write_text

    keras.utils.set_random_seed(plan.cfg.seed)
    (plan.run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not plan.cfg.resume:
        atomic_write_text(plan.run / "config.json", json.dumps(asdict(plan.cfg), indent=2))
        atomic_write_text(plan.run / "checkpoints" / "state.json", json.dumps({"base_weights": plan.base_weights}))
    # before training, so that `zoo report` can evaluate an interrupted run: the validation list in the seed's
    # `path label` format (absolute paths: the report may run from elsewhere)
    atomic_write_text(plan.run / "classes.txt", "\n".join(plan.train.classes) + "\n")
    atomic_write_text(plan.run / "val.txt", "".join(f"{Path(p).absolute()} {y}\n" for p, y in zip(plan.val.paths, plan.val.labels)))
    with precision(plan.cfg.precision):
        full, base, model = build(plan, strat)
        if plan.finishing:
            say(f"{plan.run} ran all its {plan.first_epoch} epochs but did not write its final files: writing them")
            return finish(plan, full) if plan.chief else FinetuneResult(plan.run, plan.run / "weights.safetensors",
                                                                          plan.train.classes, plan.trained, plan.cache)
        say(f"fine-tuning {plan.spec.id} -> {plan.spec.num_classes} classes ({', '.join(plan.train.classes)}); training "
            f"{', '.join(plan.trained)}; {len(plan.train)} train / {len(plan.val)} val images; "
            f"{'cached features' if plan.cache else 'full forward'}; {plan.cfg.precision}; run folder {plan.run}")
        return fit(plan, full, base, model, distributed.worker_index(strat))


@contextmanager
def precision(policy: str):
    """Keras' global dtype policy while the run's models are made and trained, float32 again after: the weights,
    checkpoints and exports are float32 (mixed policies keep variables in float32 and compute in 16 bits)."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def build(plan: Plan, strat):
    """(the whole model, the frozen base or None, the model that trains: the whole one, or its top on cached
    features), compiled, restored on resume, under the run's tf.distribute strategy."""
    import keras

    from zoo.backends.keras import create_model
    from zoo.finetune.caching import split_at
    from zoo.finetune.checkpoints import restore_checkpoint

    cfg = plan.cfg
    with strat.scope():
        full = create_model(None if plan.weights else plan.base_spec, weights=plan.weights, num_classes=plan.spec.num_classes)
        for node in plan.spec.nodes:  # no-ops in float32
            if node.name == plan.spec.head or node.kind in FLOAT32_KINDS:
                full.get_layer(node.name).dtype_policy = "float32"
        for layer in full.layers:  # frozen batch norm runs in inference mode: its statistics stay as loaded
            layer.trainable = layer.name in plan.trained or not layer.weights
        base, model = split_at(full, plan.spec, plan.trained[0]) if plan.cache else (None, full)
        model.compile(optimizer=optimizer(cfg, steps_per_epoch(plan)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        if plan.first_epoch:
            restore_checkpoint(model, Path(cfg.out) / "checkpoints" / plan.state["last"])  # the chief's, on every worker
            say(f"resumed {cfg.out} after epoch {plan.first_epoch}")  # the chief's run, on every worker
    return full, base, model


def steps_per_epoch(plan: Plan) -> int:
    return -(-len(plan.train) // plan.cfg.batch_size)


def fit(plan: Plan, full, base, model, worker: int = 0) -> FinetuneResult:
    import numpy as np

    from zoo.finetune import callbacks
    from zoo.finetune.caching import cached_datasets
    from zoo.finetune.distributed import shard, step_error

    cfg, frozen_seconds = plan.cfg, 0.0
    if plan.cache:
        train_ds, val_ds, train_x, frozen_seconds = cached_datasets(plan, base)
        probe = (model, train_x[: cfg.batch_size], plan.train.labels[: cfg.batch_size])
    else:
        from zoo.data import epochs_dataset, eval_dataset

        train_ds, _ = epochs_dataset(plan.train, plan.spec, cfg.batch_size, plan.first_epoch, cfg.epochs, cfg.seed, cfg.augment)
        val_ds = eval_dataset(plan.val, plan.spec, cfg.batch_size)
        probe = _probe(plan, full, model)
    probe = probe if cfg.strategy == "none" else None  # distributed: per-replica gradients on a host batch do not apply
    train_ds, val_ds = shard(train_ds), shard(val_ds)
    run_callbacks = callbacks.build_callbacks(plan, full, probe)
    position = next(c for c in run_callbacks if isinstance(c, callbacks.Position))
    try:
        hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, initial_epoch=plan.first_epoch,
                         steps_per_epoch=steps_per_epoch(plan), verbose=0, shuffle=False,  # the datasets order themselves
                         callbacks=run_callbacks)
    except (ZooError, KeyboardInterrupt):
        raise
    except Exception as e:  # a failed step: one line saying where, never the values (a PerReplica holds whole batches)
        raise step_error(e, plan.spec.layer_names, worker, position.epoch, position.step) from None
    history = [{k: float(v[i]) for k, v in hist.history.items()} for i in range(len(hist.epoch))]
    result = _results(plan, full, history)
    rates = [h.get("images_per_second", 0) for h in history]
    result.images_per_second, result.frozen_pass_seconds = float(np.median(rates)) if rates else 0.0, frozen_seconds
    return result


def finish(plan: Plan, full) -> FinetuneResult:
    """The end of a run whose epochs all ran (the model restored from the last one): best.safetensors, then the
    weights, as fit's end writes them."""
    from zoo.finetune.callbacks import Checkpoint

    Checkpoint(plan.run, full, plan.spec, plan.train.classes, plan.trained).on_train_end()
    return _results(plan, full, [])


def _probe(plan: Plan, full, model):
    """The histograms' fixed batch: (model of the trained layers, its input, labels); the frozen layers'
    output for it is computed once (7 s an epoch for AlexNet's fc7+fc8)."""
    from zoo.data import eval_dataset
    from zoo.finetune.caching import split_at

    x, y = next(iter(eval_dataset(plan.train, plan.spec, plan.cfg.batch_size)))
    if not plan.frozen_prefix:
        return model, x, y
    probe_base, probe_model = split_at(full, plan.spec, plan.trained[0])
    return probe_model, probe_base(x, training=False), y


def _results(plan: Plan, full, history: list[dict]) -> FinetuneResult:
    """Verified weights with the new head, class names; the result."""
    from zoo.backends.keras import model_tensors
    from zoo.export import save_reference
    from zoo.finetune.checkpoints import atomic_write_text, read_state
    from zoo.weights import save_weights

    cfg, classes = plan.cfg, plan.train.classes
    meta = {"base_spec": plan.base_spec.id, "classes": json.dumps(classes), "trained_layers": json.dumps(plan.trained),
            "training": json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("out", "resume")}),
            "base_weights_sha256": plan.weights.metadata.get("source_sha256", "") if plan.weights else "random-init"}
    out = save_weights(plan.run / "weights.safetensors", plan.spec, model_tensors(full, plan.spec), meta)
    save_reference(out, full, plan.spec)  # the logits zoo export checks the run's artifacts against, without TensorFlow
    state = read_state(plan.run / "checkpoints")
    state["finished"] = state["epoch"]  # every file written: --resume now needs more --epochs
    atomic_write_text(plan.run / "checkpoints" / "state.json", json.dumps(state))
    say(f"done: best val accuracy {state.get('best_val_accuracy', 0):.3f} (epoch {state.get('best_epoch')}); weights {out}")
    return FinetuneResult(plan.run, out, classes, plan.trained, plan.cache, history, state.get("best_val_accuracy", 0.0))


def optimizer(cfg: FinetuneConfig, steps_per_epoch: int):
    import keras

    from zoo.optimizers import FusedAdam, FusedSGD

    lr = cfg.lr
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=max(1, cfg.epochs * steps_per_epoch))
    elif cfg.schedule == "step":  # x0.1 every third of the run
        lr = keras.optimizers.schedules.ExponentialDecay(cfg.lr, max(1, cfg.epochs * steps_per_epoch // 3), 0.1, staircase=True)
    if cfg.optimizer == "adam":
        return FusedAdam(lr)
    return FusedSGD(lr, momentum=cfg.momentum)
