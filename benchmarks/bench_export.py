"""Every export format of every family at full size: seconds, peak memory, and what its check measured (issue 15).

    python benchmarks/bench_export.py [--versions alexnet@bvlc,vgg16@caffe,...] [--formats onnx,savedmodel,...]
                                      [--tf2onnx]

For each version: a run made as users make one (`zoo finetune VERSION --weights random --head 2` on the
built-in example images, one epoch, the head trained), then `zoo export RUN --format F --out OUT` for each
format F alone, and `savedmodel,onnx` together, each a fresh process. Wall seconds include the interpreter's
start and imports; peak memory is the command's own VmHWM or its children's, whichever is larger
(full_size_workflow.ZOO); "x model" is over the run's weights.safetensors. The errors are the export's own
check as it reported it on stderr: each float artifact against the Keras model on the seeded check batch
(max |difference| over the logits' scale; this head has 2 classes, so "top-5" is top-2), each int8 one
its top-1 agreement with the float model on the calibration images (the run's training images).
`--tf2onnx` adds the anchor the issue names: tf2onnx.convert.from_keras of the same Keras model.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from full_size_workflow import ZOO  # noqa: E402

VERSIONS = ("alexnet@bvlc", "caffenet@bvlc", "vgg16@caffe", "resnet50@keras", "googlenet@bvlc")
FORMATS = ("onnx", "savedmodel", "savedmodel,onnx", "keras", "tflite", "tflite-int8", "onnx-int8")
FILES = {"onnx": "model.onnx", "keras": "model.keras", "tflite": "model.tflite", "tflite-int8": "model-int8.tflite",
         "onnx-int8": "model-int8.onnx", "savedmodel": "savedmodel"}
MATCHES = re.compile(r"zoo: (.+?) matches the Keras model on (\d+) images: max difference (\S+) of the outputs' scale(?:, (top-\d+ \w+))?")
AGREES = re.compile(r"zoo: (.+?): top-1 agreement with the float model (\S+) on (\d+) images")
TF2ONNX = ("import sys, tensorflow as tf, tf2onnx\nfrom zoo.backends.keras import create_model\n"
           "m = create_model(None, weights=sys.argv[1])\nh, w = m.input_shape[1:3]\n"
           "tf2onnx.convert.from_keras(m, input_signature=(tf.TensorSpec((None, h, w, 3), tf.float32, name='image'),), "
           "opset=17, output_path=sys.argv[2])\n")


def measured(cmd: list) -> tuple[float, float | None, str, int]:
    """(seconds, peak MB, stderr, exit code) of one command in its own process (ZOO's peak line, when it printed one)."""
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VmHWM")]
    return seconds, (peaks[-1] * 1024 / 1e6 if peaks else None), proc.stderr, proc.returncode


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()) / 1e6


def run_for(version: str, data: Path, work: Path) -> Path:
    run = work / "run"
    _, _, err, code = measured(ZOO + ["finetune", version, "--weights", "random", "--head", "2", "--data", data,
                                      "--epochs", "1", "--no-augment", "--seed", "0", "--out", run])
    if code:
        raise SystemExit(f"finetune {version} failed:\n{err[-2000:]}")
    return run


def export_row(version: str, fmt: str, run: Path, work: Path, model_mb: float) -> dict:
    out = work / f"out-{fmt.replace(',', '-')}"
    seconds, peak, err, code = measured(ZOO + ["export", run, "--format", fmt, "--out", out])
    row = {"version": version, "format": fmt, "seconds": seconds, "peak_mb": peak, "x_model": peak / model_mb if peak else None}
    if code:
        return row | {"failed": [line for line in err.strip().splitlines() if not line.startswith("VmHWM")][-1][:200]}
    checks = [f"{m[3]}{', ' + m[4] if m[4] else ''} ({m[1]}, {m[2]} images)" for m in MATCHES.finditer(err)]
    checks += [f"top-1 agreement {m[2]} ({m[1]}, {m[3]} images)" for m in AGREES.finditer(err)]
    sizes = [f"{size_mb(out / FILES[f]):.1f} MB" for f in fmt.split(",")]
    return row | {"checks": "; ".join(checks), "size": ", ".join(sizes)}


def tf2onnx_row(version: str, run: Path, work: Path, model_mb: float) -> dict:
    peak_code = ("import atexit, resource, sys; atexit.register(lambda: print('VmHWM', next(line.split()[1] for line in "
                 "open('/proc/self/status') if line.startswith('VmHWM')), file=sys.stderr))\n")
    seconds, peak, err, code = measured([sys.executable, "-c", peak_code + TF2ONNX, run / "weights.safetensors", work / "t.onnx"])
    row = {"version": version, "format": "tf2onnx (anchor)", "seconds": seconds, "peak_mb": peak,
           "x_model": peak / model_mb if peak else None, "checks": "not checked", "size": ""}
    return row | ({"failed": err.strip().splitlines()[-1][:160]} if code else {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--formats", default=";".join(FORMATS), help="';'-separated export --format values")
    ap.add_argument("--tf2onnx", action="store_true")
    args = ap.parse_args()
    from zoo.example import make_example

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_example(Path(tmp) / "data")
        for version in args.versions.split(","):
            work = Path(tmp) / version.replace("@", "-")
            work.mkdir()
            run = run_for(version, data, work)
            model_mb = size_mb(run / "weights.safetensors")
            print(f"{version}: weights {model_mb:.1f} MB", file=sys.stderr, flush=True)
            for fmt in args.formats.split(";"):
                rows.append(export_row(version, fmt, run, work, model_mb))
                print(rows[-1], file=sys.stderr, flush=True)
            if args.tf2onnx:
                rows.append(tf2onnx_row(version, run, work, model_mb))
            subprocess.run(["rm", "-rf", str(work)])
    print("| version | format | seconds | peak MB | x model | check: max error of the logits' scale, top-k (or int8 top-1 agreement) | size |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_mb']:.0f} | {r['x_model']:.2f}x" if r["peak_mb"] else " | "
        what = f"FAILED: {r['failed']}" if "failed" in r else r["checks"]
        print(f"| {r['version']} | {r['format']} | {r['seconds']:.1f} | {peak} | {what} | {r.get('size', '')} |")


if __name__ == "__main__":
    main()
