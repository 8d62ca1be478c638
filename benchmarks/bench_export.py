"""Export of the full alexnet@bvlc (time, peak memory) and inference speed of the three artifacts (issue 5).

    python benchmarks/bench_export.py [--skip-tf2onnx]

Each export runs in a fresh interpreter; peak memory is its VmHWM. Inference: images/s at batch 1 and
32, median of repeated timed calls after warm-up, in one process.
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

PEAK = ("hwm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print(json.dumps({'seconds': seconds, 'peak': hwm}))\n")

JOBS = {
    "zoo export --format onnx (written from the spec; checker + ONNX Runtime vs Keras)": (
        "import json, sys, time\nfrom zoo.export import export\nt = time.perf_counter()\n"
        "export(sys.argv[1], formats=['onnx'], out=sys.argv[2])\nseconds = time.perf_counter() - t\n" + PEAK),
    "the ONNX step alone (stream-write + onnx.checker + ONNX Runtime session and run; no TensorFlow)": (
        "import json, sys, time\nt = time.perf_counter()\n"
        "import onnx, onnxruntime as ort\nfrom zoo.backends.onnx import onnx_graph, write_onnx\nfrom zoo.export import check_batch, open_source\n"
        "src = open_source(sys.argv[1])\nmodel, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)\n"
        "write_onnx(sys.argv[2] + '/m.onnx', model, inits, release=src.weights.release)\n"
        "onnx.checker.check_model(sys.argv[2] + '/m.onnx', full_check=True)\n"
        "s = ort.InferenceSession(sys.argv[2] + '/m.onnx', providers=['CPUExecutionProvider'])\n"
        "s.run(['logits'], {'image': check_batch(src.spec)})\n"
        "seconds = time.perf_counter() - t\n" + PEAK),
    "import tensorflow, keras and zoo's model builder alone (the runtime the Keras check needs; no model)": (
        "import json, time\nt = time.perf_counter()\nimport tensorflow, keras, zoo.backends.keras  # noqa\n"
        "seconds = time.perf_counter() - t\n" + PEAK),
    "zoo export --format savedmodel (with its check)": (
        "import json, sys, time\nfrom zoo.export import export\nt = time.perf_counter()\n"
        "export(sys.argv[1], formats=['savedmodel'], out=sys.argv[2])\nseconds = time.perf_counter() - t\n" + PEAK),
    "tf2onnx.convert.from_keras (opset 17) of the same Keras model": (
        "import json, sys, time\nimport tensorflow as tf, tf2onnx\nfrom zoo.backends.keras import create_model\n"
        "m = create_model(None, weights=sys.argv[1])\nt = time.perf_counter()\n"
        "spec = (tf.TensorSpec((None, 227, 227, 3), tf.float32, name='image'),)\n"
        "tf2onnx.convert.from_keras(m, input_signature=spec, opset=17, output_path=sys.argv[2] + '/t.onnx')\n"
        "seconds = time.perf_counter() - t\n" + PEAK),
}


def inference(weights: Path, out: Path) -> list[tuple]:
    import onnxruntime as ort
    import tensorflow as tf

    from zoo.backends.keras import create_model
    from zoo.export import check_batch, export
    from zoo.registry import load_weights

    export(weights, out=out)
    spec = load_weights(weights).spec
    model = create_model(None, weights=weights)
    keras_fn = tf.function(lambda x: model(x, training=False))
    sm = tf.saved_model.load(str(out / "savedmodel")).signatures["serving_default"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    runners = {
        "Keras (tf.function)": lambda x: keras_fn(tf.constant(x)).numpy(),
        "SavedModel (serving_default)": lambda x: sm(image=tf.constant(x))["logits"].numpy(),
        "ONNX Runtime (CPU)": lambda x: sess.run(["logits"], {"image": x})[0],
    }
    rows = []
    for batch, repeats in ((1, 20), (32, 5)):
        x = check_batch(spec, n=batch)
        for name, run in runners.items():
            run(x)
            run(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t)
            rows.append((name, batch, batch / statistics.median(times)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tf2onnx", action="store_true")
    args = ap.parse_args()
    from caffe_reference import caffe_tensorflow_layout, caffe_weights

    from zoo.conversion import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "w.npy", {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
        weights = convert(tmp / "w.npy").output
        size = weights.stat().st_size
        export_rows = []
        for label, code in JOBS.items():
            if "tf2onnx" in label and args.skip_tf2onnx:
                continue
            job_out = tmp / f"job{len(export_rows)}"
            job_out.mkdir()
            p = subprocess.run([sys.executable, "-c", code, str(weights), str(job_out)], capture_output=True, text=True)
            if p.returncode != 0:
                export_rows.append((label, None, None, p.stderr.strip().splitlines()[-1][:120]))
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            export_rows.append((label, r["seconds"], r["peak"], ""))
        rows = inference(weights, tmp / "inference")

    print(f"\nalexnet@bvlc, weights file {size / 1e6:.0f} MB\n")
    print("| export | seconds | peak RSS | peak / model size | note |")
    print("|---|---|---|---|---|")
    for label, seconds, peak, note in export_rows:
        if seconds is None:
            print(f"| {label} | failed | | | {note} |")
        else:
            print(f"| {label} | {seconds:.1f} | {peak / 1e9:.2f} GB | {peak / size:.1f}x | {note} |")
    print("\n| runtime | batch | images/s |")
    print("|---|---|---|")
    for name, batch, rate in rows:
        print(f"| {name} | {batch} | {rate:.1f} |")


if __name__ == "__main__":
    main()
