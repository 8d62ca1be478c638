"""Multi-worker fine-tuning on this machine (issue 16): one worker with 2 threads against two workers with one
thread each (zoo launch 2, MultiWorkerMirroredStrategy over loopback), the communication share of a step, and a
paper estimate of 8 workers.

    .venv/bin/python benchmarks/bench_multiworker.py [--per-class 100] [--batch 32] [--epochs 3] [--train fc7,fc8] [--repeat 2]
        [--only 1w2t,2w1t,1w1t,ar] [--runs runs.jsonl] [--json summary.json]

The job: full-size alexnet@bvlc, seeded random weights (`--weights random`), the built-in example images (256x256,
2 classes, 80% for training), `--train fc7,fc8 --cache-features off --no-augment`: every step runs the whole
forward pass (the frozen convolutions and fc6 included) and trains fc7+fc8, whose gradients (16.8 M values, 67 MB
in float32) are all-reduced every step. The same global batch everywhere. Runs, each in fresh interpreters,
alternating --repeat times:

  1w2t  one worker (--strategy none), 2 intra-op and 2 inter-op threads, both cores
  2w1t  `zoo launch 2`: two workers, 1 thread each, worker i pinned to core i (sched_setaffinity)
  1w1t  one worker, 1 thread, pinned to core 0, half the global batch: one worker's share of a 2w1t step
        without the collective (and without waiting for the other worker)
  ar    two workers as 2w1t that only all-reduce tensors of fc7+fc8's gradient shapes, as Keras' optimizer does
        (ReplicaContext.all_reduce(SUM, gradients) in one call), and a 4-byte one (the latency): medians of 20

Images/s are the training steps of epochs 2.. (epoch 1 traces), median over them, from the run's metrics.csv
(the global batch's images per second of wall time, on every worker). Each run starts when other processes
leave the CPUs alone (waiting --patience s at most) and is run again (--tries in all) if they took over 10% of
them meanwhile (bench_forward.run_quiet); the share they took during the run kept is reported (foreign_share).

The 8-worker estimate (weak scaling: each worker keeps batch/2 images a step): step(N) = compute + allreduce(N),
compute = the 1w1t step, allreduce(N) = 2(N-1) a + 2(N-1)/N x S / B (ring all-reduce: each worker sends and
receives 2(N-1)/N of the S bytes, in 2(N-1) rounds of latency a), a and B fitted to the two ar measurements at
N = 2 (tiny: 2a; fc7+fc8: 2a + S/B). Keras all-reduces after the whole backward pass: no overlap is assumed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_forward import run_quiet  # noqa: E402

# threads and cores before TensorFlow starts: BENCH_THREADS, BENCH_CORES (core of worker i = the i-th listed)
PRELUDE = r"""
import json, os, sys
threads, cores = int(os.environ["BENCH_THREADS"]), os.environ.get("BENCH_CORES")
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if "TF_CONFIG" in os.environ else 0
if cores:
    os.sched_setaffinity(0, {int(cores.split(",")[index])})
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)
"""
FINETUNE = PRELUDE + r"""
from zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""
ALLREDUCE = PRELUDE + r"""
import statistics, time
from zoo.finetune.distributed import strategy
strat = strategy("multiworker")
shapes, reps = json.loads(sys.argv[1]), int(sys.argv[2])

device = strat.extended.worker_devices[0]

def replica(*t):  # on the worker's device, as a step's gradients are (a tensor with no device has no destination)
    with tf.device(device):
        grads = [tf.identity(g) for g in t]
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)

def median_seconds(tensors):
    reduce = tf.function(lambda *t: strat.run(replica, args=t))
    for _ in range(3):
        reduce(*tensors)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        reduce(*tensors)  # eager calls return once the function has run
        times.append(time.perf_counter() - start)
    return statistics.median(times)

grads = [tf.random.normal(s) for s in shapes]
result = {"bytes": sum(int(tf.size(g)) * 4 for g in grads), "seconds": median_seconds(grads),
          "tiny_seconds": median_seconds([tf.zeros([1])])}
if index == 0:
    print("RESULT " + json.dumps(result), flush=True)
"""
LAUNCH = "import sys; from zoo.finetune.launch import launch; sys.exit(launch(2, sys.argv[2:], program=[sys.executable, '-c', sys.argv[1]], timeout=900))"


def finetune_args(data: Path, out: Path, args, batch: int) -> list[str]:
    return ["finetune", "alexnet", "--weights", "random", "--data", str(data), "--train", args.train,
            "--cache-features", "off", "--no-augment", "--epochs", str(args.epochs), "--batch-size", str(batch),
            "--out", str(out)]


def rate(out: Path) -> float:
    """Median images/s of the training steps of epochs 2.. (metrics.csv, written by the chief)."""
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    return statistics.median(float(r["images_per_second"]) for r in rows[1:])


def run(kind: str, data: Path, work: Path, args) -> dict:
    out = work / kind
    shutil.rmtree(out, ignore_errors=True)
    env = os.environ | {"BENCH_THREADS": "2" if kind == "1w2t" else "1"}
    env.pop("TF_CONFIG", None)
    if kind == "1w2t":
        cmd = [sys.executable, "-c", FINETUNE, *finetune_args(data, out, args, args.batch)]
    elif kind == "1w1t":
        env["BENCH_CORES"] = "0"
        cmd = [sys.executable, "-c", FINETUNE, *finetune_args(data, out, args, args.batch // 2)]
    elif kind == "2w1t":
        env["BENCH_CORES"] = "0,1"
        cmd = [sys.executable, "-c", LAUNCH, FINETUNE, *finetune_args(data, out, args, args.batch)]
    else:  # ar
        from zoo.registry import get_spec

        spec = get_spec("alexnet").with_num_classes(2)
        shapes = [list(t.shape) for name in args.train.split(",") for t in spec.node(name).tensors]
        env["BENCH_CORES"] = "0,1"
        cmd = [sys.executable, "-c", LAUNCH, ALLREDUCE, json.dumps(shapes), "20"]
    # a fresh run folder for each try (run_quiet runs the command again when other processes took the CPUs)
    p = run_quiet(["sh", "-c", 'rm -rf "$0" && exec "$@"', str(out), *cmd], env=env, patience=args.patience,
                  tries=args.tries)
    if p.returncode:
        raise SystemExit(f"{kind} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    share = round(p.foreign_share, 3)
    if kind == "ar":
        line = next(line for line in (p.stdout + p.stderr).splitlines() if "RESULT " in line)
        return json.loads(line.split("RESULT ", 1)[1]) | {"foreign_share": share}
    return {"images_per_second": rate(out), "foreign_share": share}


def ring(n: int, latency: float, bandwidth: float, size: int) -> float:
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * size / bandwidth


KINDS = ("1w2t", "2w1t", "1w1t", "ar")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=100, help="example images a class (80%% train)")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", default="fc7,fc8")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", default=",".join(KINDS), help="the measurements to make (default: all)")
    parser.add_argument("--patience", type=float, default=120, help="seconds to wait for quiet CPUs before a run")
    parser.add_argument("--tries", type=int, default=3, help="runs of a measurement while other processes take the CPUs")
    parser.add_argument("--runs", help="a JSON-lines file each run is appended to, and the summary read from (runs of "
                        "earlier calls with the same settings included): measure at quiet moments, a kind at a time")
    parser.add_argument("--max-foreign", type=float, default=0.10, help="summarize only runs during which other "
                        "processes took at most this share of the CPUs, where a kind has any")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("per_class", "batch", "epochs", "train")}

    from zoo.example import make_example

    earlier = [json.loads(line) for line in open(args.runs)] if args.runs and os.path.exists(args.runs) else []
    runs = {k: [r for r in earlier if r["kind"] == k and r["settings"] == settings] for k in KINDS}
    work = Path(tempfile.mkdtemp(prefix="bench-mw-"))
    try:
        data = make_example(work / "data", per_class=args.per_class, size=256)
        for i in range(args.repeat):
            for kind in args.only.split(","):
                runs[kind].append(run(kind, data, work, args) | {"kind": kind, "settings": settings})
                print(f"[{i + 1}/{args.repeat}] {kind}: {runs[kind][-1]}", file=sys.stderr, flush=True)
                if args.runs:
                    with open(args.runs, "a") as f:
                        f.write(json.dumps(runs[kind][-1]) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missing = [k for k in KINDS if not runs[k]]
    if missing:
        print(f"no runs of {', '.join(missing)} yet: no summary", file=sys.stderr)
        return
    summarize(runs, args)


def summarize(runs: dict, args) -> None:
    kept = {k: [r for r in rs if r["foreign_share"] <= args.max_foreign] or rs for k, rs in runs.items()}
    med = {k: statistics.median(r["images_per_second"] for r in kept[k]) for k in ("1w2t", "2w1t", "1w1t")}
    ar = {k: statistics.median(r[k] for r in kept["ar"]) for k in ("seconds", "tiny_seconds")}
    size = kept["ar"][0]["bytes"]
    step_2w = args.batch / med["2w1t"]
    compute = (args.batch // 2) / med["1w1t"]  # one worker's half of the global batch, no collective
    latency = ar["tiny_seconds"] / 2
    bandwidth = size / max(1e-9, ar["seconds"] - ar["tiny_seconds"])
    estimate = {}
    for name, bw in (("loopback (measured)", bandwidth), ("10 Gb/s network", 1.25e9)):
        rows = {}
        for n in (1, 2, 4, 8):
            step = compute + (ring(n, latency, bw, size) if n > 1 else 0.0)
            rows[n] = {"step_s": step, "images_per_second": n * (args.batch // 2) / step,
                       "efficiency": compute / step}
        estimate[name] = rows
    summary = {
        "settings": {"model": "alexnet@bvlc", "trained": args.train, "gradient_bytes": size, "per_class": args.per_class,
                     "batch": args.batch, "epochs": args.epochs, "max_foreign": args.max_foreign},
        "runs_kept": {k: [{x: r[x] for x in r if x not in ("kind", "settings")} for r in rs] for k, rs in kept.items()},
        "runs_dropped": {k: len(runs[k]) - len(kept[k]) for k in runs},
        "images_per_second": med,
        "two_workers_vs_one": med["2w1t"] / med["1w2t"],
        "step_seconds": {"2w1t": step_2w, "1w1t_half_batch": compute, "1w2t": args.batch / med["1w2t"]},
        "allreduce_seconds": ar["seconds"], "allreduce_tiny_seconds": ar["tiny_seconds"],
        "allreduce_share_of_2w1t_step": ar["seconds"] / step_2w,
        "with_minus_without_collective_share": (step_2w - compute) / step_2w,
        "fitted": {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth},
        "estimate": estimate,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
