"""`zoo bench`: a model's forward speed in each runtime zoo can run it in, beside the machine's arithmetic
limit for that network, so that users can pick a runtime and see how far from the hardware each one is.

Each runtime is measured in a fresh interpreter (its imports, model loading and two warm-up calls outside
the clock; its peak memory is that process's own VmHWM) on one seeded float32 batch of the spec's input
shape. Images/s is the batch over the median call time, spread the 10th-90th percentile of the calls.
The limit is the network's multiply-accumulates per image (each layer kind's `macs`) against the CPUs'
peak float32 rate (`peak_flops`): 2 FLOPs per MAC.

`measure` is that measurement for any way of running a network, zoo's or not: benchmarks/bench_forward.py
times the peers (torchvision's model exported by torch.onnx, Keras Applications' models) through it, with
the same process, input, warm-up and clock as zoo's runtimes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.layers import KINDS
from zoo.spec import ModelSpec

RUNTIMES = ("keras", "savedmodel", "onnx")


@dataclass
class Row:
    runtime: str
    batch: int
    images_per_second: float
    spread: tuple[float, float]  # images/s of the slowest 10% and the fastest 10% of calls
    latency_ms: float  # median time of one call
    peak_memory_mb: float
    limit_images_per_second: float
    calls: int


@dataclass
class Target:
    """What a source gives each runtime: the spec, and a weights file, an ONNX file, a SavedModel."""

    spec: ModelSpec
    weights: Path | None = None
    onnx: Path | None = None
    savedmodel: Path | None = None
    missing: dict | None = None  # runtime -> why it cannot run here


def macs(spec: ModelSpec) -> int:
    return sum(KINDS[n.kind].macs(n) for n in spec.nodes)


def peak_flops() -> tuple[float, str]:
    """The CPUs' peak float32 FLOP/s available to this process, and how it was computed: cores x nominal
    GHz x FLOPs per cycle per core, from the CPU's vector width (AVX-512: 2 FMA units x 16 lanes x 2;
    AVX2: 2 x 8 x 2; SSE: 2 x 4 x 2). The two FMA units are an assumption (server cores with one
    AVX-512 unit reach half); `ZOO_PEAK_GFLOPS` overrides it."""
    if os.environ.get("ZOO_PEAK_GFLOPS"):
        return float(os.environ["ZOO_PEAK_GFLOPS"]) * 1e9, "ZOO_PEAK_GFLOPS"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    nominal = re.search(r"@\s*([\d.]+)GHz", info)
    current = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    ghz = float(nominal.group(1)) if nominal else float(current.group(1)) / 1000 if current else 2.0
    lanes, isa = (16, "AVX-512") if "avx512f" in flags else (8, "AVX2") if "avx2" in flags and "fma" in flags else (4, "SSE")
    cores = len(os.sched_getaffinity(0))
    per_cycle = 2 * lanes * 2
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:g} GHz x {per_cycle} FLOP/cycle ({isa}, 2 FMA units assumed)"


# --- what a source can run in -------------------------------------------------------------------------


def target(source: str) -> Target:
    """A spec name (its architecture with seeded weights), a weights file, a run folder, an export folder,
    a model.onnx or a SavedModel folder."""
    from zoo.registry import get_spec, load_weights

    path = Path(source)
    if not path.exists():
        if "/" in source or "." in Path(source).name:
            raise ZooError("no such file or folder", path)
        return Target(get_spec(source), missing={"savedmodel": "a spec has no SavedModel: zoo export makes one"})
    if path.is_dir() and (path / "saved_model.pb").exists():
        return Target(_spec_beside(path), savedmodel=path, missing=_only("savedmodel", path))
    if path.suffix == ".onnx":
        return Target(_spec_beside(path), onnx=path, missing=_only("onnx", path))
    exported = path if (path / "model.onnx").exists() or (path / "savedmodel").exists() else path / "exported"
    weights = path if path.suffix == ".safetensors" else next((p for p in (path / "weights.safetensors", path.parent / "weights.safetensors")
                                                              if p.exists()), None)
    spec = load_weights(weights).spec if weights else _spec_beside(exported / "model.onnx")
    found = Target(spec, weights, exported / "model.onnx" if (exported / "model.onnx").exists() else None,
                   exported / "savedmodel" if (exported / "savedmodel").exists() else None)
    found.missing = {"savedmodel": f"no SavedModel beside {path}: zoo export makes one"} if not found.savedmodel else {}
    if not weights:
        found.missing["keras"] = f"no weights file in or beside {path}"
    return found


def _only(runtime: str, path: Path) -> dict:
    return {r: f"{path} is a {runtime} export only" for r in RUNTIMES if r != runtime}


def _spec_beside(path: Path) -> ModelSpec:
    """An export's spec: from the run folder it was exported from (RUN/exported/model.onnx)."""
    from zoo.registry import load_weights

    for folder in path.parents[:3]:
        if (folder / "weights.safetensors").exists():
            return load_weights(folder / "weights.safetensors").spec
    raise ZooError("cannot tell which network this is (no run folder's weights.safetensors above it): bench the run folder", path)


# --- measuring, one runtime per process ---------------------------------------------------------------


def bench(source: str, batches=(1, 32), runtimes=None, seconds: float = 3.0) -> dict:
    if not batches or min(batches) < 1 or not seconds > 0:  # before the model is built
        raise ZooError(f"batch sizes are 1 or more and seconds above 0, not {list(batches)} and {seconds}")
    found = target(source)
    missing = found.missing or {}
    unknown = [r for r in runtimes or () if r not in RUNTIMES]
    if unknown:
        raise ZooError(f"unknown runtime {unknown[0]!r}; zoo bench runs {', '.join(RUNTIMES)}")
    for runtime in runtimes or ():
        if runtime in missing:
            raise ZooError(f"cannot run {runtime}: {missing[runtime]}")
    chosen = [r for r in (runtimes or RUNTIMES) if r not in missing]
    limit, flops, how = limit_of(found.spec)
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
        spec_file = spec_json(found.spec, tmp)
        rows = [measure(make_job(runtime, batch, spec_file, seconds, found), limit) for runtime in chosen for batch in batches]
    return {"model": found.spec.id, "source": str(source), "gmacs_per_image": macs(found.spec) / 1e9, "peak_gflops": flops / 1e9,
            "peak_how": how, "rows": [asdict(r) for r in rows]}


def limit_of(spec: ModelSpec) -> tuple[float, float, str]:
    """(the arithmetic limit in images/s, the peak FLOP/s it is computed from, how that peak was found)."""
    flops, how = peak_flops()
    return flops / (2 * macs(spec)), flops, how


def spec_json(spec: ModelSpec, folder) -> Path:
    """The spec as a file the measuring processes read (a plugin's spec need not be registered there)."""
    path = Path(folder) / f"{spec.id.replace('@', '_')}.spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    return path


def make_job(runtime: str, batch: int, spec_file: Path, seconds: float, found: Target | None = None, **more) -> dict:
    """What one measurement runs: `runtime` (keras, savedmodel, onnx: zoo's; any other name with a
    `builder="module:function"`, importable from the folders in `path`, which returns the forward as a
    function of the batch), the batch size, the least timed seconds and, from `found`, the model's files.
    `layout="NCHW"` hands the builder's forward the batch transposed (outside the clock); `min_calls` is
    the least number of timed calls (5), `warmup` the untimed calls before them (2); `folded=False` runs the
    Keras model with its batch norms as layers, as create_model builds it for fine-tuning (zoo.fold)."""
    return {"runtime": runtime, "batch": batch, "seconds": seconds, "spec": str(spec_file),
            "weights": str(found and found.weights or ""), "onnx": str(found and found.onnx or ""),
            "savedmodel": str(found and found.savedmodel or "")} | more


def measure(job: dict, limit: float, run=subprocess.run) -> Row:
    """`job` (see `make_job`) measured in a fresh interpreter, started by `run` (subprocess.run's signature; a
    benchmark may pass one that waits for quiet CPUs and repeats a disturbed measurement)."""
    runtime, batch = job["runtime"], job["batch"]
    p = run([sys.executable, "-c", "import sys, zoo.bench as b; b._child(sys.argv[1])", json.dumps(job)],
            capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise ZooError(f"{runtime} at batch {batch} failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    times, peak = json.loads(line[7:])
    ordered = sorted(times)
    return Row(runtime, batch, batch / statistics.median(times),
               (batch / ordered[int(0.9 * (len(ordered) - 1))], batch / ordered[int(0.1 * (len(ordered) - 1))]),
               1000 * statistics.median(times), peak / 2 ** 20, limit, len(times))


def forward_of(job: dict):
    """The job's forward (see `make_job`) as a function of the batch, and the seeded batch it takes, in its layout."""
    spec = ModelSpec.from_dict(json.loads(Path(job["spec"]).read_text()))
    h, w, c = spec.input_shape
    x = (np.random.default_rng(1).standard_normal((job["batch"], h, w, c), dtype=np.float32) * 60).astype(np.float32)
    if job.get("builder"):
        sys.path[:0] = job.get("path", [])
        module, _, name = job["builder"].partition(":")
        build = getattr(importlib.import_module(module), name)
    else:
        build = {"keras": _keras, "savedmodel": _savedmodel, "onnx": _onnx}[job["runtime"]]
    if job.get("layout") == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return build(job, spec), x


def _child(job_json: str) -> None:
    """In the measuring process: load the runtime's model, time calls, print the times and peak memory."""
    job = json.loads(job_json)
    run, x = forward_of(job)
    for _ in range(job.get("warmup", 2)):
        run(x)
    times, start = [], time.perf_counter()
    while len(times) < job.get("min_calls", 5) or (time.perf_counter() - start < job["seconds"] and len(times) < 500):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("RESULT " + json.dumps([times, hwm]), flush=True)


def _tensors(job, spec) -> dict:
    if job["weights"]:  # checked against the spec it was benched as (a plugin's spec is not registered here)
        from zoo.weights import load_weights

        return load_weights(job["weights"], lambda metadata: spec).tensors
    return seeded_tensors(spec)


def seeded_tensors(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights for timing an architecture: He-scaled kernels, unit scales and variances, zero shifts."""
    rng = np.random.default_rng(seed)
    ones = ("gamma", "moving_variance", "scale")
    out = {}
    for t in spec.tensors.values():
        if len(t.shape) > 1:
            out[t.name] = (rng.standard_normal(t.shape, dtype=np.float32) * np.sqrt(2 / np.prod(t.shape[:-1]))).astype(np.float32)
        else:
            out[t.name] = np.full(t.shape, 1.0 if t.param in ones else 0.0, np.float32)
    return out


def _keras(job, spec):
    import tensorflow as tf

    from zoo.backends.keras import build_model

    # folded as `zoo predict` runs a weights file; False: as create_model builds it for training
    model = build_model(spec, _tensors(job, spec), folded=job.get("folded", True))
    forward = tf.function(lambda x: model(x, training=False))
    return lambda x: forward(tf.constant(x)).numpy()


def _savedmodel(job, spec):
    import tensorflow as tf

    serve = tf.saved_model.load(job["savedmodel"]).signatures["serving_default"]
    return lambda x: [v.numpy() for v in serve(image=tf.constant(x)).values()]


def _onnx(job, spec):
    """zoo's ONNX (written from the spec when the job has no file) in the session zoo predicts with; any
    other ONNX file too (a peer's: its first input and output)."""
    import onnxruntime as ort

    from zoo.backends.onnx import session_options

    path = job["onnx"]
    if not path:
        from zoo.backends.onnx import onnx_graph, write_onnx

        path = str(Path(job["spec"]).with_name(Path(job["spec"]).name.replace(".spec.json", ".onnx")))
        model, inits = onnx_graph(spec, _tensors(job, spec), [str(i) for i in range(spec.num_classes)])
        write_onnx(path, model, inits)
    session = ort.InferenceSession(path, session_options(size=spec.input["size"]), providers=["CPUExecutionProvider"])
    given, wanted = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([wanted], {given: x})
