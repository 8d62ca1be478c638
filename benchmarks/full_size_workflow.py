"""Every registered version at full size through the whole workflow, once: the recorded run of issue 12.

For each version: a weights file written by the real tool (Caffe's caffemodels made by
tests/references/caffe_reference.py into CAFFE_FOLDER/<net>/<net>.caffemodel; torch.save of torchvision's
seeded state dicts rebuilt by tests/seeded.py; Keras Applications' save_weights), then `zoo convert`,
`zoo finetune` (a new 2-class head on the built-in example images, the head trained, features cached,
exports checked against the Keras model), and `zoo predict` on the ONNX export. Each command runs as its
own process; its wall time and peak memory (its own VmHWM, or its forked reader's) are printed as a table.

    python benchmarks/full_size_workflow.py /work/refs/caffe-full [--versions alexnet@bvlc,resnet50@keras,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# `python -m zoo` that reports its own peak memory on exit: its VmHWM, or its forked reader's (zoo convert:
# zoo.forked) where larger. Not this parent's rusage of it: that carries the parent's peak across exec, and
# this parent holds whole state dicts while it writes them
ZOO = [sys.executable, "-c", "import atexit, resource, runpy, sys; atexit.register(lambda: print('VmHWM', max(int(next("
       "line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))), "
       "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)); sys.argv[0] = 'zoo'; "
       "runpy.run_module('zoo', run_name='__main__')"]
CAFFE = {"alexnet@bvlc": "alexnet", "caffenet@bvlc": "caffenet", "vgg16@caffe": "vgg16", "resnet50@caffe": "resnet50",
         "googlenet@bvlc": "googlenet"}
TORCHVISION = {"alexnet@torchvision": "alexnet", "vgg16@torchvision": "vgg16", "resnet50@torchvision": "resnet50"}
KERAS = {"resnet50@keras": "ResNet50"}


def run(cmd: list) -> tuple[float, int, str]:
    """(seconds, peak memory in bytes, stdout) of one zoo command in its own process; exits on a failure."""
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    peak_kb = int(next(line.split()[1] for line in reversed(proc.stderr.splitlines()) if line.startswith("VmHWM")))
    return seconds, peak_kb * 1024, proc.stdout


def source_file(version: str, caffe_folder: Path, work: Path) -> tuple[str, Path]:
    if version in CAFFE:
        return "caffemodel", caffe_folder / CAFFE[version] / f"{CAFFE[version]}.caffemodel"
    if version in TORCHVISION:
        import torch
        from seeded import seeded_state

        z = np.load(ROOT / "tests" / "data" / "torchvision" / f"{TORCHVISION[version]}.npz")
        state = seeded_state(json.loads(str(z["shapes"])), int(z["seed"]), dict(zip(z["scale_keys"].tolist(), z["scale_values"].tolist())))
        path = work / f"{TORCHVISION[version]}.pth"
        torch.save(OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in state.items()), path)
        return "torch", path
    code = (f"import keras; keras.applications.{KERAS[version]}(weights=None).save_weights({str(work / 'keras.weights.h5')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return "h5", work / "keras.weights.h5"


def workflow(version: str, caffe_folder: Path, data: Path, work: Path) -> dict:
    import zoo

    source, path = source_file(version, caffe_folder, work)
    spec = zoo.get_spec(version)
    weights, out = work / "w.safetensors", work / "run"
    row = {"version": version, "source": source, "file_mb": round(path.stat().st_size / 1e6)}
    row["convert_s"], peak, _ = run(ZOO + ["convert", source, path, "-o", weights, "--spec", version])
    row["convert_peak_x_file"] = round(peak / path.stat().st_size, 2)
    row["finetune_export_s"], peak, log = run(ZOO + ["finetune", version, "--weights", weights, "--data", data, "--head", "2",
                                                     "--epochs", "1", "--batch-size", "16", "--train", spec.head, "--no-augment",
                                                     "--out", out, "--export", "savedmodel,onnx", "--json"])
    row["finetune_export_peak_gb"] = round(peak / 1e9, 2)
    result = json.loads(log[log.index("{"):])
    row["cached_features"] = result["cached_features"]
    photos = sorted((ROOT / "tests" / "data" / "photos").glob("*.jpg"))
    row["predict_s"], _, out_text = run(ZOO + ["predict", out / "exported" / "model.onnx", *photos, "--top", "1"])
    row["predict_lines"] = len(out_text.strip().splitlines())
    for f in (weights, path) if source != "caffemodel" else (weights,):
        f.unlink()
    subprocess.run(["rm", "-rf", str(out)], check=True)
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caffe_folder", type=Path)
    parser.add_argument("--versions", default=",".join([*CAFFE, *TORCHVISION, *KERAS]))
    args = parser.parse_args()
    from zoo.example import make_example

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_example(Path(tmp) / "data", per_class=40, size=64)
        for version in args.versions.split(","):
            rows.append(workflow(version, args.caffe_folder, data, Path(tmp)))
    print("\n| version | source | file MB | convert s | convert peak / file | finetune + export s | its peak GB | cached | predict s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['version']} | {r['source']} | {r['file_mb']} | {r['convert_s']:.1f} | {r['convert_peak_x_file']} | "
              f"{r['finetune_export_s']:.0f} | {r['finetune_export_peak_gb']} | {r['cached_features']} | {r['predict_s']:.1f} |")


if __name__ == "__main__":
    main()
