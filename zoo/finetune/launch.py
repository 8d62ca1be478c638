"""`zoo launch N -- finetune ...`: N workers of one multi-worker run on this machine (tests, or one machine with
several accelerators). Each worker is `python -m zoo ...` with its own TF_CONFIG on a free loopback port, in its
own process group; its output comes prefixed by its index. When one fails, or on Ctrl-C, or past `timeout`, every
worker's process group is killed: a worker left alone would wait for the others' collectives forever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from zoo.errors import ZooError

WORKER = [sys.executable, "-m", "zoo"]


def free_ports(n: int) -> list[int]:
    """Ports the kernel hands out now, all held until all are picked (so that they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


def launch(n: int, argv: list[str], program: list[str] = WORKER, timeout: float | None = None) -> int:
    """Run `program + argv` as N workers; returns 0 when all succeed, else the first failure's exit code (124 past
    `timeout`). `--strategy multiworker` is added to a finetune that names no strategy."""
    if n < 1:
        raise ZooError(f"zoo launch needs at least 1 worker, not {n}")
    if argv[:1] == ["finetune"] and "--strategy" not in argv:
        argv = [*argv, "--strategy", "multiworker"]
    ports = free_ports(n)
    workers = [_start(program + argv, tf_config(ports, i), i) for i in range(n)]
    try:
        return _wait(workers, timeout)
    finally:
        for w in workers:
            _kill(w)
        for w in workers:
            w.wait()
            w.pipe.join()


def _start(command: list[str], config: str, index: int) -> subprocess.Popen:
    worker = subprocess.Popen(command, env=os.environ | {"TF_CONFIG": config}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)  # its own process group
    worker.pipe = threading.Thread(target=_relay, args=(worker.stdout, f"[w{index}] "), daemon=True)
    worker.pipe.start()
    return worker


def _relay(stream, prefix: str):
    for line in iter(stream.readline, b""):
        sys.stderr.write(prefix + line.decode(errors="replace"))
        sys.stderr.flush()


def _wait(workers: list[subprocess.Popen], timeout: float | None) -> int:
    """Until every worker succeeded (0), one failed (its code) or the time is up (124)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [w.poll() for w in workers]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None:
            return failed if failed > 0 else 128 - failed  # killed by a signal: as a shell reports it
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"zoo: launch: workers still running after {timeout:g}s: stopping them", file=sys.stderr)
            return 124
        time.sleep(0.2)


def _kill(worker: subprocess.Popen):
    if worker.poll() is None:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited since
            pass
