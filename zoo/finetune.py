"""The fine-tune engine: any registered spec, layers frozen by name, a new head, Keras fit.

A run folder holds config.json, checkpoints/ (state.json and a last-a/b.npz slot each epoch, a best-a/b.npz
slot on each new best validation accuracy, best.safetensors at the end), metrics.csv, tensorboard/, and at the end
weights.safetensors (verified, the new head included) and classes.txt. Nothing is created before the
inputs are checked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.errors import ZooError
from zoo.graph import INPUT, cut

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
STRATEGIES = ("none", "mirrored", "multiworker")


@dataclass
class FinetuneConfig:
    model: str = "alexnet"
    head: int | None = None  # classes of the new head (default: the data's)
    weights: str | None = None
    data: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    classes: str | None = None  # file with one class name per line
    train: list[str] | None = None  # layers (or globs) to train; the rest are frozen
    freeze: list[str] | None = None  # layers (or globs) to freeze; the rest are trained
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.001
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "constant"
    augment: bool = True
    cache_features: str = "auto"  # auto | on | off
    strategy: str = "none"
    seed: int = 0
    val_fraction: float = 0.2
    out: str = "runs/finetune"
    resume: bool = False


@dataclass
class FinetuneResult:
    run_dir: Path
    weights: Path
    classes: list[str]
    trained_layers: list[str]
    cached_features: bool
    history: list[dict] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    images_per_second: float = 0.0  # median over epochs, training steps only
    frozen_pass_seconds: float = 0.0  # with cached features: the frozen layers' one pass over the training images


def say(message: str):
    print(f"zoo: {message}", flush=True)


# --- inputs -----------------------------------------------------------------------------------------


def load_samples(cfg: FinetuneConfig):
    from zoo import data

    classes = data.read_classes_file(cfg.classes) if cfg.classes else None
    if cfg.train_list or cfg.val_list:
        if not (cfg.train_list and cfg.val_list):
            raise ZooError("give both --train-list and --val-list")
        train = data.from_list(cfg.train_list, classes)
        val = data.from_list(cfg.val_list, classes or train.classes)
        names = classes or [str(i) for i in range(max(len(train.classes), len(val.classes)))]
        train.classes = val.classes = names
    else:
        folder = cfg.data
        if folder is None:
            folder = Path(cfg.out).parent / "zoo-example-data"
            if not folder.is_dir():
                from zoo.example import make_example

                make_example(folder)
            say(f"no --data given: training on the built-in example ({folder}: drawn circles vs squares, generated)")
        train, val = data.from_folder(folder, cfg.val_fraction, cfg.seed)
        if classes:
            if len(classes) != len(train.classes):
                raise ZooError(f"--classes names {len(classes)} classes, the data has {len(train.classes)}", cfg.classes)
            train.classes = val.classes = classes
    n = len(train.classes)
    if n < 2:
        raise ZooError(f"the data has {n} class(es); fine-tuning needs at least 2")
    top = int(max(train.labels.max(), val.labels.max()))
    head = cfg.head or n
    if top >= head:
        raise ZooError(f"label {top} is out of range for a head of {head} classes")
    if head > n:
        raise ZooError(f"--head {head} is larger than the data's {n} classes")
    return train, val, head


def resolve_trainable(layer_names: list[str], weighted: list[str], train, freeze) -> list[str]:
    """The weighted layers to train, from --train or --freeze names/globs; unknown names are errors."""
    if train and freeze:
        raise ZooError("give --train or --freeze, not both")

    def expand(patterns):
        chosen = set()
        for pattern in patterns:
            hits = fnmatch.filter(layer_names, pattern)
            if not hits:
                raise ZooError(f"no layer matches {pattern!r}; layers: {', '.join(layer_names)}")
            chosen.update(hits)
        return chosen

    if train:
        picked = expand(train)
        return [n for n in weighted if n in picked]
    frozen = expand(freeze) if freeze else set()
    return [n for n in weighted if n not in frozen]


# --- training helpers -------------------------------------------------------------------------------


def _optimizer(cfg: FinetuneConfig, steps_per_epoch: int):
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


def _strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _callbacks(run: Path, model, full_model, spec, classes, cfg, probe, trained):
    import keras
    import tensorflow as tf

    from zoo.backends.keras import model_tensors
    from zoo.weights import save_weights

    class Checkpoint(keras.callbacks.Callback):
        """Each epoch: the training state to a slot file, then state.json (temporary name, rename) naming it;
        on a new best validation accuracy, the trained layers likewise. best.safetensors is written once,
        at the end."""

        def on_epoch_end(self, epoch, logs=None):
            ckpt = run / "checkpoints"
            state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() else {}
            _write_slot(ckpt, state, "last", checkpoint_arrays(model))
            acc = float((logs or {}).get("val_accuracy", -1))
            if acc > state.get("best_val_accuracy", -1):
                _write_slot(ckpt, state, "best", trained_tensors(model, spec, trained))
                state["best_val_accuracy"], state["best_epoch"] = acc, epoch + 1
            state["epoch"] = epoch + 1
            _atomic_write_text(ckpt / "state.json", json.dumps(state))

        def on_train_end(self, logs=None):
            import numpy as np

            ckpt = run / "checkpoints"
            state = json.loads((ckpt / "state.json").read_text())
            with np.load(ckpt / state["best"], allow_pickle=False) as best:
                tensors = model_tensors(full_model, spec) | {k: best[k] for k in best.files}
            save_weights(ckpt / "best.safetensors", spec, tensors,
                         {"classes": json.dumps(classes), "epoch": str(state["best_epoch"]),
                          "val_accuracy": f"{state['best_val_accuracy']:.6f}"})

    def _sample(tensor, most: int = 1 << 16):
        # every k-th value: the same distribution, at 0.01 s instead of 0.6 s for fc7's 16.8 M (TensorBoard's
        # bucketing dominated a cached-features epoch)
        flat = tf.reshape(tensor, [-1])
        return flat[:: max(1, int(flat.shape[0]) // most)]

    class Histograms(keras.callbacks.Callback):
        """Histograms of the trained weights and of their gradients on a fixed batch: `probe` is (a model of
        the trained layers, its input for that batch, labels). (Keras' TensorBoard callback would histogram
        every weight, frozen ones too: seconds per epoch for AlexNet's fc6.)

        Dropout off (training=False): a training-mode call would draw from the dropout RNGs and make a
        resumed run differ from an uninterrupted one."""

        def __init__(self):
            super().__init__()
            self.writer = tf.summary.create_file_writer(str(run / "tensorboard" / "histograms"))

        def on_epoch_end(self, epoch, logs=None):
            probe_model, x, y = probe
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
        """A bar with loss, accuracy and images/s on a terminal; one plain line per epoch otherwise."""

        tty = sys.stdout.isatty()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.start, self.seen = epoch, time.perf_counter(), 0

        def on_train_batch_end(self, batch, logs=None):
            self.seen += int(logs.get("size", 0)) if logs and "size" in logs else cfg.batch_size
            self.trained = time.perf_counter()  # images/s counts training steps, not the validation pass
            if self.tty:
                rate = self.seen / max(1e-9, time.perf_counter() - self.start)
                steps = self.params.get("steps") or 0
                filled = int(20 * (batch + 1) / steps) if steps else 0
                print(f"\r  epoch {self.epoch + 1}/{cfg.epochs} [{'=' * filled}{' ' * (20 - filled)}] {batch + 1}/{steps} "
                      f"loss {logs.get('loss', 0):.4f} acc {logs.get('accuracy', 0):.3f} {rate:.1f} img/s", end="", flush=True)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            rate = self.seen / max(1e-9, self.trained - self.start)
            logs["images_per_second"] = rate
            print(("\r" if self.tty else "") + f"  epoch {epoch + 1}/{cfg.epochs}: loss {logs.get('loss', 0):.4f} "
                  f"acc {logs.get('accuracy', 0):.3f} val_loss {logs.get('val_loss', 0):.4f} val_acc {logs.get('val_accuracy', 0):.3f} "
                  f"{rate:.1f} img/s", flush=True)

    callbacks = [
        Progress(),
        keras.callbacks.CSVLogger(str(run / "metrics.csv"), append=True),
        keras.callbacks.TensorBoard(str(run / "tensorboard"), histogram_freq=0, write_graph=False),
        Checkpoint(),
    ]
    if probe is not None:
        callbacks.append(Histograms())
    return callbacks


def _changing(model) -> list:
    """The variables training changes: those of trainable layers, and the dropout RNG states. Frozen
    weights are not saved each epoch; they come from the run's --weights again on resume."""
    return [v for layer in model.layers if layer.trainable for v in layer.variables] + \
           [v for v in model.variables if "seed_generator" in v.path]


def _write_slot(folder: Path, state: dict, key: str, arrays: dict):
    """Write `arrays` as a plain npz (no pickle) to whichever of <key>-a.npz / <key>-b.npz `state[key]` does not
    name, and name it there: the state file, renamed into place after, only ever names a complete slot.
    The slot is overwritten in place: on this machine writing into fresh page-cache pages (a new file each
    epoch) took 0.14-0.36 s for fc7+fc8 and their momentum (134 MB), rewriting the same pages 0.03 s."""
    import numpy as np

    name = f"{key}-b.npz" if state.get(key) == f"{key}-a.npz" else f"{key}-a.npz"
    path = folder / name
    with open(path, "r+b" if path.exists() else "wb") as f:
        np.savez(f, **arrays)
        f.truncate()
    state[key] = name


def checkpoint_arrays(model) -> dict:
    """The changing model variables and every optimizer variable (momentum, step), in order."""
    arrays = {f"model_{i}": v.numpy() for i, v in enumerate(_changing(model))}
    return arrays | {f"optimizer_{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)}


def restore_checkpoint(model, path: Path):
    """The inverse of checkpoint_arrays, into a model built and compiled the same way."""
    import numpy as np

    model.optimizer.build(model.trainable_variables)
    with np.load(path, allow_pickle=False) as saved:
        for prefix, variables in (("model", _changing(model)), ("optimizer", model.optimizer.variables)):
            if sum(k.startswith(prefix + "_") for k in saved.files) != len(variables):
                raise ZooError("checkpoint does not match the model (was the run's config changed?)", path)
            for i, v in enumerate(variables):
                v.assign(saved[f"{prefix}_{i}"])


def trained_tensors(model, spec, trained: list[str]) -> dict:
    """The trained layers' weights under their canonical names, batch-norm statistics included."""
    out = {}
    for name in trained:
        variables = {v.name: v for v in model.get_layer(name).variables}
        out |= {t.name: variables[t.param].numpy() for t in spec.node(name).tensors}
    return out


def _features(base, samples, spec, batch_size: int, chunk_images: int = 512):
    """The frozen base's output for `samples`, computed once, by chunks whose images are all decoded (tf.data,
    every core) before the forward pass over them starts. Decoding beside the pass stalls oneDNN's
    convolutions, which wait for their slowest thread: for 1,000 AlexNet images on 2 cores the overlapped
    pass took 39-48 s, decode plus pass alone 4-6 s plus 22-26 s. A tf.function loop: 35 images/s up to fc6
    here, where Model.predict managed 23."""
    import numpy as np
    import tensorflow as tf

    from zoo.data import Samples, eval_dataset

    forward = tf.function(lambda x: base(x, training=False), reduce_retracing=True)
    step = max(1, chunk_images // batch_size) * batch_size  # whole batches, as one dataset would make them
    out = []
    for i in range(0, len(samples), step):
        part = Samples(samples.paths[i:i + step], samples.labels[i:i + step], samples.classes)
        images = [x for x, _ in eval_dataset(part, spec, batch_size)]
        out += [forward(x).numpy() for x in images]
    return np.concatenate(out)


def _split_at(model, spec, first_trained: str):
    """(frozen base, trainable top) sharing the layers of `model`, split where zoo.graph.cut says."""
    import keras

    from zoo.backends.keras import call_layers

    at, start = cut(spec.nodes, first_trained)
    base = keras.Model(model.input, model.get_layer(at).output, name="frozen_base")
    inputs = keras.Input(shape=spec.node(at).output_shape, name="features")
    rest = spec.nodes[start:]
    tensors = call_layers(rest, {n.name: model.get_layer(n.name) for n in rest}, {at: inputs})
    return base, keras.Model(inputs, tensors[rest[-1].name], name="trained_top")


# --- the engine -------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig | None = None, **overrides) -> FinetuneResult:
    cfg = config or FinetuneConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown option {key!r}")
        setattr(cfg, key, value)
    run = Path(cfg.out)
    if cfg.resume:
        saved = run / "config.json"
        if not saved.exists():
            raise ZooError("nothing to resume: no config.json", run)
        # the saved settings, so the schedule and data order go on as planned; only more epochs may be asked for
        more = {"epochs": overrides["epochs"]} if "epochs" in overrides else {}
        cfg = FinetuneConfig(**(json.loads(saved.read_text()) | {"resume": True} | more))
    for name, value, allowed in (("optimizer", cfg.optimizer, OPTIMIZERS), ("schedule", cfg.schedule, SCHEDULES),
                                 ("strategy", cfg.strategy, STRATEGIES), ("cache-features", cfg.cache_features, ("auto", "on", "off"))):
        if value not in allowed:
            raise ZooError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ZooError("--epochs and --batch-size must be positive, --lr above 0")

    # --- check everything before the run folder exists
    from zoo.registry import load_weights, resolve_spec

    weights = load_weights(cfg.weights) if cfg.weights else None
    base_spec = resolve_spec(cfg.model, weights)
    train, val, head = load_samples(cfg)
    spec = base_spec.with_num_classes(head)
    trained = resolve_trainable(spec.layer_names, [i.name for i in spec.weighted_nodes], cfg.train, cfg.freeze)
    if not trained:
        raise ZooError("every weighted layer is frozen: nothing to train")
    if spec.head not in trained and head != base_spec.num_classes:
        raise ZooError(f"the new head {spec.head} must be trained (it is freshly initialised)")
    first = spec.layer_names.index(trained[0])
    split = cut(spec.nodes, trained[0])
    frozen_prefix = split is not None and split[0] != INPUT and \
        all(n.name in trained for n in spec.weighted_nodes if spec.layer_names.index(n.name) >= first)
    if cfg.cache_features == "on" and not frozen_prefix:
        raise ZooError("--cache-features on needs every weighted layer after the first trained one to be trained, and the "
                       "frozen layers to meet the trained ones in one tensor")
    if cfg.cache_features == "on" and cfg.augment:
        say("feature caching with augmentation on: crops and flips are NOT applied (features are computed once, center crop)")
    cache = cfg.cache_features == "on" or (cfg.cache_features == "auto" and frozen_prefix and not cfg.augment)
    if cfg.cache_features == "auto" and frozen_prefix and cfg.augment:
        say("feature caching is off because augmentation is on (random crops and flips change the frozen layers' output); "
            "--no-augment turns it on")
    if weights is None:
        say(f"no --weights: starting {spec.id} from RANDOM initialisation, not pretrained weights. "
            f"Convert real weights with `zoo convert caffe bvlc_alexnet.npy` (or torch/h5) and pass --weights.")
    state = {}
    if cfg.resume:
        state_file = run / "checkpoints" / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        if state.get("epoch", 0) >= cfg.epochs:
            raise ZooError(f"the run already finished {state['epoch']} epochs; pass more --epochs to go on", run)
    elif run.exists() and any(run.iterdir()):
        raise ZooError("run folder exists and is not empty; use --resume or another --out", run)

    # --- build
    import keras
    import numpy as np
    import tensorflow as tf

    from zoo.backends.keras import create_model, model_tensors
    from zoo.data import batch_per_epoch, epochs_dataset, eval_dataset, untuned
    from zoo.weights import save_weights

    keras.utils.set_random_seed(cfg.seed)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        _atomic_write_text(run / "config.json", json.dumps(asdict(cfg), indent=2))
    strategy = _strategy(cfg.strategy)
    first_epoch = state.get("epoch", 0)
    with strategy.scope():
        full = create_model(None if weights else base_spec, weights=weights, num_classes=head)
        for layer in full.layers:
            layer.trainable = layer.name in trained or not layer.weights
        base, model = _split_at(full, spec, trained[0]) if cache else (None, full)
        steps_per_epoch = -(-len(train) // cfg.batch_size)
        model.compile(optimizer=_optimizer(cfg, steps_per_epoch),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        if first_epoch:
            restore_checkpoint(model, run / "checkpoints" / state["last"])
            say(f"resumed {run} after epoch {first_epoch}")

    say(f"fine-tuning {spec.id} -> {head} classes ({', '.join(train.classes)}); training {', '.join(trained)}; "
        f"{len(train)} train / {len(val)} val images; {'cached features' if cache else 'full forward'}; run folder {run}")
    frozen_pass_seconds = 0.0
    if cache:
        t = time.perf_counter()
        train_x = _features(base, train, spec, cfg.batch_size)
        frozen_pass_seconds = time.perf_counter() - t
        val_x = _features(base, val, spec, cfg.batch_size)
        say(f"cached {trained[0]}'s inputs: {len(train)} training images in {frozen_pass_seconds:.1f}s, "
            f"{len(val)} validation in {time.perf_counter() - t - frozen_pass_seconds:.1f}s")
        order = np.concatenate([np.random.default_rng([cfg.seed, e]).permutation(len(train)) for e in range(first_epoch, cfg.epochs)])
        features = tf.constant(train_x)  # batches gather from one copy, not an epochs-long one
        train_ds = batch_per_epoch(tf.data.Dataset.from_tensor_slices((order, train.labels[order])), len(train), cfg.batch_size)
        train_ds = untuned(train_ds.map(lambda i, y: (tf.gather(features, i), y)))
        val_ds = untuned(tf.data.Dataset.from_tensor_slices((val_x, val.labels)).batch(cfg.batch_size))
    else:
        train_ds, _ = epochs_dataset(train, spec, cfg.batch_size, first_epoch, cfg.epochs, cfg.seed, cfg.augment)
        val_ds = eval_dataset(val, spec, cfg.batch_size)
    probe = None  # the histograms' fixed batch; distributed: per-replica gradients on a host batch do not apply
    if cfg.strategy == "none":
        if cache:  # the trained top and its cached input
            probe = (model, train_x[: cfg.batch_size], train.labels[: cfg.batch_size])
        else:
            x, y = next(iter(eval_dataset(train, spec, cfg.batch_size)))
            probe = (model, x, y)
            if frozen_prefix:  # the frozen layers' output for it, once (7 s an epoch for AlexNet's fc7+fc8)
                probe_base, probe_model = _split_at(full, spec, trained[0])
                probe = (probe_model, probe_base(x, training=False), y)
    hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, initial_epoch=first_epoch,
                     steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False,  # the datasets order themselves
                     callbacks=_callbacks(run, model, full, spec, train.classes, cfg, probe, trained))
    history = [{k: float(v[i]) for k, v in hist.history.items()} for i in range(len(hist.epoch))]

    # --- results: verified weights with the new head, class names
    meta = {"base_spec": base_spec.id, "classes": json.dumps(train.classes), "trained_layers": json.dumps(trained),
            "training": json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("out", "resume")}),
            "base_weights_sha256": weights.metadata.get("source_sha256", "") if weights else "random-init"}
    out = save_weights(run / "weights.safetensors", spec, model_tensors(full, spec), meta)
    _atomic_write_text(run / "classes.txt", "\n".join(train.classes) + "\n")
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    rates = [h.get("images_per_second", 0) for h in history]
    say(f"done: best val accuracy {state.get('best_val_accuracy', 0):.3f} (epoch {state.get('best_epoch')}); weights {out}")
    return FinetuneResult(run, out, train.classes, trained, cache, history, state.get("best_val_accuracy", 0.0),
                          float(np.median(rates)) if rates else 0.0, frozen_pass_seconds)

