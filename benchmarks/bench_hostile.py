"""Hostile input before and after the hardening of issue 14: each bomb class converted by `zoo convert`.

    .venv/bin/python benchmarks/bench_hostile.py [--zoo-path DIR] [--json OUT.json] [--only NAME,...]

Builds each hostile file with the test suite's own generators (tests/test_pickle_bombs.py, tests/test_h5_bombs.py,
tests/test_h5_published.py, tests/test_torch_legacy.py), then runs every case in a fresh process under an
address-space limit (--limit-gb, 6) and a timeout (--timeout, 60 s), with the zoo checkout --zoo-path first on
PYTHONPATH (default: this checkout), so that an older commit can be measured in a `git worktree` with the same venv.
The venv's editable install maps zoo.converters to this checkout's converters/ folder, which PYTHONPATH does not
override: the case process maps zoo.converters to DIR/converters itself and checks that both zoo and zoo.converters
come from DIR. External plugins are off (ZOO_PLUGINS=""), the test suite's tiny@test spec is registered.

Per case: wall seconds of the case process, peak RSS (RUSAGE_CHILDREN of a small meter process that only starts the
case: the largest of the case process and anything it forked and waited for), exit code (or the signal / timeout) and
the first stderr line. "clean error" means exit 1 and exactly one stderr line "zoo: error: FILE: ..." that is
neither zoo's "unexpected" error nor a MemoryError inside zoo's message. The unpickler-state cases convert a good
file, then every hostile file, then the good file again in one process (zoo.conversion.convert, in process, as
tests/test_pickle_bombs.py does; `zoo convert` itself reads in a forked child since fbbfb96) and compare the two
outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# The case process: address-space limit, zoo from the chosen checkout, the tiny test spec, then the work.
CASE = r"""
import importlib.abc, importlib.util, json, os, resource, sys
job = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (job["limit"], job["limit"]))
root = job["zoo_path"]
sys.path.insert(0, root)


class Converters(importlib.abc.MetaPathFinder):  # the editable install would map it to its own checkout
    def find_spec(self, name, path=None, target=None):
        if name == "zoo.converters":
            folder = os.path.join(root, "converters")
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
        return None


sys.meta_path.insert(0, Converters())
import zoo, zoo.converters
for module in (zoo, zoo.converters):
    if not os.path.realpath(module.__file__).startswith(os.path.realpath(root) + os.sep):
        sys.exit(f"bench: {module.__name__} is {module.__file__}, not under {root}")
from zoo.hookspecs import hookimpl
from zoo.plugins import get_plugins


class TinySpec:
    @hookimpl
    def zoo_model_specs(self):
        return [job["tiny_spec"]]


get_plugins().register(TinySpec(), name="tiny-specs")
if job["mode"] == "convert":
    from zoo.cli import main
    try:
        code = main(["convert", *job["argv"]])
    except SystemExit as e:
        code = e.code
    sys.exit(code)

# unpickler state: good, every hostile file, good again, in this one process
from safetensors.numpy import load_file
from zoo.conversion import convert
from zoo.errors import ZooError
source, good, hostile, out = job["source"], job["good"], job["hostile"], job["out"]
convert(good, source=source, output=out + ".alone.safetensors")
outcomes = {"ZooError": 0, "other error": 0, "converted": 0}
for path in hostile:
    try:
        convert(path, source=source, output=out + ".evil.safetensors")
        outcomes["converted"] += 1
    except ZooError:
        outcomes["ZooError"] += 1
    except Exception as e:
        outcomes["other error"] += 1
        print(f"{os.path.basename(path)}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
try:
    convert(good, source=source, output=out + ".after.safetensors")
    alone, after = load_file(out + ".alone.safetensors"), load_file(out + ".after.safetensors")
    same = alone.keys() == after.keys() and all(
        alone[k].dtype == after[k].dtype and alone[k].tobytes() == after[k].tobytes() for k in alone)
    verdict = "identical" if same else "DIFFERENT"
except Exception as e:
    verdict = f"FAILED ({type(e).__name__}: {str(e)[:200]})"
print(json.dumps({"hostile": len(hostile), **outcomes, "good file after": verdict}))
sys.exit(0 if verdict == "identical" else 2)
"""

# The meter: starts the case in its own session, kills the session at the timeout, reports its rusage.
METER = r"""
import json, os, resource, signal, subprocess, sys, time
argv, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
start = time.perf_counter()
child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
try:
    out, err = child.communicate(timeout=timeout)
    code = child.returncode
except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    out, err = child.communicate()
    code = "timeout"
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10
print(json.dumps({"code": code, "seconds": seconds, "peak": peak, "stdout": out.decode(errors="replace")[-4000:],
                  "stderr": err.decode(errors="replace")[-8000:]}))
"""


# --- the hostile files ------------------------------------------------------------------------------


def pickle_cases(folder: Path):
    from test_pickle_bombs import BOMBS, READERS

    for reader, bomb, _message in BOMBS:
        suffix, write = READERS[reader]
        path = folder / f"{bomb.__name__}{suffix}"
        write(path, b"\x80\x02" + bomb() + b".")
        yield f"pickle {bomb.__name__} ({suffix})", reader, path


def h5_cases(folder: Path):
    from test_h5_bombs import BOMBS
    from test_h5_published import damaged_legacy_file

    for reader, make, suffix, _message in BOMBS:
        path = folder / f"{make.__name__}{suffix}"
        make(path)
        yield f"{'zip' if make.__name__ in ('keras_archive', 'torch_zip') else 'h5'} {make.__name__} ({suffix})", reader, path
    for how in ("external link", "external storage"):
        sub = folder / how.replace(" ", "_")
        sub.mkdir()
        yield f"h5 {how} (.h5)", "h5", damaged_legacy_file(sub, how)


def zero_stride_cases(folder: Path):
    import torch
    from test_torch_legacy import FORMATS

    # as test_torch_legacy.test_a_zero_stride_bomb_fails_cleanly_under_a_memory_limit: one bfloat16 element
    # expanded to (2**17, 2**17), 64 GiB as float32
    bomb = torch.zeros(1, dtype=torch.bfloat16).expand(1 << 17, 1 << 17)
    for fmt, kw in FORMATS.items():
        path = folder / f"zero_stride_{fmt}.pth"
        torch.save({"features.0.weight": bomb, "features.0.bias": torch.zeros(4)}, path, **kw)
        yield f"pth zero stride ({fmt})", "torch", path


def state_cases(folder: Path):
    """The hostile streams of tests/test_pickle_bombs.py (_hostile) for every allow-list value, and a good file."""
    import numpy as np
    import torch
    from conftest import small_layers
    from test_pickle_bombs import _hostile, write_npy, write_pth
    from zoo.converters import torch_pth

    from zoo import safe_pickle

    good = folder / "state_good.npy"
    np.save(good, small_layers())
    hostile = []
    for i, stream in enumerate(s for module, name in safe_pickle.NUMPY_GLOBALS for s in _hostile(module, name)):
        hostile.append(folder / f"state_evil{i}.npy")
        write_npy(hostile[-1], b"\x80\x02" + stream)
    yield "unpickler state (.npy)", "caffe", good, hostile

    torch.manual_seed(0)  # the state of test_a_hostile_pth_changes_nothing_for_the_next_file
    state = OrderedDict([("features.0.weight", torch.randn(4, 3, 3, 3)), ("features.0.bias", torch.randn(4)),
                         ("classifier.weight", torch.randn(3, 64)), ("classifier.bias", torch.randn(3))])
    good = folder / "state_good.pth"
    torch.save(state, good)
    hostile = []
    for i, stream in enumerate(s for module, name in torch_pth.ALLOWED for s in _hostile(module, name)):
        hostile.append(folder / f"state_evil{i}.pth")
        write_pth(hostile[-1], b"\x80\x02" + stream)
    yield "unpickler state (.pth)", "torch", good, hostile


# --- running -----------------------------------------------------------------------------------------


def measure(job: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([job["zoo_path"], os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "ZOO_PLUGINS": "", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    case = [sys.executable, "-c", CASE, json.dumps(job)]
    meter = subprocess.run([sys.executable, "-c", METER, json.dumps(case), str(timeout)], capture_output=True,
                           text=True, env=env, timeout=timeout + 60)
    if meter.returncode:
        raise SystemExit(f"meter failed: {meter.stderr[-2000:]}")
    return json.loads(meter.stdout)


def outcome(result: dict, path: str) -> str:
    code, lines = result["code"], result["stderr"].splitlines()
    if code == "timeout":
        return "timeout"
    if code < 0:
        return f"killed by signal {-code}"
    if code == 0:
        return "exit 0"
    if code == 1 and len(lines) == 1 and lines[0].startswith(f"zoo: error: {path}: "):
        return "one line, but a MemoryError" if "MemoryError" in lines[0] else "clean error"
    if code == 1 and len(lines) == 1 and lines[0].startswith("zoo: unexpected "):
        return f"one line, unexpected {lines[0].split()[2].rstrip(':')}"
    return f"exit {code}, {len(lines)} stderr line(s)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo-path", type=Path, default=ROOT, help="the zoo checkout to run (default: this one)")
    p.add_argument("--limit-gb", type=float, default=6.0, help="RLIMIT_AS of each case process")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is killed")
    p.add_argument("--only", default="", help="comma-separated substrings of case names")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    from conftest import TINY_SPEC

    base = {"zoo_path": str(args.zoo_path.resolve()), "limit": int(args.limit_gb * (1 << 30)), "tiny_spec": TINY_SPEC}
    wanted = [w for w in args.only.split(",") if w]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        folder = Path(tmp)
        cases = [*pickle_cases(folder), *h5_cases(folder), *zero_stride_cases(folder), *state_cases(folder)]
        for name, source, path, *hostile in cases:
            if wanted and not any(w in name for w in wanted):
                continue
            out = folder / "out"
            if hostile:
                job = {**base, "mode": "state", "source": source, "good": str(path), "hostile": [str(h) for h in hostile[0]],
                       "out": str(out)}
            else:
                job = {**base, "mode": "convert", "argv": [source, str(path), "-o", f"{out}.safetensors"]}
            r = measure(job, args.timeout)
            left = sorted(q.name for q in folder.iterdir() if q.name.startswith("out") and not hostile)
            for q in folder.glob("out*"):
                q.unlink()
            lines = r["stderr"].splitlines()
            row = {"case": name, "file": path.name, "size": path.stat().st_size, "seconds": round(r["seconds"], 2),
                   "peak_mb": round(r["peak"] / 2**20), "code": r["code"],
                   "outcome": (json.loads(r["stdout"].splitlines()[-1]) if hostile and r["stdout"].strip()
                               else outcome(r, str(path))),
                   "first_line": lines[0][:300] if lines else "", "stderr_lines": len(lines), "left_behind": left}
            if hostile:
                row["hostile_files"] = len(hostile[0])
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"zoo_path": base["zoo_path"], "limit_gb": args.limit_gb,
                                         "timeout": args.timeout, "results": results}, indent=1))


if __name__ == "__main__":
    main()
