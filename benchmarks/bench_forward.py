"""Forward (inference) speed of the graph families' models against Keras Applications, in one run (issue 12).

    python benchmarks/bench_forward.py [--models resnet50,vgg16,googlenet] [--batch 1,32] [--repeat 5] [--seconds 6]

Ways, each on the same seeded float32 NHWC batch (values of the scale of a preprocessed image):
- `zoo Keras`: the spec's Keras model, zoo.backends.keras.build_model(spec, tensors);
- `Keras Applications`: keras.applications.ResNet50 / VGG16 (weights=None, classifier_activation=None), given
  zoo's tensors where its layers match the spec's weighted layers in shape (by name, else in order);
- `ONNX Runtime`: zoo's ONNX graph (zoo.backends.onnx.onnx_graph + write_onnx) in a CPU session, input `image`.
Both Keras models are called the same way: `tf.function(lambda x: model(x, training=False))` on a tensor
made outside the clock, the result fetched with `.numpy()`; ONNX Runtime: `session.run(["logits"], ...)`.
The tensors are one random initialisation (Keras' initialisers, made once by zoo's builder and saved), so
the ways compute the same logits; the table reports their largest difference from zoo's Keras model.

Every measurement (one way, one model, one batch size) runs in a fresh interpreter; importing TensorFlow or
ONNX Runtime, building the model and two warm-up calls are outside the clock. A measurement is the median
of timed calls (at least 3, and at least --seconds of them); the ways alternate (their order rotates) for
--repeat rounds and each row is the median of its rounds.

The machine may be shared: each measurement starts once the other processes have used under 10% of the CPUs
for 5 s, and one during which they used more than 10% (from /proc/stat, less this process's children) is
run again, up to 7 times (`run_quiet`; bench_finetune.py uses it too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# model: (zoo spec, keras.applications class or None)
MODELS = {"resnet50": ("resnet50@keras", "ResNet50"), "vgg16": ("vgg16@caffe", "VGG16"), "googlenet": ("googlenet@bvlc", None)}
WAYS = {"zoo": "zoo Keras", "app": "Keras Applications", "onnx": "ONNX Runtime (zoo's ONNX)"}


def make_tensors(spec_id: str, path: str) -> None:
    """A random initialisation of `spec_id` by zoo's Keras builder (Keras' initialisers), saved as npz."""
    import keras

    from zoo.backends.keras import build_model, model_tensors
    from zoo.registry import get_spec

    keras.utils.set_random_seed(0)
    spec = get_spec(spec_id)
    np.savez(path, **model_tensors(build_model(spec), spec))


def _into_application(model, spec, tensors) -> bool:
    """Give a Keras Applications model zoo's tensors where its weighted layers match the spec's (by name,
    else in order), shape for shape; False (its own random initialisation kept) where they do not."""
    nodes = spec.weighted_nodes
    names = {layer.name for layer in model.layers}
    if all(n.name in names for n in nodes):
        layers = [model.get_layer(n.name) for n in nodes]
    else:
        layers = [layer for layer in model.layers if layer.weights]
    if len(layers) != len(nodes):
        return False
    arrays = [[tensors[t.name] for t in n.tensors] for n in nodes]
    if any([a.shape for a in arr] != [tuple(w.shape) for w in layer.weights] for layer, arr in zip(layers, arrays)):
        return False
    for layer, arr in zip(layers, arrays):
        layer.set_weights(arr)
    return True


def _batch(spec, n: int) -> np.ndarray:
    h, w, c = spec.input_shape
    return (np.random.default_rng(1).standard_normal((n, h, w, c), dtype=np.float32) * 60).astype(np.float32)


def _timed(run, x, seconds: float) -> float:
    """Images/s: the median of timed calls after two warm-up calls (tracing, first-touch), at least 3 calls
    and at least `seconds` of them."""
    run(x)
    run(x)
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def measure_keras(way: str, spec_id: str, app: str, tensors_path: str, batch: str, seconds: str) -> dict:
    import keras
    import tensorflow as tf

    from zoo.backends.keras import build_model
    from zoo.registry import get_spec

    spec = get_spec(spec_id)
    with np.load(tensors_path) as f:
        tensors = {k: f[k] for k in f.files}
    same = True
    if way == "zoo":
        model = build_model(spec, tensors)
    else:
        model = getattr(keras.applications, app)(weights=None, input_shape=spec.input_shape, classifier_activation=None)
        same = _into_application(model, spec, tensors)
    del tensors
    forward = tf.function(lambda x: model(x, training=False))
    x = _batch(spec, int(batch))
    xt = tf.constant(x)
    rate = _timed(lambda _: forward(xt).numpy(), x, float(seconds))
    return {"rate": rate, "logits": forward(xt).numpy()[:2].tolist(), "same_weights": same}


def measure_onnx(way: str, spec_id: str, app: str, tensors_path: str, batch: str, seconds: str) -> dict:
    import onnxruntime as ort

    from zoo.backends.onnx import onnx_graph, write_onnx
    from zoo.registry import get_spec

    spec = get_spec(spec_id)
    with np.load(tensors_path) as f:
        tensors = {k: f[k] for k in f.files}
    path = str(Path(tensors_path).with_suffix(".onnx"))
    model, inits = onnx_graph(spec, tensors, [str(i) for i in range(spec.num_classes)])
    write_onnx(path, model, inits)
    del tensors, inits
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = _batch(spec, int(batch))
    rate = _timed(lambda v: session.run(["logits"], {"image": v})[0], x, float(seconds))
    return {"rate": rate, "logits": session.run(["logits"], {"image": x})[0][:2].tolist(), "same_weights": True}


MEASURES = {"zoo": measure_keras, "app": measure_keras, "onnx": measure_onnx}


def _cpu_seconds() -> tuple[float, float]:
    """(seconds the machine's CPUs were busy, hypervisor steal included; CPU seconds of this process and its
    waited-for children)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for a in ("ru_utime", "ru_stime"))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), own


def _foreign_share(start: tuple[float, float], wall: float) -> float:
    """The share of the machine's CPUs that other processes used since `start` (a _cpu_seconds())."""
    busy, own = _cpu_seconds()
    return max(0.0, (busy - start[0]) - (own - start[1])) / (wall * os.cpu_count())


def run_quiet(cmd: list[str], limit: float = 0.10, tries: int = 8) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) when other processes leave the CPUs alone: wait until they used under `limit` of
    them for 5 s, run, and run again (up to `tries` in all) if they used more than `limit` meanwhile."""
    for attempt in range(tries):
        waited = time.perf_counter()
        while True:
            start, t = _cpu_seconds(), time.perf_counter()
            time.sleep(5)
            if _foreign_share(start, time.perf_counter() - t) < limit:
                break
        if time.perf_counter() - waited > 6:
            print(f"  (waited {time.perf_counter() - waited:.0f} s for other processes to leave the CPUs)", file=sys.stderr, flush=True)
        start, t = _cpu_seconds(), time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        share = _foreign_share(start, time.perf_counter() - t)
        if share < limit or p.returncode:
            return p
        print(f"  (other processes used {share:.0%} of the CPUs during it: {'again' if attempt + 1 < tries else 'kept'})",
              file=sys.stderr, flush=True)
    return p


def measure(way: str, *args) -> dict:
    """One measurement in a fresh interpreter: no way's threads, caches or memory bill another."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_forward as b; "
            f"print('RESULT', json.dumps(b.MEASURES[{way!r}]({way!r}, *sys.argv[1:])))")
    p = run_quiet([sys.executable, "-c", code, *map(str, args)])
    if p.returncode:
        raise SystemExit(f"{way} {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT"))[7:])


def _difference(a, b) -> float:
    """max |a - b| relative to max |b|."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,vgg16,googlenet", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--batch", default="1,32", help="batch sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=5, help="rounds of alternating measurements (median)")
    ap.add_argument("--seconds", type=float, default=6.0, help="least timed seconds of a measurement")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    batches = [int(b) for b in args.batch.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            spec_id, app = MODELS[name]
            tensors = str(Path(tmp) / f"{name}.npz")
            p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                                f"import bench_forward as b; b.make_tensors(*sys.argv[1:])", spec_id, tensors],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"initialising {spec_id} failed:\n{p.stderr[-3000:]}")
            ways = ["zoo", "onnx"] + (["app"] if app else [])
            for batch in batches:
                runs = {w: [] for w in ways}
                for r in range(args.repeat):
                    for way in ways[r % len(ways):] + ways[:r % len(ways)]:  # rotate the order each round
                        runs[way].append(measure(way, spec_id, app or "", tensors, batch, args.seconds))
                        print(f"  {name} batch {batch} round {r + 1} {WAYS[way]}: {runs[way][-1]['rate']:.2f} images/s",
                              file=sys.stderr, flush=True)
                rates = {w: statistics.median(m["rate"] for m in runs[w]) for w in ways}
                for way in ways:
                    diff = _difference(runs[way][0]["logits"], runs["zoo"][0]["logits"])
                    rows.append((spec_id, batch, WAYS[way], rates[way], [m["rate"] for m in runs[way]],
                                 rates[way] / rates["app"] if app else None, rates[way] / rates["zoo"],
                                 diff if runs[way][0]["same_weights"] else None))

    print(f"\nForward pass, float32 NHWC, images/s: medians of {args.repeat} rounds, each measurement in its own interpreter; "
          "Keras ways called as tf.function(lambda x: model(x, training=False))\n")
    print("| model | batch | way | images/s | rounds | / Keras Applications | / zoo Keras | logits vs zoo Keras (max rel.) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec_id, batch, way, rate, each, vs_app, vs_zoo, diff in rows:
        print(f"| {spec_id} | {batch} | {way} | {rate:.2f} | {', '.join(f'{v:.1f}' for v in each)} | "
              f"{f'**{vs_app:.2f}x**' if vs_app else '-'} | {vs_zoo:.2f}x | {'-' if diff is None else f'{diff:.1e}'} |")


if __name__ == "__main__":
    main()
