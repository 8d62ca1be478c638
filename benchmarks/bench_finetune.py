"""Fine-tuning throughput on the full alexnet@bvlc, in one run (issue 4):

1. the seed's setting (fc7+fc8 trained, batch 64): the engine (files -> tf.data -> Keras fit with its
   callbacks) vs a plain `keras Model.fit` on the same model and preprocessed in-memory arrays;
2. the same with feature caching over 10 epochs (features computed once, included in the time);
3. all layers trained: the engine vs PyTorch 2.13 CPU training the same architecture (groups, LRN).

    python benchmarks/bench_finetune.py [--images 256]

Images/s of a training epoch are taken after a warm-up epoch. Seeded random weights (not pretrained).
"""

from __future__ import annotations

import argparse
import json
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=240, help="images for the per-epoch measurements")
    ap.add_argument("--cache-images", type=int, default=1000, help="images for the 10-epoch feature-caching run")
    ap.add_argument("--parts", default="1,2,3", help="which measurements: 1 engine vs fit, 2 caching, 3 vs PyTorch")
    args = ap.parse_args()
    import keras
    from caffe_reference import caffe_tensorflow_layout, caffe_weights

    from zoo.conversion import convert
    from zoo.data import eval_dataset, from_folder
    from zoo.example import make_example
    from zoo.finetune import finetune
    from zoo.keras_model import create_model
    from zoo.registry import get_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "w.npy", {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
        weights = convert(tmp / "w.npy").output
        data = make_example(tmp / "data", per_class=args.images * 5 // 8, size=256)  # 80% of it trains
        train, _ = from_folder(data)
        n = len(train)

        parts = set(args.parts.split(","))
        # 1. seed's setting: engine vs plain fit on in-memory arrays
        common = dict(model="alexnet", weights=str(weights), data=str(data), batch_size=64, train=["fc7", "fc8"], seed=0)
        if "1" in parts:
            engine = finetune(out=str(tmp / "run1"), epochs=2, augment=True, **common)  # augmentation on: no caching
            engine_rate = engine.history[-1]["images_per_second"]

        spec = get_spec("alexnet").with_num_classes(2)
        x = np.concatenate([b[0].numpy() for b in eval_dataset(train, spec, 64)])
        y = train.labels
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
                self.rate = n / (self.end - self.start)

        timer = TrainTime()
        model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[timer])  # the second epoch is timed
        plain_rate = timer.rate
        if "1" in parts:
            rows.append(("fc7+fc8, batch 64, augmentation on", "zoo finetune (files, tf.data, callbacks)", engine_rate,
                         "keras Model.fit, in-memory arrays", plain_rate))

        # 2. feature caching, 10 epochs on a larger set, features computed inside the timed run
        if "2" in parts:
            rows.append(cache_row(args, tmp, common, plain_rate))
        # 3. all layers: engine vs PyTorch
        if "3" in parts:
            every = finetune(out=str(tmp / "run3"), epochs=2, augment=True, **(common | {"train": None}))
            every_rate = every.history[-1]["images_per_second"]
            p = subprocess.run([sys.executable, "-c", TORCH_JOB, str(n), "64"], capture_output=True, text=True, check=True)
            torch_rate = json.loads(p.stdout.strip().splitlines()[-1])["images_per_second"]
            rows.append(("all layers, batch 64", "zoo finetune", every_rate, "PyTorch 2.13 CPU, same architecture", torch_rate))

    print(f"\n{n} training images of 227x227 for the per-epoch rows (alexnet@bvlc), 2 CPU cores\n")
    print("| setting | zoo | images/s | baseline | images/s | zoo / baseline |")
    print("|---|---|---|---|---|---|")
    for setting, ours, ours_rate, base, base_rate in rows:
        print(f"| {setting} | {ours} | {ours_rate:.1f} | {base} | {base_rate:.1f} | **{ours_rate / base_rate:.2f}x** |")


def cache_row(args, tmp, common, plain_rate):
    from zoo.data import from_folder
    from zoo.example import make_example
    from zoo.finetune import finetune

    big = make_example(tmp / "big", per_class=args.cache_images // 2, size=256)
    n_big = len(from_folder(big)[0])
    t = time.perf_counter()
    cached = finetune(out=str(tmp / "run2"), epochs=10, augment=False, **(common | {"data": str(big)}))
    cached_rate = 10 * n_big / (time.perf_counter() - t)
    assert cached.cached_features
    return (f"fc7+fc8, batch 64, 10 epochs of {n_big} images, whole run", "zoo finetune --no-augment (cached features)",
            cached_rate, "keras Model.fit, in-memory arrays (per epoch)", plain_rate)


if __name__ == "__main__":
    main()
