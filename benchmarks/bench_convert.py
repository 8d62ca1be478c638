"""Benchmark `zoo convert` against the plain way (the format's own loader + safetensors save) in one run.

Each measurement runs in a fresh interpreter so that its peak resident memory (VmHWM) is its own;
runs alternate between the two ways, each after os.sync(), and the median of `--repeat` runs is reported.

    python benchmarks/bench_convert.py [--repeat 5] [--formats caffe,torch,torch-hub,caffemodel]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Each job prints {"seconds": ..., "rss_after_imports": ..., "peak_rss": ...} (bytes).
JOB = r"""
import json, resource, sys, time  # noqa: E401
which, src, out = sys.argv[1:4]
import numpy as np, safetensors.numpy
{imports}
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
base = rss()
t = time.perf_counter()
{body}
seconds = time.perf_counter() - t
# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across exec
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": seconds, "rss_after_imports": base, "peak_rss": hwm}}))
"""

CASES = {
    "caffe": {
        "baseline_label": "np.load(allow_pickle=True) + safetensors.numpy.save_file",
        "baseline": JOB.format(imports="", body=(
            "d = np.load(src, allow_pickle=True, encoding='latin1').item()\n"
            "flat = {f'{k}.{n}': np.ascontiguousarray(v[n]) for k, v in d.items() for n in ('weights', 'biases')}\n"
            "safetensors.numpy.save_file(flat, out)")),
        "zoo": JOB.format(imports="from zoo.conversion import convert", body="convert(src, source='caffe', output=out)"),
    },
    "torch": {
        "baseline_label": "torch.load(weights_only=True) + safetensors.numpy.save_file",
        "baseline": JOB.format(imports="import torch", body=(
            "sd = torch.load(src, weights_only=True)\n"
            "safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, out)")),
        "zoo": JOB.format(imports="from zoo.conversion import convert", body="convert(src, source='torch', output=out)"),
    },
    "caffemodel": {
        "baseline_label": "protobuf runtime ParseFromString + numpy + safetensors.numpy.save_file",
        "baseline": JOB.format(imports=f"sys.path.insert(0, {str(ROOT / 'tests')!r}); from caffe_proto import PB", body=(
            "net = PB['NetParameter'](); net.ParseFromString(open(src, 'rb').read())\n"
            "flat = {f'{l.name}.{i}': np.array(b.data, np.float32) for l in net.layer for i, b in enumerate(l.blobs)}\n"
            "safetensors.numpy.save_file(flat, out)")),
        "zoo": JOB.format(imports="from zoo.conversion import convert", body="convert(src, source='caffemodel', output=out)"),
    },
}


# the same state dict under torch hub's name (alexnet-owt-<sha256 prefix>.pth): zoo hashes it to check the name
CASES["torch-hub"] = CASES["torch"]


def make_caffe_source(folder: Path) -> Path:
    import numpy as np
    from caffe_reference import caffe_tensorflow_layout, caffe_weights

    path = folder / "bvlc_alexnet.npy"
    np.save(path, {k: {"weights": w, "biases": b} for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
    return path


def make_torch_source(folder: Path) -> Path:
    """A full-size torchvision AlexNet state dict, saved by torch.save in a separate interpreter."""
    path = folder / "alexnet.pth"
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'tests')!r}); from torch_models import TorchvisionAlexNet; "
            f"torch.manual_seed(0); torch.save(TorchvisionAlexNet().state_dict(), {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def make_torch_hub_source(folder: Path) -> Path:
    from zoo.weights import file_digest

    path = make_torch_source(folder)
    return path.rename(folder / f"alexnet-owt-{file_digest(path)[:8]}.pth")


def make_caffemodel_source(folder: Path) -> Path:
    from caffe_proto import write_caffemodel
    from caffe_reference import caffe_weights

    path = folder / "bvlc_alexnet.caffemodel"
    write_caffemodel(path, caffe_weights(), {"conv2": 2, "conv4": 2, "conv5": 2})
    return path


SOURCES = {"caffe": make_caffe_source, "torch": make_torch_source, "torch-hub": make_torch_hub_source,
           "caffemodel": make_caffemodel_source}


def run(code: str, src: Path, out: Path) -> dict:
    os.sync()  # start each run with no dirty pages pending: the previous run's write-back must not bill this one
    p = subprocess.run([sys.executable, "-c", code, "x", str(src), str(out)], capture_output=True, text=True, check=True)
    out.unlink()
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--formats", default=",".join(CASES))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in args.formats.split(","):
            case = CASES[fmt]
            src = SOURCES[fmt](tmp)
            size = src.stat().st_size
            results = {"baseline": [], "zoo": []}
            for _ in range(args.repeat):
                for way in results:  # alternate, so drift hits both alike
                    results[way].append(run(case[way], src, tmp / "out.safetensors"))
            med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in results.items()}
            rows.append((fmt, size, case["baseline_label"], med))
    print(f"| source | file | way | seconds (median of {args.repeat}) | peak RSS | peak RSS / file | peak above imports / file |")
    print("|---|---|---|---|---|---|---|")
    for fmt, size, label, med in rows:
        for way, name in (("baseline", label), ("zoo", f"zoo convert {fmt}")):
            m = med[way]
            print(f"| {fmt} | {size / 1e6:.0f} MB | {name} | {m['seconds']:.2f} | {m['peak_rss'] / 1e6:.0f} MB | "
                  f"{m['peak_rss'] / size:.2f}x | {(m['peak_rss'] - m['rss_after_imports']) / size:.2f}x |")
        print(f"| {fmt} | | **zoo / baseline time** | **{med['zoo']['seconds'] / med['baseline']['seconds']:.2f}x** | | | |")


if __name__ == "__main__":
    main()
