"""Inference speed of every registered network in every runtime zoo runs it in, beside the peers, in one run
(issue 18; it replaced issue 12's ResNet-50/VGG16/GoogLeNet comparison).

    python benchmarks/bench_forward.py [--specs all] [--batch 1,32] [--repeat 3] [--seconds 2] [--calls 3]
                                       [--torch-python /work/tvenv/bin/python] [--exporter legacy|dynamo] [--json out.json]

Each network gets seeded weights (zoo.bench.seeded_tensors) in a weights file, exported by `zoo export
--format onnx,savedmodel` as a user would; zoo's three runtimes are then measured by zoo.bench.measure, the
measurement `zoo bench` makes (a fresh interpreter; imports, loading and two warm-up calls outside the
clock; at least --calls timed calls and --seconds of them; images/s = batch / median call):

- `keras`: zoo's Keras model (zoo.backends.keras.build_model) as `tf.function(lambda x: model(x, training=False))`;
- `savedmodel`: the exported SavedModel's `serving_default`;
- `onnx`: the exported model.onnx in ONNX Runtime, with zoo's session options (zoo.backends.onnx.session_options).

The peers, measured the same way, by the same zoo.bench.measure, in the same run:

- `torch.onnx` (the @torchvision versions): torchvision's model (seeded random init, `weights=None`), exported
  by `torch.onnx.export` (TorchScript exporter, opset 17, or `--exporter dynamo`: the other one is tried if
  one fails) in the interpreter given by --torch-python, then run in zoo's own ONNX Runtime with zoo's
  session options (same threads, same batch; its input NCHW, transposed outside the clock);
- `keras.applications` (the resnet50 and vgg16 families): keras.applications.ResNet50 / VGG16
  (weights=None, classifier_activation=None), called exactly as zoo's Keras model is.

The ways of one family alternate, their order rotating each of --repeat rounds. A ratio zoo / peer is the
median over the rounds of the two ways' ratio within the round; images/s the median over the rounds.
The limit is zoo.bench's: the network's multiply-accumulates (each layer kind's `macs`) against the CPUs'
nominal float32 peak (zoo.bench.peak_flops); beside it, what ONNX Runtime's own SGEMM (MLAS, MatMul
2048x2048x2048) reaches on this machine in the same run, measured by the same function.

"others' CPU" is the most that other processes used of the CPUs during any of a row's measurements (its peers'
included). The machine may be shared: each measurement starts once the other processes have used under 10% of the CPUs
for 2 s (at most --patience seconds of waiting), and one during which they used more than 10% (from
/proc/stat, less this process's children) is run again, up to 4 times in all (`run_quiet`;
bench_finetune.py uses it too, with its own defaults).
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

ROOT = Path(__file__).resolve().parents[1]

KERAS_APPLICATIONS = {"resnet50": "ResNet50", "vgg16": "VGG16"}  # family -> keras.applications model
TORCHVISION = {"alexnet@torchvision": "alexnet", "resnet50@torchvision": "resnet50", "vgg16@torchvision": "vgg16"}
RUNTIMES = ("keras", "savedmodel", "onnx")
SGEMM_N = 2048

TORCH_EXPORT = r"""
import sys, types
# PyPI's torchvision beside the CPU build of torch cannot load its C++ ops ("operator torchvision::nms does
# not exist" while registering their meta kernels); its classification models use none of them
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import torch, torchvision
name, path, exporter, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
model = getattr(torchvision.models, name)(weights=None).eval()
x = torch.randn(1, 3, size, size)
if exporter == "dynamo":
    torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["logits"], opset_version=18,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
else:
    torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
print("VERSIONS", torch.__version__, torchvision.__version__, flush=True)
"""


# --- the peers' forwards, built in zoo.bench's measuring process (zoo.bench.make_job(builder=...)) --------


def keras_application(job, spec):
    """keras.applications' model with its own random initialisation, called as zoo.bench calls zoo's Keras model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, job["application"])(weights=None, input_shape=tuple(spec.input_shape),
                                                            classifier_activation=None)
    forward = tf.function(lambda x: model(x, training=False))
    return lambda x: forward(tf.constant(x)).numpy()


def sgemm(job, spec):
    """ONNX Runtime's MatMul of two SGEMM_N-square float32 matrices in zoo's session: the best case of its
    arithmetic on this machine (the batch is ignored)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from zoo.backends.onnx import session_options

    n = SGEMM_N
    b = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda _: session.run(["c"], {"a": a})


# --- quiet CPUs ---------------------------------------------------------------------------------------


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


def run_quiet(cmd: list[str], limit: float = 0.10, tries: int = 8, settle: float = 5.0, patience: float | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs) when other processes leave the CPUs alone:
    wait until they used under `limit` of them for `settle` s (giving up the wait after `patience` s, if
    given), run, and run again (up to `tries` in all) if they used more than `limit` meanwhile. The result's
    `foreign_share` is what they used during the run kept."""
    for attempt in range(tries):
        waited = time.perf_counter()
        while True:
            start, t = _cpu_seconds(), time.perf_counter()
            time.sleep(settle)
            if _foreign_share(start, time.perf_counter() - t) < limit:
                break
            if patience is not None and time.perf_counter() - waited > patience:
                break
        if time.perf_counter() - waited > settle + 1:
            print(f"  (waited {time.perf_counter() - waited:.0f} s for other processes to leave the CPUs)", file=sys.stderr, flush=True)
        start, t = _cpu_seconds(), time.perf_counter()
        p = subprocess.run(cmd, **({"capture_output": True, "text": True} | kwargs))
        share = _foreign_share(start, time.perf_counter() - t)
        p.foreign_share = share
        if share < limit or p.returncode:
            return p
        print(f"  (other processes used {share:.0%} of the CPUs during it: {'again' if attempt + 1 < tries else 'kept'})",
              file=sys.stderr, flush=True)
    return p


# --- the run ------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(spec_id: str, folder: Path, args) -> dict:
    """The spec's seeded weights exported by zoo, its peers' files: {way: zoo.bench job template}."""
    from zoo.bench import make_job, seeded_tensors, spec_json, target
    from zoo.registry import get_spec
    from zoo.weights import save_weights

    spec = get_spec(spec_id)
    folder.mkdir(parents=True)
    spec_file = spec_json(spec, folder)
    save_weights(folder / "weights.safetensors", spec, seeded_tensors(spec))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "zoo", "export", str(folder / "weights.safetensors"), "--format", "onnx,savedmodel",
                        "--out", str(folder / "exported")], capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if p.returncode:
        raise SystemExit(f"zoo export of {spec_id} failed:\n{p.stderr[-3000:]}")
    _log(f"  {spec_id}: exported in {time.perf_counter() - t:.0f} s")
    found = target(str(folder))
    ways = {runtime: make_job(runtime, 0, spec_file, args.seconds, found, min_calls=args.calls) for runtime in RUNTIMES}
    if spec_id in TORCHVISION and args.torch_python:
        path, exporter, versions = export_torchvision(spec, folder, args)
        ways["torch.onnx"] = make_job("torch.onnx", 0, spec_file, args.seconds, onnx=str(path), min_calls=args.calls, layout="NCHW",
                                      builder="zoo.bench:_onnx", exporter=exporter, versions=versions)
    return ways


def export_torchvision(spec, folder: Path, args) -> tuple[Path, str, str]:
    """torchvision's model exported by torch.onnx in --torch-python: (file, exporter used, versions)."""
    path = folder / "torchvision.onnx"
    tried = []
    for exporter in (args.exporter, "dynamo" if args.exporter == "legacy" else "legacy"):
        p = subprocess.run([args.torch_python, "-c", TORCH_EXPORT, TORCHVISION[spec.id], str(path), exporter, str(spec.input_shape[0])],
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("VERSIONS ")), None)
        if p.returncode == 0 and line:
            torch_version, torchvision_version = line.split()[1:]
            return path, exporter, f"torch {torch_version}, torchvision {torchvision_version}"
        tried.append(f"{exporter}: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
        _log(f"  torch.onnx.export ({exporter}) of {spec.id} failed: {tried[-1]}")
    raise SystemExit(f"torch.onnx.export of {spec.id} failed both ways: {'; '.join(tried)}")


def application_job(family: str, spec_id: str, folder: Path, args) -> dict:
    from zoo.bench import make_job, spec_json
    from zoo.registry import get_spec

    folder.mkdir(parents=True, exist_ok=True)
    spec_file = spec_json(get_spec(spec_id), folder)
    return make_job("keras.applications", 0, spec_file, args.seconds, min_calls=args.calls, builder="bench_forward:keras_application",
                    path=[str(ROOT / "benchmarks")], application=KERAS_APPLICATIONS[family])


def measure(job: dict, batch: int, limit: float, args) -> dict:
    """zoo.bench.measure of `job` at `batch`, started when the CPUs are quiet; with the share of the CPUs
    other processes used meanwhile."""
    from zoo.bench import measure as zoo_measure

    seen = {}

    def quiet(cmd, **kw):
        p = run_quiet(cmd, tries=args.tries, settle=2.0, patience=args.patience, **kw)
        seen["foreign"] = p.foreign_share
        return p

    row = zoo_measure(dict(job, batch=batch, warmup=1 if batch >= 16 else 2), limit, run=quiet)
    return {"images_per_second": row.images_per_second, "latency_ms": row.latency_ms, "calls": row.calls,
            "peak_memory_mb": row.peak_memory_mb, "others_cpu_share": seen["foreign"]}


FMA_PEAK = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(void) {  /* 12 independent chains of AVX-512 FMAs: the core's float32 peak, per second of its own CPU time */
  long n = 100000000;
  __m512 a[12], m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps(i);
  double t = now();
  for (long k = 0; k < n; k++)
    for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], m, c);
  t = now() - t;
  float s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(a[i]);
  printf("%f %g\n", n * 12.0 * 32 / t / 1e9, s);
  return 0;
}
"""


def fma_peak(folder: Path) -> float | None:
    """One core's measured AVX-512 FMA rate (GFLOP/s of its own CPU time; gcc and AVX-512 needed), None without."""
    source, binary = folder / "fma_peak.c", folder / "fma_peak"
    source.write_text(FMA_PEAK)
    try:
        subprocess.run(["gcc", "-O3", "-funroll-all-loops", "-mavx512f", "-mfma", "-o", str(binary), str(source)], check=True,
                       capture_output=True)
        return float(subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def parse_args():
    """The options, and what they select: (args, spec ids, batch sizes, {family: its spec ids})."""
    from zoo.registry import all_specs

    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="all", help="comma-separated spec ids or families (default: every registered spec)")
    ap.add_argument("--batch", default="1,32", help="batch sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of alternating measurements (median)")
    ap.add_argument("--seconds", type=float, default=2.0, help="least timed seconds of a measurement")
    ap.add_argument("--calls", type=int, default=3, help="least timed calls of a measurement")
    ap.add_argument("--torch-python", default="/work/tvenv/bin/python", help="an interpreter with torch and torchvision ('' to skip)")
    ap.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy", help="torch.onnx.export's exporter tried first")
    ap.add_argument("--patience", type=float, default=30.0, help="most seconds to wait for quiet CPUs before a measurement")
    ap.add_argument("--tries", type=int, default=4, help="runs of a measurement other processes disturbed, at most")
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    registered = sorted(all_specs())
    wanted = registered if args.specs == "all" else [s for name in args.specs.split(",")
                                                     for s in ([name] if "@" in name else [r for r in registered if r.startswith(name + "@")])]
    unknown = [s for s in wanted if s not in registered]
    if unknown or not wanted:
        ap.error(f"unknown spec(s) {', '.join(unknown) or args.specs}; registered: {', '.join(registered)}")
    families: dict[str, list[str]] = {}
    for s in wanted:
        families.setdefault(s.split("@")[0], []).append(s)
    return args, wanted, [int(b) for b in args.batch.split(",")], families


def family_ways(family: str, specs: list[str], tmp: Path, args, exporters: dict) -> dict:
    """{(spec id or family, way): job} of every way a family's versions and its peers run; torch.onnx's exporter
    noted in `exporters`."""
    ways = {}
    for spec_id in specs:
        for way, job in prepare(spec_id, tmp / spec_id.replace("@", "_"), args).items():
            ways[(spec_id, way)] = job
            if way == "torch.onnx":
                exporters[spec_id] = f"{job['exporter']} ({job['versions']})"
    if family in KERAS_APPLICATIONS:
        ways[(family, "keras.applications")] = application_job(family, specs[0], tmp / f"{family}_app", args)
    return ways


def measure_rounds(ways: dict, specs: list[str], batch: int, args, rounds: dict, started: float) -> None:
    """`args.repeat` rounds of every way at `batch`, the order rotated each round, into rounds[(*way, batch)]."""
    from zoo.bench import limit_of
    from zoo.registry import get_spec

    order = list(ways)
    for r in range(args.repeat):
        for key in order[r % len(order):] + order[:r % len(order)]:
            spec_id = key[0] if "@" in key[0] else specs[0]
            m = measure(ways[key], batch, limit_of(get_spec(spec_id))[0], args)
            rounds.setdefault((*key, batch), []).append(m)
            _log(f"  {key[0]} {key[1]} batch {batch} round {r + 1}: {m['images_per_second']:.2f} images/s "
                 f"({m['calls']} calls, {time.perf_counter() - started:.0f} s in)")


def main():
    from zoo.bench import limit_of, macs, peak_flops
    from zoo.registry import get_spec

    args, wanted, batches, families = parse_args()
    started = time.perf_counter()
    flops, how = peak_flops()
    results = {"peak_gflops": flops / 1e9, "peak_how": how, "batches": batches, "repeat": args.repeat, "specs": {}, "sgemm": [],
               "exporters": {}}
    rounds: dict[tuple, list] = {}  # (way label, batch) -> per-round measurements
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        results["fma_gflops_per_core"] = fma_peak(Path(tmp))
        sgemm_job = None
        for family, specs in families.items():
            ways = family_ways(family, specs, Path(tmp), args, results["exporters"])
            sgemm_job = sgemm_job or dict(next(iter(ways.values())), runtime="sgemm", builder="bench_forward:sgemm",
                                          path=[str(ROOT / "benchmarks")], layout=None, min_calls=5)
            for batch in batches:
                measure_rounds(ways, specs, batch, args, rounds, started)
                if args.json:  # so far, should a later family fail
                    Path(args.json).write_text(json.dumps(results | {"rounds": [{"way": list(k), "rounds": v} for k, v in rounds.items()]}))
                s = measure(sgemm_job, 1, 1.0, args)
                results["sgemm"].append(2 * SGEMM_N ** 3 / (s["latency_ms"] / 1000) / 1e9)
                _log(f"  ONNX Runtime SGEMM {SGEMM_N}: {results['sgemm'][-1]:.0f} GFLOP/s ({time.perf_counter() - started:.0f} s in)")
        for spec_id in wanted:
            spec = get_spec(spec_id)
            results["specs"][spec_id] = {"gmacs": macs(spec) / 1e9, "limit": limit_of(spec)[0]}
    results["seconds"] = time.perf_counter() - started
    results["rounds"] = [{"way": list(k), "rounds": v} for k, v in rounds.items()]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, rounds, wanted, batches, families))


def peers_of(spec_id: str, runtime: str) -> list[str]:
    """What zoo's `runtime` of `spec_id` is compared with: torchvision's model exported by torch.onnx (zoo's ONNX
    of the @torchvision versions) and Keras Applications' model of the family (every runtime)."""
    family = spec_id.split("@")[0]
    return (["torch.onnx"] if spec_id in TORCHVISION and runtime == "onnx" else []) + \
        (["keras.applications"] if family in KERAS_APPLICATIONS else [])


def table(results, rounds, wanted, batches, families) -> str:
    sgemm = statistics.median(results["sgemm"])
    fma = results["fma_gflops_per_core"]
    cores = len(os.sched_getaffinity(0))
    out = [f"Forward pass, float32, images/s: medians of {results['repeat']} rounds, each measurement in its own interpreter "
           f"(zoo.bench.measure); limit: {results['peak_gflops']:.0f} GFLOP/s nominal ({results['peak_how']}); "
           + (f"AVX-512 FMA loop: {fma:.0f} GFLOP/s a core of CPU time, x {cores} = {fma * cores / results['peak_gflops']:.0%} of nominal; "
              if fma else "")
           + f"ONNX Runtime's SGEMM {SGEMM_N}: {sgemm:.0f} GFLOP/s (median of {len(results['sgemm'])}, "
           f"{sgemm / results['peak_gflops']:.0%} of nominal); run took {results['seconds'] / 60:.1f} min",
           "", "| model | GMAC | batch | runtime | zoo images/s | GFLOP/s | of limit | peers, images/s | zoo / best peer | others' CPU |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    rate = lambda key: statistics.median(m["images_per_second"] for m in rounds[key])  # noqa: E731
    for spec_id in wanted:
        family = spec_id.split("@")[0]
        info = results["specs"][spec_id]
        for batch in batches:
            for runtime in RUNTIMES:
                key = (spec_id, runtime, batch)
                if key not in rounds:
                    continue
                peers = [(spec_id if p == "torch.onnx" else family, p, batch) for p in peers_of(spec_id, runtime)]
                peers = [p for p in peers if p in rounds]
                zoo = rate(key)
                named = "; ".join(f"{p[1]} {rate(p):.2f}" for p in peers) or "-"
                ratio = "-"
                if peers:
                    n = min(len(rounds[key]), *(len(rounds[p]) for p in peers))
                    per_round = [rounds[key][i]["images_per_second"] / max(rounds[p][i]["images_per_second"] for p in peers) for i in range(n)]
                    ratio = f"**{statistics.median(per_round):.2f}x**"
                others = max(m["others_cpu_share"] for k in [key, *peers] for m in rounds[k])
                out.append(f"| {spec_id} | {info['gmacs']:.3f} | {batch} | {runtime} | {zoo:.2f} | {zoo * 2 * info['gmacs']:.0f} | "
                           f"{zoo / info['limit']:.0%} | {named} | {ratio} | {others:.0%} |")
    if results["exporters"]:
        out += ["", "torch.onnx exports: " + "; ".join(f"{k}: {v}" for k, v in results["exporters"].items())]
    return "\n".join(out)


if __name__ == "__main__":
    main()
