"""zoo against its peers with the machine's drift taken out: every way of a network in one process, their calls
interleaved (issue 18).

    python benchmarks/bench_paired.py [--specs alexnet@torchvision,resnet50,vgg16] [--batch 1,32] [--seconds 60]
                                      [--least 8] [--pause 0.05] [--json out.json]

bench_forward.py measures each way in its own interpreter, one after the other: on this VM the same measurement
moves by up to 35-50% between rounds, so two ways measured a minute apart differ by the drift, not by their speed.
Here one interpreter loads every way of a spec (zoo's Keras model, SavedModel and ONNX, built and exported as
bench_forward.py does; the Keras model also unfolded, as create_model builds it for fine-tuning; and the peers:
torchvision's model exported by torch.onnx, Keras Applications' model),
warms each up, then calls them in turn, the order rotating each round, --pause seconds apart (ONNX Runtime's and
TensorFlow's idle threads stop spinning before the next call), for --seconds and at least --least rounds. A ratio
zoo / peer is the median over the rounds of the peer's call time over zoo's in the same round (seconds apart),
with the rounds' interquartile range; images/s the batch over the median call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_forward import KERAS_APPLICATIONS, application_job, peers_of, prepare, run_quiet  # noqa: E402

CHILD = r"""
import json, sys, time
from zoo.bench import forward_of
jobs, seconds, least, pause = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ways = [forward_of(job) for job in jobs]
for run, x in ways:
    run(x); run(x)
times = [[] for _ in ways]
start, r = time.perf_counter(), 0
while r < least or time.perf_counter() - start < seconds:
    for k in [(r + i) % len(ways) for i in range(len(ways))]:
        time.sleep(pause)
        run, x = ways[k]
        t = time.perf_counter()
        run(x)
        times[k].append(time.perf_counter() - t)
    r += 1
print("RESULT " + json.dumps(times), flush=True)
"""


TRAINABLE = "keras unfolded"  # the model create_model builds for fine-tuning: batch norms as layers (zoo.fold)


def ways_of(spec_id: str, folder: Path, args) -> dict[str, dict]:
    """{way: zoo.bench job} of zoo's three runtimes and the spec's peers, exported once."""
    ways = prepare(spec_id, folder / spec_id.replace("@", "_"), args)
    ways[TRAINABLE] = dict(ways["keras"], folded=False)
    family = spec_id.split("@")[0]
    if family in KERAS_APPLICATIONS:
        ways["keras.applications"] = application_job(family, spec_id, folder / f"{family}_app", args)
    return ways


def paired(ways: dict[str, dict], batch: int, args) -> dict[str, list[float]]:
    """{way: call seconds, round by round} at `batch`, every way interleaved in one process."""
    jobs = [dict(job, batch=batch) for job in ways.values()]
    p = run_quiet([sys.executable, "-c", CHILD, json.dumps(jobs), str(args.seconds), str(args.least), str(args.pause)],
                  tries=1, settle=2.0, patience=30.0, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"batch {batch} failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return dict(zip(ways, json.loads(line[7:]))) | {"_others_cpu_share": p.foreign_share}


def rows(spec_id: str, batch: int, times: dict) -> list[str]:
    out = []
    for runtime in ("keras", TRAINABLE, "savedmodel", "onnx"):
        zoo = times[runtime]
        for peer in peers_of(spec_id, runtime):
            ratios = sorted(p / z for z, p in zip(zoo, times[peer]))  # zoo's speed over the peer's, round by round
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            out.append(f"| {spec_id} | {batch} | {runtime} | {batch / statistics.median(zoo):.2f} | {peer} | "
                       f"{batch / statistics.median(times[peer]):.2f} | **{statistics.median(ratios):.2f}x** | {q1:.2f}-{q3:.2f} | "
                       f"{len(ratios)} | {times['_others_cpu_share']:.0%} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="alexnet@torchvision,resnet50@caffe,resnet50@keras,resnet50@torchvision,vgg16@caffe,vgg16@torchvision")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--seconds", type=float, default=60.0, help="least seconds of interleaved calls per spec and batch")
    ap.add_argument("--least", type=int, default=8, help="least rounds (one call of every way each)")
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between calls, outside the clock")
    ap.add_argument("--torch-python", default="/work/tvenv/bin/python")
    ap.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    ap.add_argument("--json", help="also write every call time here")
    args = ap.parse_args()
    args.calls = 1  # prepare()'s per-measurement default; the timing here is CHILD's
    started, results = time.perf_counter(), {}
    table = ["| model | batch | zoo's runtime | zoo images/s | peer | peer images/s | zoo / peer | IQR of rounds | rounds | others' CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench-paired-") as tmp:
        for spec_id in args.specs.split(","):
            ways = ways_of(spec_id, Path(tmp), args)
            for batch in (int(b) for b in args.batch.split(",")):
                times = results[f"{spec_id} {batch}"] = paired(ways, batch, args)
                new_rows = rows(spec_id, batch, times)
                table += new_rows
                print("\n".join(new_rows), file=sys.stderr, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results))
    print(f"Interleaved in one process per model and batch, {args.seconds:.0f} s or {args.least} rounds at least; "
          f"run took {(time.perf_counter() - started) / 60:.1f} min\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
