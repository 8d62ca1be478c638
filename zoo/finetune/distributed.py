"""Runs over several workers: tf.distribute.MultiWorkerMirroredStrategy configured by TF_CONFIG.

Every worker runs the same program in lockstep (synchronous all-reduce of the gradients each step); the
batch size is the global one, split across workers by tf.distribute. Only the chief (TF_CONFIG's `chief`
task, else worker 0) writes the run folder; the others write the same files to a temporary folder that is
removed when they finish (Keras' multi-worker pattern: every worker runs the same callbacks, so that any
collective inside them is matched). Imports TensorFlow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import tensorflow as tf

from zoo.errors import ZooError


class _MultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
    """Keras 3's fit calls `reduce` in two ways MultiWorkerMirroredStrategy does not take (keras-team/keras#20585):
    on the first batch, an (x, y) tuple, to build the model (it reduces single values only, and failed with
    'Attempt to convert a value (PerReplica:{...whole tensors...})'), and on each step's scalar metrics with
    axis=0 (no such axis). Each value of a nest is reduced on its own, a scalar across replicas only."""

    def reduce(self, reduce_op, value, axis):
        def one(v):
            scalar = all(t.shape.rank == 0 for t in self.experimental_local_results(v))
            return super(_MultiWorker, self).reduce(reduce_op, v, None if scalar else axis)

        return tf.nest.map_structure(one, value)


@functools.cache
def strategy(name: str):
    """The run's strategy, made once per process: MultiWorkerMirroredStrategy configures TensorFlow's collectives
    at its creation, and a second one in the same process would fail."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return _MultiWorker()
    return tf.distribute.get_strategy()


def is_chief(strat) -> bool:
    return strat.extended.should_checkpoint


def worker_index(strat) -> int:
    """This worker's index among all (0 on the chief and in a run on one process)."""
    resolver = getattr(strat, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    jobs = resolver.cluster_spec().as_dict()
    return (len(jobs.get("chief", [])) if resolver.task_type == "worker" else 0) + resolver.task_id


def _workers(strat) -> int:
    jobs = strat.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(jobs.get("chief", [])) + len(jobs.get("worker", [])))


def shard(ds):
    """How each worker reads its part: by data (tf.data AutoShardPolicy.DATA). Every worker runs the whole input
    pipeline (decoding, or gathering cached features) and keeps its slice of each global batch. By file is not
    possible: the datasets are made from in-memory lists of images, not read from files by tf.data."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def config_digest(cfg) -> int:
    """53 bits of the sha256 of the run's settings (exact in the int64 a collective carries)."""
    text = json.dumps(asdict(cfg), sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 11


def agree(strat, cfg) -> None:
    """Every worker's settings must be the chief's: the digests are gathered from all workers by a collective
    (each sees all), and a worker started with other arguments stops every worker with the same error."""
    if getattr(strat, "cluster_resolver", None) is None or _workers(strat) == 1:  # one process: nothing to compare
        return
    mine = config_digest(cfg)
    gathered = strat.gather(strat.experimental_distribute_values_from_function(lambda _: tf.constant([mine], tf.int64)), axis=0).numpy().tolist()
    per_worker = gathered[:: strat.num_replicas_in_sync // _workers(strat)]  # a value per replica: one per worker
    differ = [i for i, d in enumerate(per_worker) if d != per_worker[0]]
    if differ:
        raise ZooError(f"worker(s) {', '.join(map(str, differ))} were started with other settings than worker 0 (config digest "
                       f"{per_worker[differ[0]]:x}, not {per_worker[0]:x}); start every worker with the same arguments")


@contextmanager
def writes_to(strat, run: Path, index: int):
    """The folder this worker writes: the run folder on the chief, a temporary one elsewhere, removed when the
    worker ends. Its name is zoo.weights.atomic_output's, with this process's pid: a worker killed before it could
    remove it (SIGKILL, a lost machine) leaves it, and the next run on the machine removes it once that pid is
    gone (zoo.weights.remove_stale_temps, which every run calls on the temporary folder first)."""
    from zoo.weights import atomic_output, remove_stale_temps

    temp = Path(tempfile.gettempdir())
    if is_chief(strat):
        remove_stale_temps(temp)  # the other workers' atomic_output does it for them
        yield run
        return
    scratch = atomic_output(temp / f"zoo-worker{index}")  # .zoo-worker<index>.<pid>.<random>.tmp
    scratch.mkdir(mode=0o700)
    try:
        yield scratch / "run"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# where a message starts printing a value: a PerReplica's or a tensor's repr, a NumPy array
_VALUE = re.compile(r"\(?(PerReplica:\{|<tf\.Tensor|tf\.Tensor\(|array\()")


def step_error(e: Exception, layers: list[str], worker: int, epoch: int, step: int) -> ZooError:
    """A failed training step as one line naming the worker, the epoch and step (counted from 1) and the layer
    whose op failed (TensorFlow names the node, e.g. {{node functional_1/fc7_1/MatMul}}), never printing the
    values: a PerReplica's repr holds every replica's whole batch."""
    text = str(e)
    node = re.search(r"\{\{node ([^}]+)\}\}", text)
    parts = {re.sub(r"_\d+$", "", part) for part in node.group(1).split("/")} if node else set()
    layer = next((name for name in layers if name in parts), None)
    message = _VALUE.split(text.strip(), maxsplit=1)[0].strip().partition("\n")[0] or "(no message)"
    where = f"worker {worker}, epoch {epoch + 1}, step {step + 1}" + (f", layer {layer}" if layer else "")
    return ZooError(f"training failed ({where}): {type(e).__name__}: {message[:300]}")
