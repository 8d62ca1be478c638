"""Keras callbacks of a run: progress, metrics.csv, TensorBoard scalars, weight and gradient histograms of
the trained layers, and the per-epoch checkpoints. Imports TensorFlow."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from zoo.errors import ZooError
from zoo.finetune.checkpoints import atomic_write_text, checkpoint_arrays, read_state, trained_tensors, write_slot
from zoo.progress import bar


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras' check for a NaN or infinite loss after every step, stopping the run at once with its error: the
    epoch's checkpoint is then never written, so the last one on disk is good (a graceful stop would still
    call on_epoch_end and checkpoint NaN weights, and training on would end in NaN weights)."""

    def __init__(self, run: Path, lr: float):
        super().__init__(raise_error=True)
        self.folder, self.lr, self.epoch = run / "checkpoints", lr, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            state = read_state(self.folder)
            last = (f"the last good checkpoint is {self.folder / state['last']} (epoch {state['epoch']})" if "last" in state
                    else "no epoch finished, so there is no checkpoint")
            raise ZooError(f"training diverged: the loss became {float(logs['loss'])} in epoch {self.epoch + 1}, step {batch + 1}. "
                           f"Try a lower --lr than {self.lr:g} in a new run; {last}", self.folder.parent) from None


class Position(keras.callbacks.Callback):
    """The epoch and step in progress, for naming where a failed step was."""

    epoch = step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.step = epoch, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.step = batch


class Metrics(keras.callbacks.CSVLogger):
    """metrics.csv, epochs counted from 1 as on the console and in state.json (Keras' CSVLogger counts from 0)."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


class Checkpoint(keras.callbacks.Callback):
    """Each epoch: the training state to a slot file, then state.json (temporary name, rename) naming it; on a
    new best validation accuracy, the trained layers likewise. best.safetensors is written once, at the end."""

    def __init__(self, run: Path, full_model, spec, classes: list[str], trained: list[str]):
        super().__init__()
        self.folder, self.full_model, self.spec, self.classes, self.trained = run / "checkpoints", full_model, spec, classes, trained

    def on_epoch_end(self, epoch, logs=None):
        state = read_state(self.folder)
        write_slot(self.folder, state, "last", checkpoint_arrays(self.model))
        acc = float((logs or {}).get("val_accuracy", -1))
        if acc > state.get("best_val_accuracy", -1):
            write_slot(self.folder, state, "best", trained_tensors(self.model, self.spec, self.trained))
            state["best_val_accuracy"], state["best_epoch"] = acc, epoch + 1
        state["epoch"] = epoch + 1
        atomic_write_text(self.folder / "state.json", json.dumps(state))

    def on_train_end(self, logs=None):
        from zoo.backends.keras import model_tensors
        from zoo.weights import save_weights

        state = read_state(self.folder)
        with np.load(self.folder / state["best"], allow_pickle=False) as best:
            tensors = model_tensors(self.full_model, self.spec) | {k: best[k] for k in best.files}
        save_weights(self.folder / "best.safetensors", self.spec, tensors,
                     {"classes": json.dumps(self.classes), "epoch": str(state["best_epoch"]),
                      "val_accuracy": f"{state['best_val_accuracy']:.6f}"})


def _sample(tensor, most: int = 1 << 16):
    """Every k-th value: the same distribution, at 0.01 s instead of 0.6 s for fc7's 16.8 M (TensorBoard's
    bucketing dominated a cached-features epoch)."""
    flat = tf.reshape(tensor, [-1])
    return flat[:: max(1, int(flat.shape[0]) // most)]


class Histograms(keras.callbacks.Callback):
    """Histograms of the trained weights and of their gradients on a fixed batch: `probe` is (a model of the
    trained layers, its input for that batch, labels). (Keras' TensorBoard callback would histogram every
    weight, frozen ones too: seconds per epoch for AlexNet's fc6.)

    Dropout off (training=False): a training-mode call would draw from the dropout RNGs and make a resumed
    run differ from an uninterrupted one."""

    def __init__(self, run: Path, probe):
        super().__init__()
        self.probe = probe
        self.writer = tf.summary.create_file_writer(str(run / "tensorboard" / "histograms"))

    def on_epoch_end(self, epoch, logs=None):
        probe_model, x, y = self.probe
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, probe_model(x, training=False))
        grads = tape.gradient(loss, probe_model.trainable_variables)
        with self.writer.as_default(step=epoch):
            for var, grad in zip(probe_model.trainable_variables, grads):
                tf.summary.histogram(var.path, _sample(var))
                if grad is not None:
                    tf.summary.histogram(f"{var.path}/gradient", _sample(grad))


class Progress(keras.callbacks.Callback):
    """A bar per epoch (zoo.progress: live on a terminal, periodic lines otherwise), then one line with the
    epoch's loss, accuracy and images/s, all on stderr (stdout is left to --json)."""

    def __init__(self, epochs: int, batch_size: int):
        super().__init__()
        self.epochs, self.batch_size = epochs, batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.seen = time.perf_counter(), 0
        self.bar = bar(self.params.get("steps"), f"  epoch {epoch + 1}/{self.epochs}", "step")

    def on_train_batch_end(self, batch, logs=None):
        self.seen += int(logs.get("size", 0)) if logs and "size" in logs else self.batch_size
        self.trained = time.perf_counter()  # images/s counts training steps, not the validation pass
        self.bar.update()
        self.bar.set_postfix_str(f"loss {(logs or {}).get('loss', 0):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        self.bar.close()
        logs = logs or {}
        rate = self.seen / max(1e-9, self.trained - self.start)
        logs["images_per_second"] = rate
        print(f"  epoch {epoch + 1}/{self.epochs}: loss {logs.get('loss', 0):.4f} acc {logs.get('accuracy', 0):.3f} "
              f"val_loss {logs.get('val_loss', 0):.4f} val_acc {logs.get('val_accuracy', 0):.3f} {rate:.1f} img/s",
              file=sys.stderr, flush=True)


def build_callbacks(plan, full_model, probe) -> list:
    run, cfg = plan.run, plan.cfg
    callbacks = [Position(), StopOnNaN(run, cfg.lr), Progress(cfg.epochs, cfg.batch_size), Metrics(str(run / "metrics.csv"), append=True),
                 keras.callbacks.TensorBoard(str(run / "tensorboard"), histogram_freq=0, write_graph=False),
                 Checkpoint(run, full_model, plan.spec, plan.train.classes, plan.trained)]
    return callbacks + ([Histograms(run, probe)] if probe is not None else [])
