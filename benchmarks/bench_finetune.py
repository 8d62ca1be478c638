"""Fine-tuning throughput on the full alexnet@bvlc, in one run (issue 4):

1. the seed's setting (fc7+fc8 trained, batch 64): the engine (files -> tf.data -> Keras fit with its
   callbacks) vs a plain `keras Model.fit` on the same model and preprocessed in-memory arrays;
2. the same with feature caching over 10 epochs (features computed once, included in the time), against
   the plain fit on the same images, the two measured in turn, --repeat pairs (medians); counted as the
   baseline is (training steps, plus the frozen pass over the training images that caching adds) and as
   the whole run (model build, validation, callbacks and the final weights included);
3. all layers trained: the engine vs PyTorch 2.13 CPU training the same architecture (groups, LRN).

    python benchmarks/bench_finetune.py [--images 240] [--cache-images 1000] [--parts 1,2,3] [--repeat 3]

Images/s of a training epoch are taken after a warm-up epoch. Seeded random weights (not pretrained).
Each measurement runs in a fresh interpreter; importing TensorFlow is outside every clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

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

    class TrainTime(keras.callbacks.Callback):  # the same count as the engine's: training steps of an epoch
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.rate = len(x) / (self.end - self.start)

    timer = TrainTime()
    model.fit(x, train.labels, batch_size=64, epochs=2, verbose=0, callbacks=[timer])  # the second epoch is timed
    return timer.rate


COMMON = dict(model="alexnet", batch_size=64, train=["fc7", "fc8"], seed=0)


def engine_rate(weights: str, data: str, out: str) -> float:
    """zoo finetune from files (tf.data, callbacks), augmentation on (so no caching): second epoch's images/s."""
    from zoo.finetune import finetune

    return finetune(weights=weights, data=data, out=out, epochs=2, augment=True, **COMMON).history[-1]["images_per_second"]


def cached_rates(weights: str, data: str, out: str) -> tuple[float, float]:
    """10 epochs with cached features: (training images/s counted as for the baseline: the frozen pass over the
    training images plus every epoch's training steps; images/s of the whole run: model build, frozen pass
    over training and validation images, epochs with validation and callbacks, verified weights written)."""
    import keras  # noqa: F401  (the interpreter's start-up, as for the baseline)
    import tensorflow  # noqa: F401

    from zoo.data import from_folder
    from zoo.finetune import finetune

    n = len(from_folder(data)[0])
    t = time.perf_counter()
    result = finetune(weights=weights, data=data, out=out, epochs=10, augment=False, **COMMON)
    whole = time.perf_counter() - t
    assert result.cached_features
    training = result.frozen_pass_seconds + sum(n / h["images_per_second"] for h in result.history)
    return 10 * n / training, 10 * n / whole


def every_layer_rate(weights: str, data: str, out: str) -> float:
    from zoo.finetune import finetune

    common = COMMON | {"train": None}
    return finetune(weights=weights, data=data, out=out, epochs=2, augment=True, **common).history[-1]["images_per_second"]


MEASURES = {"plain": plain_fit_rate, "engine": engine_rate, "cached": cached_rates, "every": every_layer_rate}


def measure(name: str, *args):
    """One measurement in a fresh interpreter: no part's threads, caches or memory bill another."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_finetune as b; "
            f"r = b.MEASURES[{name!r}](*sys.argv[1:]); print('RATE', *(r if isinstance(r, tuple) else [r]))")
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rates = [float(v) for v in next(line for line in p.stdout.splitlines() if line.startswith("RATE")).split()[1:]]
    return rates[0] if len(rates) == 1 else tuple(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=240, help="images for the per-epoch measurements")
    ap.add_argument("--cache-images", type=int, default=1000, help="images for the 10-epoch feature-caching run")
    ap.add_argument("--parts", default="1,2,3", help="which measurements: 1 engine vs fit, 2 caching, 3 vs PyTorch")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the 10-epoch caching measurement (median)")
    args = ap.parse_args()
    from caffe_reference import caffe_tensorflow_layout, caffe_weights

    from zoo.conversion import convert
    from zoo.data import from_folder
    from zoo.example import make_example

    rows = []
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "w.npy", {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
        weights = convert(tmp / "w.npy").output
        data = make_example(tmp / "data", per_class=args.images * 5 // 8, size=256)  # 80% of it trains
        n = len(from_folder(data)[0])
        if "1" in parts:
            plain = measure("plain", weights, data)
            rows.append(("fc7+fc8, batch 64, augmentation on", "zoo finetune (files, tf.data, callbacks)",
                         measure("engine", weights, data, tmp / "run1"), "keras Model.fit, in-memory arrays", plain))
        if "2" in parts:
            big = make_example(tmp / "big", per_class=args.cache_images // 2, size=256)
            n_big = len(from_folder(big)[0])
            runs = [(measure("plain", weights, big), *measure("cached", weights, big, tmp / f"run2-{i}")) for i in range(args.repeat)]
            base, training, whole = (statistics.median(x) for x in zip(*runs))

            def listed(i):
                return ", ".join(f"{r[i]:.1f}" for r in runs)

            every = f"medians of {args.repeat} runs, each with the plain fit run just before it; plain fit {listed(0)}"
            rows.append((f"fc7+fc8, batch 64, {n_big} images, 10 epochs: training steps and the frozen pass over them, "
                         f"counted as the baseline counts ({every}; zoo {listed(1)})", "zoo finetune --no-augment (cached features)",
                         training, "keras Model.fit, in-memory arrays, one epoch's training steps", base))
            rows.append((f"the same runs, whole run: model build, frozen pass over training and validation images, 10 epochs with "
                         f"validation and every callback, verified weights written (zoo {listed(2)})",
                         "zoo finetune --no-augment (cached features)", whole, "the same", base))
        if "3" in parts:
            ours = measure("every", weights, data, tmp / "run3")
            p = subprocess.run([sys.executable, "-c", TORCH_JOB, str(n), "64"], capture_output=True, text=True, check=True)
            torch_rate = json.loads(p.stdout.strip().splitlines()[-1])["images_per_second"]
            rows.append(("all layers, batch 64", "zoo finetune", ours, "PyTorch 2.13 CPU, same architecture", torch_rate))

    print(f"\n{n} training images of 227x227 for the per-epoch rows (alexnet@bvlc), 2 CPU cores; each measurement "
          "in its own interpreter\n")
    print("| setting | zoo | images/s | baseline | images/s | zoo / baseline |")
    print("|---|---|---|---|---|---|")
    for setting, ours, ours_rate, base, base_rate in rows:
        print(f"| {setting} | {ours} | {ours_rate:.1f} | {base} | {base_rate:.1f} | **{ours_rate / base_rate:.2f}x** |")


if __name__ == "__main__":
    main()
