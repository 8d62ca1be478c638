"""Peak disk the test suite holds: runs it as `make test` does, with its temporary folder at --basetemp, and
samples that folder's allocated size twice a second. Prints the peak, when it came and the biggest folders then.

    .venv/bin/python benchmarks/suite_disk.py [--basetemp /tmp/suite-disk] [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-n", "auto", "--maxprocesses", "2", "--dist", "loadgroup"]


def allocated(folder: Path) -> dict[str, int]:
    """Bytes on disk under each entry two levels down (worker folder / test folder); files counted once."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(folder):
        key = "/".join(Path(root).relative_to(folder).parts[:2])
        for name in files:
            try:
                blocks = os.lstat(os.path.join(root, name)).st_blocks
            except OSError:  # removed while we looked
                continue
            sizes[key] = sizes.get(key, 0) + blocks * 512
    return sizes


def sample(folder: Path, done: threading.Event, peak: dict) -> None:
    start = time.perf_counter()
    while not done.wait(0.5):
        sizes = allocated(folder)
        total = sum(sizes.values())
        if total > peak.get("total", -1):
            peak.update(total=total, at=time.perf_counter() - start, sizes=sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--basetemp", type=Path, default=Path("/tmp/suite-disk"))
    args, extra = parser.parse_known_args()
    shutil.rmtree(args.basetemp, ignore_errors=True)
    done, peak = threading.Event(), {}
    watcher = threading.Thread(target=sample, args=(args.basetemp, done, peak))
    watcher.start()
    start = time.perf_counter()
    code = subprocess.call([*PYTEST, f"--basetemp={args.basetemp}", *[a for a in extra if a != "--"]], cwd=ROOT)
    done.set()
    watcher.join()
    print(f"\npytest exit {code} after {time.perf_counter() - start:.0f} s; peak {peak.get('total', 0) / 1e6:,.0f} MB "
          f"under {args.basetemp}, {peak.get('at', 0):.0f} s in; the biggest then:")
    for name, size in sorted(peak.get("sizes", {}).items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {size / 1e6:7,.0f} MB  {name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
