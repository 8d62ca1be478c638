"""Benchmark `zoo convert` against the plain way (the format's own loader + safetensors save) in one run.

Each measurement runs in a fresh interpreter so that its peak resident memory (VmHWM) is its own;
runs alternate between the two ways, each after os.sync(), and the median of `--repeat` runs is reported,
with the median of the paired ratios (each zoo run over the baseline run right before it). zoo's and its
plugins' sources are compiled to bytecode first, as `pip install` does: the plugins are imported inside
zoo's clock.

    python benchmarks/bench_convert.py [--repeat 5] [--formats caffe,torch,torch-hub,caffemodel]
    python benchmarks/bench_convert.py --repeat 3 --formats graph [--caffe-full /work/refs/caffe-full] [--sources DIR]

`--formats` takes case names and the groups `alexnet` (the default: the four full-size AlexNet cases of issues
2 and 3) and `graph` (VGG16 and ResNet-50 from every source, issue 12). The graph cases' sources:
- torch-*: torchvision state dicts (names and shapes from tests/data/torchvision/*.npz, seeded weights) saved by
  torch.save; zoo finds vgg16@torchvision / resnet50@torchvision by their names.
- h5-*: Keras Applications models (weights=None, seeded) saved by Keras' own `save_weights("x.weights.h5")`;
  VGG16 converted with --spec vgg16@caffe (the Keras and Caffe VGG16 have the same tensors), ResNet-50 found
  as resnet50@keras. Baseline: h5py reading every dataset (what Keras' own loader reads the file with; Keras
  itself would first have to build the model in TensorFlow) + safetensors.numpy.save_file. `import h5py` is
  outside both clocks (as `import torch` is outside the torch baseline's).
- caffe-vgg16: caffe-tensorflow's .npy ({layer: {"weights", "biases"}}, TensorFlow layout) of vgg16@caffe.
- caffemodel-*: the .caffemodel files written by real Caffe under `--caffe-full` (NET/NET.caffemodel: alexnet, vgg16,
  resnet50, caffenet, googlenet); a case is skipped when its file is absent.
- caffe-caffenet, caffe-resnet50, caffe-googlenet: caffe-tensorflow's .npy made from those files' blobs (a BatchNorm
  with its Scale folded in: mean, variance, scale, offset), as benchmarks/full_size_parity.py makes it.
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
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

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


def zoo_job(source: str, spec: str | None = None, imports: str = "") -> str:
    """`imports`: the third-party library zoo's reader uses (h5py), imported outside the clock as the baseline's is."""
    return JOB.format(imports=f"from zoo.conversion import convert\n{imports}",
                      body=f"convert(src, source={source!r}, output=out, spec={spec!r})")


BASELINES = {
    "caffe": ("np.load(allow_pickle=True) + safetensors.numpy.save_file", JOB.format(imports="", body=(
        "d = np.load(src, allow_pickle=True, encoding='latin1').item()\n"
        "flat = {f'{k}.{n}': np.ascontiguousarray(a) for k, v in d.items() for n, a in v.items()}\n"
        "safetensors.numpy.save_file(flat, out)"))),
    "torch": ("torch.load(weights_only=True) + safetensors.numpy.save_file", JOB.format(imports="import torch", body=(
        "sd = torch.load(src, weights_only=True)\n"
        "safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, out)"))),
    "caffemodel": ("protobuf runtime ParseFromString + numpy + safetensors.numpy.save_file", JOB.format(
        imports=f"sys.path.insert(0, {str(TESTS)!r}); from caffe_proto import PB", body=(
            "net = PB['NetParameter'](); net.ParseFromString(open(src, 'rb').read())\n"
            "flat = {f'{l.name}.{i}': np.array(b.data, np.float32) for l in net.layer for i, b in enumerate(l.blobs)}\n"
            "safetensors.numpy.save_file(flat, out)"))),
    "h5": ("h5py read of every dataset + safetensors.numpy.save_file", JOB.format(imports="import h5py", body=(
        "flat = {}\n"
        "with h5py.File(src, 'r') as f:\n"
        "    f.visititems(lambda name, obj: flat.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)\n"
        "safetensors.numpy.save_file(flat, out)"))),
}


def make_caffe_source(folder: Path, args) -> Path:
    import numpy as np
    from caffe_reference import caffe_tensorflow_layout, caffe_weights

    path = folder / "bvlc_alexnet.npy"
    np.save(path, {k: {"weights": w, "biases": b} for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
    return path


def make_torch_source(folder: Path, args) -> Path:
    """A full-size torchvision AlexNet state dict, saved by torch.save in a separate interpreter."""
    path = folder / "alexnet.pth"
    code = (f"import sys, torch; sys.path.insert(0, {str(TESTS)!r}); from torch_models import TorchvisionAlexNet; "
            f"torch.manual_seed(0); torch.save(TorchvisionAlexNet().state_dict(), {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def make_torch_hub_source(folder: Path, args) -> Path:
    from zoo.weights import file_digest

    path = make_torch_source(folder, args)
    return path.rename(folder / f"alexnet-owt-{file_digest(path)[:8]}.pth")


def make_caffemodel_source(folder: Path, args) -> Path:
    from caffe_proto import write_caffemodel
    from caffe_reference import caffe_weights

    path = folder / "bvlc_alexnet.caffemodel"
    write_caffemodel(path, caffe_weights(), {"conv2": 2, "conv4": 2, "conv5": 2})
    return path


# --- graph families (issue 12) ----------------------------------------------------------------------


def torchvision_source(name: str):
    """torchvision's state dict of `name` (keys and shapes from tests/data/torchvision), seeded, saved by torch.save."""
    def make(folder: Path, args) -> Path:
        path = folder / f"{name}.pth"
        code = (f"import json, sys, torch, numpy as np; from collections import OrderedDict; sys.path.insert(0, {str(TESTS)!r})\n"
                "from seeded import seeded_state\n"
                f"z = np.load({str(TESTS / 'data' / 'torchvision' / f'{name}.npz')!r})\n"
                "shapes = json.loads(str(z['shapes'])); shapes = {k: shapes[k] for k in z['keys'].tolist()}\n"
                "state = seeded_state(shapes, int(z['seed']))\n"
                f"torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()), {str(path)!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        return path
    return make


def keras_source(cls: str, name: str):
    """A Keras Applications model (weights=None, seeded initialisers) saved by Keras' own save_weights."""
    def make(folder: Path, args) -> Path:
        path = folder / f"{name}.weights.h5"
        code = (f"import keras; keras.utils.set_random_seed(0); keras.applications.{cls}(weights=None).save_weights({str(path)!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        return path
    return make


def make_caffe_vgg16_source(folder: Path, args) -> Path:
    """caffe-tensorflow's .npy of VGG16: {layer: {"weights": HWIO / (in, out), "biases": (out,)}}, Caffe's layer names."""
    import numpy as np

    from zoo.registry import get_spec

    path = folder / "vgg16.npy"
    rng = np.random.default_rng(0)
    spec = get_spec("vgg16@caffe")
    layers = {}
    for node in spec.weighted_nodes:
        k, b = node.params["kernel"].shape, node.params["bias"].shape
        layers[node.name] = {"weights": rng.standard_normal(k, np.float32) * np.float32(np.sqrt(2 / np.prod(k[:-1]))),
                             "biases": rng.standard_normal(b, np.float32) * np.float32(0.1)}
    np.save(path, layers)
    return path


def caffe_full_source(name: str):
    """A .caffemodel written by real Caffe, used where it lies; None (skip) when absent."""
    def make(folder: Path, args) -> Path | None:
        path = Path(args.caffe_full) / name / f"{name}.caffemodel"
        return path if path.is_file() else None
    return make


def caffe_full_npy_source(name: str):
    """caffe-tensorflow's .npy of a real Caffe .caffemodel under --caffe-full (its blobs in caffe-tensorflow's layout,
    a BatchNorm with its Scale folded in, as benchmarks/full_size_parity.py makes it); None (skip) when absent."""
    def make(folder: Path, args) -> Path | None:
        from full_size_parity import PUBLISHED, npy_from_caffemodel

        caffemodel = caffe_full_source(name)(folder, args)
        if caffemodel is None:
            return None
        shapes = json.loads((caffemodel.parent / f"{name}_shapes.json").read_text())
        prototxt = TESTS / "data" / "caffe" / "published" / PUBLISHED[name]
        return npy_from_caffemodel(caffemodel, shapes, prototxt, folder / f"{name}.npy")
    return make


CASES = {  # name -> (source maker, baseline, zoo job)
    "caffe": (make_caffe_source, "caffe", zoo_job("caffe")),
    "torch": (make_torch_source, "torch", zoo_job("torch")),
    "caffemodel": (make_caffemodel_source, "caffemodel", zoo_job("caffemodel")),
    # the same state dict under torch hub's name (alexnet-owt-<sha256 prefix>.pth): zoo hashes it to check the name
    "torch-hub": (make_torch_hub_source, "torch", zoo_job("torch")),
    "torch-vgg16": (torchvision_source("vgg16"), "torch", zoo_job("torch")),
    "torch-resnet50": (torchvision_source("resnet50"), "torch", zoo_job("torch")),
    "h5-vgg16": (keras_source("VGG16", "vgg16"), "h5", zoo_job("h5", "vgg16@caffe", imports="import h5py")),
    "h5-resnet50": (keras_source("ResNet50", "resnet50"), "h5", zoo_job("h5", imports="import h5py")),
    "caffe-vgg16": (make_caffe_vgg16_source, "caffe", zoo_job("caffe")),
    "caffemodel-vgg16": (caffe_full_source("vgg16"), "caffemodel", zoo_job("caffemodel")),
    "caffemodel-resnet50": (caffe_full_source("resnet50"), "caffemodel", zoo_job("caffemodel")),
    # the other Caffe nets at full size, from real Caffe's files, by both Caffe paths
    # (CaffeNet's tensors are AlexNet's: its spec is named, as a user names it)
    **{f"caffemodel-{net}": (caffe_full_source(net), "caffemodel", zoo_job("caffemodel", spec))
       for net, spec in (("alexnet", None), ("caffenet", "caffenet@bvlc"), ("googlenet", None))},
    **{f"caffe-{net}": (caffe_full_npy_source(net), "caffe", zoo_job("caffe", spec))
       for net, spec in (("caffenet", "caffenet@bvlc"), ("resnet50", None), ("googlenet", None))},
}
GROUPS = {"alexnet": ["caffe", "torch", "torch-hub", "caffemodel"], "graph": [c for c in CASES if "-" in c and c != "torch-hub"]}


def run(code: str, src: Path, out: Path) -> dict:
    os.sync()  # start each run with no dirty pages pending: the previous run's write-back must not bill this one
    p = subprocess.run([sys.executable, "-c", code, "x", str(src), str(out)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"job failed on {src} (exit {p.returncode}):\n{p.stderr[-4000:]}")
    out.unlink()
    return json.loads(p.stdout.strip().splitlines()[-1])


def source(name: str, folder: Path, keep: Path | None, args) -> Path | None:
    """The case's source file; with --sources, made once into that folder and reused."""
    if keep is None:
        return CASES[name][0](folder, args)
    stamp = keep / f"{name}.source"
    if stamp.is_file() and Path(stamp.read_text()).is_file():
        return Path(stamp.read_text())
    sub = keep / name
    sub.mkdir(parents=True, exist_ok=True)
    path = CASES[name][0](sub, args)
    if path is not None:
        stamp.write_text(str(path))
    return path


def compile_bytecode():
    """Compile zoo's and its plugins' sources first, as `pip install` does: zoo's plugins are imported inside its
    clock, and with PYTHONDONTWRITEBYTECODE set (or a read-only tree) they would be compiled on every run."""
    import compileall

    for folder in ("zoo", "converters", "plugins"):
        compileall.compile_dir(ROOT / folder, quiet=1)


def paired(runs: dict) -> float:
    """The median of each zoo run's time over the baseline run made right before it: drift between rounds cancels."""
    return statistics.median(z["seconds"] / b["seconds"] for z, b in zip(runs["zoo"], runs["baseline"]))


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--formats", default="alexnet", help=f"cases and groups, comma-separated: {', '.join([*GROUPS, *CASES])}")
    ap.add_argument("--caffe-full", default="/work/refs/caffe-full", help="folder with NET/NET.caffemodel written by real Caffe (and NET_shapes.json)")
    ap.add_argument("--sources", type=Path, help="keep the generated source files in this folder and reuse them")
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    args.names = [n for item in args.formats.split(",") for n in GROUPS.get(item, [item])]
    unknown = [n for n in args.names if n not in CASES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)}; known: {', '.join([*GROUPS, *CASES])}")
    return args


def measure_case(name: str, src: Path, tmp: Path, repeat: int) -> dict:
    """`repeat` runs of the baseline and of zoo on `src`, alternating so that drift hits both alike."""
    label, code = BASELINES[CASES[name][1]]
    jobs = {"baseline": code, "zoo": CASES[name][2]}
    results = {"baseline": [], "zoo": []}
    for _ in range(repeat):
        for way in results:
            results[way].append(run(jobs[way], src, tmp / "out.safetensors"))
    print(f"{name}: zoo {[round(r['seconds'], 2) for r in results['zoo']]} s, "
          f"baseline {[round(r['seconds'], 2) for r in results['baseline']]} s", file=sys.stderr, flush=True)
    return {"file_bytes": src.stat().st_size, "baseline": label, "runs": results}


def print_tables(raw: dict, repeat: int) -> None:
    med = {name: {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in case["runs"].items()}
           for name, case in raw.items()}
    print(f"| source | file | way | seconds (median of {repeat}) | peak RSS | peak RSS / file | peak above imports / file |")
    print("|---|---|---|---|---|---|---|")
    for name, case in raw.items():
        size = case["file_bytes"]
        for way, what in (("baseline", case["baseline"]), ("zoo", f"zoo convert {name}")):
            m = med[name][way]
            print(f"| {name} | {size / 1e6:.0f} MB | {what} | {m['seconds']:.2f} | {m['peak_rss'] / 1e6:.0f} MB | "
                  f"{m['peak_rss'] / size:.2f}x | {(m['peak_rss'] - m['rss_after_imports']) / size:.2f}x |")
        print(f"| {name} | | **zoo / baseline time** | **{med[name]['zoo']['seconds'] / med[name]['baseline']['seconds']:.2f}x** "
              f"(paired runs' median {paired(case['runs']):.2f}x) | | | |")
    print()
    print("| case | file | zoo s | baseline s | zoo / baseline | paired | zoo peak / file | baseline peak / file | "
          "zoo above imports / file | baseline above imports / file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, case in raw.items():
        size, z, b = case["file_bytes"], med[name]["zoo"], med[name]["baseline"]
        print(f"| {name} | {size / 1e6:.0f} MB | {z['seconds']:.2f} | {b['seconds']:.2f} | **{z['seconds'] / b['seconds']:.2f}x** | "
              f"{paired(case['runs']):.2f}x | {z['peak_rss'] / size:.2f}x | {b['peak_rss'] / size:.2f}x | "
              f"{(z['peak_rss'] - z['rss_after_imports']) / size:.2f}x | {(b['peak_rss'] - b['rss_after_imports']) / size:.2f}x |")


def main():
    args = parse_args()
    compile_bytecode()
    raw = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.names:
            folder = tmp / name
            folder.mkdir()
            src = source(name, folder, args.sources, args)
            if src is None:
                print(f"skipped {name}: no source file (see --caffe-full)", file=sys.stderr)
                continue
            raw[name] = measure_case(name, src, tmp, args.repeat)
            if args.sources is None:
                for f in folder.iterdir():  # one big source on disk at a time
                    f.unlink()
            if args.json:
                args.json.write_text(json.dumps(raw, indent=1))
    print_tables(raw, args.repeat)

if __name__ == "__main__":
    main()
