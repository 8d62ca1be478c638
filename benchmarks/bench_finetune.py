"""Fine-tuning throughput on the full alexnet@bvlc (issue 4) or resnet50@keras (issue 12), in one run:

1. the seed's setting (fc7+fc8 trained, batch 64): the engine (files -> tf.data -> Keras fit with its
   callbacks) vs a plain `keras Model.fit` on the same model and preprocessed in-memory arrays;
2. the same with feature caching over 10 epochs (features computed once, included in the time), against
   the plain fit on the same images, the two measured in turn, --repeat pairs (medians); counted as the
   baseline is (training steps, plus the frozen pass over the training images that caching adds) and as
   the whole run (model build, validation, callbacks and the final weights included);
3. all layers trained: the engine vs PyTorch 2.13 CPU training the same architecture (groups, LRN).

    python benchmarks/bench_finetune.py [--images 240] [--cache-images 1000] [--parts 1,2,3] [--repeat 3]

With `--model resnet50` (resnet50@keras: conv5* and the new 2-class head `predictions` trained, batch 32; parts
1 and 2 only; --repeat also repeats part 1) the baseline is a plain Keras script: keras.applications.ResNet50(
weights=None, include_top=False, pooling="avg") + Dense(2), every layer before conv5 frozen, SGD with momentum
0.9, `fit` on a tf.data pipeline of the same image files (decode, resize the shorter side to 256, random crop
224 and flip, or the center crop without augmentation, keras.applications.resnet50.preprocess_input).

    python benchmarks/bench_finetune.py --model resnet50 [--images 320] [--cache-images 400] [--parts 1,2] [--repeat 3]

Images/s of a training epoch are taken after a warm-up epoch. Seeded random weights (not pretrained).
Each measurement runs in a fresh interpreter; importing TensorFlow is outside every clock. Each starts when
other processes leave the CPUs alone and is run again if they took over 10% of them meanwhile
(bench_forward.run_quiet).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_forward import run_quiet  # noqa: E402

TORCH_JOB = r"""
import sys, time, json, torch
from torch import nn
torch.manual_seed(0)
n, batch = int(sys.argv[1]), int(sys.argv[2])
net = nn.Sequential(
    nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0), nn.MaxPool2d(3, 2),
    nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0), nn.MaxPool2d(3, 2),
    nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(),
    nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
    nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 2))
opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
x = torch.randn(n, 3, 227, 227); y = torch.randint(0, 2, (n,))
loss_fn = nn.CrossEntropyLoss()
def epoch():
    t = time.perf_counter()
    for i in range(0, n, batch):
        opt.zero_grad(); loss_fn(net(x[i:i + batch]), y[i:i + batch]).backward(); opt.step()
    return n / (time.perf_counter() - t)
epoch()
print(json.dumps({"images_per_second": epoch(), "threads": torch.get_num_threads()}))
"""


def plain_fit_rate(weights: str, data: str) -> float:
    """A plain `keras Model.fit` of fc7+fc8 on preprocessed in-memory arrays: images/s of the second epoch."""
    import keras

    from zoo.backends.keras import create_model
    from zoo.data import eval_dataset, from_folder
    from zoo.registry import get_spec

    train, _ = from_folder(data)
    spec = get_spec("alexnet").with_num_classes(2)
    x = np.concatenate([b[0].numpy() for b in eval_dataset(train, spec, 64)])
    model = create_model(None, weights=weights, num_classes=2)
    for layer in model.layers:
        layer.trainable = layer.name in ("fc7", "fc8")
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    timer = train_timer(len(x))
    model.fit(x, train.labels, batch_size=64, epochs=2, verbose=0, callbacks=[timer])  # the second epoch is timed
    return timer.rate


def train_timer(n: int):
    """A callback whose `rate` is the last epoch's images/s over its training steps: the engine's count."""
    import keras

    class TrainTime(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rate = n / (self.end - self.start)

    return TrainTime()


def plain_resnet_rate(data: str, batch_size: str, augment: str) -> float:
    """A plain Keras script: keras.applications.ResNet50 without its top + Dense(2), layers before conv5 frozen,
    fit on a tf.data pipeline of the image files: images/s of the second epoch's training steps."""
    import keras
    import tensorflow as tf

    from zoo.data import from_folder

    train, _ = from_folder(data)  # the engine's split of the same files
    batch_size, augment = int(batch_size), augment == "1"
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    for layer in base.layers:
        layer.trainable = layer.name.startswith("conv5")
    model = keras.Model(base.input, keras.layers.Dense(2, name="predictions")(base.output))
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        image = tf.image.resize(image, tf.cast(tf.round(shape * 256 / tf.reduce_min(shape)), tf.int32))
        if augment:
            image = tf.image.random_flip_left_right(tf.image.random_crop(image, (224, 224, 3)))
        else:
            image = tf.image.resize_with_crop_or_pad(image, 224, 224)
        return keras.applications.resnet50.preprocess_input(image), label

    ds = tf.data.Dataset.from_tensor_slices((train.paths, train.labels)).shuffle(len(train), seed=0)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    timer = train_timer(len(train))
    model.fit(ds, epochs=2, verbose=0, callbacks=[timer])  # the second epoch is timed
    return timer.rate


SETTINGS = {  # zoo finetune's options per --model (batch size: --batch-size)
    "alexnet": dict(model="alexnet", train=["fc7", "fc8"], seed=0),
    "resnet50": dict(model="resnet50@keras", train=["conv5*", "predictions"], head=2, seed=0),
}
BATCH = {"alexnet": 64, "resnet50": 32}


def _engine(weights: str, data: str, out: str, model: str, batch_size: str, **options):
    from zoo.finetune import finetune

    shutil.rmtree(out, ignore_errors=True)  # a measurement run again (bench_forward.run_quiet) starts afresh
    return finetune(weights=weights or None, data=data, out=out, batch_size=int(batch_size), **SETTINGS[model] | options)


def engine_rate(weights: str, data: str, out: str, model: str = "alexnet", batch_size: str = "64") -> float:
    """zoo finetune from files (tf.data, callbacks), augmentation on (so no caching): second epoch's images/s."""
    return _engine(weights, data, out, model, batch_size, epochs=2, augment=True).history[-1]["images_per_second"]


def cached_rates(weights: str, data: str, out: str, model: str = "alexnet", batch_size: str = "64") -> tuple[float, float, float]:
    """10 epochs with cached features: (training images/s counted as for the baseline: the frozen pass over the
    training images plus every epoch's training steps; images/s of the whole run: model build, frozen pass
    over training and validation images, epochs with validation and callbacks, verified weights written;
    the process's peak RSS in GB)."""
    import keras  # noqa: F401  (the interpreter's start-up, as for the baseline)
    import tensorflow  # noqa: F401

    from zoo.data import from_folder

    n = len(from_folder(data)[0])
    t = time.perf_counter()
    result = _engine(weights, data, out, model, batch_size, epochs=10, augment=False)
    whole = time.perf_counter() - t
    assert result.cached_features
    training = result.frozen_pass_seconds + sum(n / h["images_per_second"] for h in result.history)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return 10 * n / training, 10 * n / whole, peak / 1e9


def every_layer_rate(weights: str, data: str, out: str) -> float:
    return _engine(weights, data, out, "alexnet", "64", epochs=2, augment=True, train=None).history[-1]["images_per_second"]


MEASURES = {"plain": plain_fit_rate, "plain_resnet": plain_resnet_rate, "engine": engine_rate, "cached": cached_rates,
            "every": every_layer_rate}


def measure(name: str, *args):
    """One measurement in a fresh interpreter: no part's threads, caches or memory bill another."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_finetune as b; "
            f"r = b.MEASURES[{name!r}](*sys.argv[1:]); print('RATE', *(r if isinstance(r, tuple) else [r]))")
    p = run_quiet([sys.executable, "-c", code, *map(str, args)])  # waits for, and re-runs after, other processes' load
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    for line in p.stdout.splitlines():  # the engine's progress (frozen pass, epochs) to the log
        if line.startswith(("zoo: cached", "  epoch")):
            print(f"  {name}: {line.strip()}", file=sys.stderr, flush=True)
    rates = [float(v) for v in next(line for line in p.stdout.splitlines() if line.startswith("RATE")).split()[1:]]
    print(f"  {name}: {rates}", file=sys.stderr, flush=True)
    return rates[0] if len(rates) == 1 else tuple(rates)


def _listed(runs, i) -> str:
    return ", ".join(f"{r[i]:.1f}" for r in runs)


def engine_part(run, weights, data, tmp: Path) -> list[tuple]:
    """Part 1: zoo's engine against the plain fit, per epoch, augmentation on."""
    if run.resnet:
        runs = [(measure("plain_resnet", data, run.batch, 1), measure("engine", weights, data, tmp / f"run1-{i}", run.model, run.batch))
                for i in range(run.repeat)]
        plain, engine = (statistics.median(x) for x in zip(*runs))
        return [(f"{run.layers}, batch {run.batch}, augmentation on (medians of {run.repeat} pairs; plain {_listed(runs, 0)}; "
                 f"zoo {_listed(runs, 1)})", "zoo finetune (files, tf.data, callbacks)", engine, run.plain_name, plain)]
    plain = measure("plain", weights, data)
    return [(f"{run.layers}, batch {run.batch}, augmentation on", "zoo finetune (files, tf.data, callbacks)",
             measure("engine", weights, data, tmp / "run1"), run.plain_name, plain)]


def caching_part(run, weights, tmp: Path) -> tuple[list[tuple], list[float]]:
    """Part 2: 10 epochs with the frozen part's features cached against the plain fit; the rows and the runs' peaks."""
    from zoo.data import from_folder
    from zoo.example import make_example

    big = make_example(tmp / "big", per_class=run.cache_images // 2, size=256)
    n_big = len(from_folder(big)[0])
    plain = (lambda: measure("plain_resnet", big, run.batch, 0)) if run.resnet else (lambda: measure("plain", weights, big))
    runs = [(plain(), *measure("cached", weights, big, tmp / f"run2-{i}", run.model, run.batch)) for i in range(run.repeat)]
    base, training, whole, _ = (statistics.median(x) for x in zip(*runs))
    every = f"medians of {run.repeat} runs, each with the plain fit run just before it; plain fit {_listed(runs, 0)}"
    rows = [(f"{run.layers}, batch {run.batch}, {n_big} training images, 10 epochs: training steps and the frozen pass over them, "
             f"counted as the baseline counts ({every}; zoo {_listed(runs, 1)})", "zoo finetune --no-augment (cached features)",
             training, f"{run.plain_name}, one epoch's training steps{', center crop' if run.resnet else ''}", base),
            (f"the same runs, whole run: model build, frozen pass over training and validation images, 10 epochs with "
             f"validation and every callback, verified weights written (zoo {_listed(runs, 2)})",
             "zoo finetune --no-augment (cached features)", whole, "the same", base)]
    return rows, [r[3] for r in runs]


def torch_part(weights, data, n: int, tmp: Path) -> list[tuple]:
    """Part 3 (AlexNet): every layer trained, against PyTorch on the same architecture."""
    ours = measure("every", weights, data, tmp / "run3")
    p = subprocess.run([sys.executable, "-c", TORCH_JOB, str(n), "64"], capture_output=True, text=True, check=True)
    torch_rate = json.loads(p.stdout.strip().splitlines()[-1])["images_per_second"]
    return [("all layers, batch 64", "zoo finetune", ours, "PyTorch 2.13 CPU, same architecture", torch_rate)]


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SETTINGS), default="alexnet", help="alexnet@bvlc (issue 4) or resnet50@keras (issue 12)")
    ap.add_argument("--images", type=int, help="training images of the per-epoch measurements (default: alexnet 240, resnet50 320)")
    ap.add_argument("--cache-images", type=int, help="images (80%% train) of the 10-epoch feature-caching run (default: alexnet 1000, "
                    "resnet50 400)")
    ap.add_argument("--batch-size", type=int, help="default: alexnet 64, resnet50 32")
    ap.add_argument("--parts", help="which measurements: 1 engine vs fit, 2 caching, 3 vs PyTorch (alexnet only); default: all")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the 10-epoch caching measurement (median); resnet50: of part 1 too")
    args = ap.parse_args()
    run = argparse.Namespace(model=args.model, resnet=args.model == "resnet50", repeat=args.repeat)
    run.images = args.images or (320 if run.resnet else 240)
    run.cache_images = args.cache_images or (400 if run.resnet else 1000)
    run.batch = args.batch_size or BATCH[args.model]
    run.parts = set((args.parts or ("1,2" if run.resnet else "1,2,3")).split(","))
    if run.resnet and "3" in run.parts:
        ap.error("part 3 (PyTorch) is AlexNet's")
    run.layers = "conv5* + head" if run.resnet else "fc7+fc8"
    run.plain_name = "keras.applications.ResNet50 + Dense, fit on tf.data from files" if run.resnet else "keras Model.fit, in-memory arrays"
    return run


def main():
    from zoo.data import from_folder
    from zoo.example import make_example

    run = parse_args()
    rows, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = ""  # resnet50: seeded random initialisation
        if not run.resnet:
            from caffe_reference import caffe_tensorflow_layout, caffe_weights

            from zoo.conversion import convert

            np.save(tmp / "w.npy", {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
            weights = convert(tmp / "w.npy", spec="alexnet@bvlc").output  # CaffeNet has the same tensors
        data = make_example(tmp / "data", per_class=run.images * 5 // 8, size=256)  # 80% of it trains
        n = len(from_folder(data)[0])
        if "1" in run.parts:
            rows += engine_part(run, weights, data, tmp)
        if "2" in run.parts:
            cached, peaks = caching_part(run, weights, tmp)
            rows += cached
        if "3" in run.parts:
            rows += torch_part(weights, data, n, tmp)

    size, spec = ("224x224", "resnet50@keras, random init") if run.resnet else ("227x227", "alexnet@bvlc")
    print(f"\n{n} training images of {size} for the per-epoch rows ({spec}), 2 CPU cores; each measurement "
          "in its own interpreter\n")
    print("| setting | zoo | images/s | baseline | images/s | zoo / baseline |")
    print("|---|---|---|---|---|---|")
    for setting, ours, ours_rate, base, base_rate in rows:
        print(f"| {setting} | {ours} | {ours_rate:.1f} | {base} | {base_rate:.1f} | **{ours_rate / base_rate:.2f}x** |")
    if peaks:
        print(f"\npeak RSS of the cached runs (VmHWM): {', '.join(f'{p:.2f} GB' for p in peaks)}")


if __name__ == "__main__":
    main()
