"""Multi-worker fine-tuning on loopback: workers started by zoo.finetune.launch (TF_CONFIG, own process groups, all
killed on a failure or past the timeout, so none outlives a test), checked against one-process runs."""

import json
import os
import sys

import numpy as np
import pytest
import strategy_matrix
from conftest import TESTS

from zoo.finetune import finetune
from zoo.finetune.launch import launch
from zoo.registry import load_weights

# a worker: the narrow test specs registered, then the zoo CLI. Worker 1 only: ZOO_TEST_WORKER1 adds arguments;
# ZOO_TEST_KILL_WORKER1=EPOCH:STEP (from 0) sends it SIGKILL as that training step begins. ZOO_TEST_MATRIX=FOLDER: after
# a successful run, every worker trains tests/strategy_matrix.py's optimizer rows under the run's strategy (the
# workers and their collectives are up: a launch of its own would cost 8 s)
WORKER = [sys.executable, "-c", f"""
import json, os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import keras
from conftest import NarrowSpecPlugin
from zoo.finetune import callbacks
from zoo.plugins import get_plugins
get_plugins().register(NarrowSpecPlugin(), name="narrow")
from zoo.cli import main
first = json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1
kill = first and os.environ.get("ZOO_TEST_KILL_WORKER1")

class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, step, logs=None):
        if f"{{self.epoch}}:{{step}}" == kill:
            os.kill(os.getpid(), signal.SIGKILL)

real = callbacks.build_callbacks
callbacks.build_callbacks = lambda *a: real(*a) + [Kill()]
code = main(sys.argv[1:] + (os.environ.get("ZOO_TEST_WORKER1", "").split() if first else []))
if code == 0 and os.environ.get("ZOO_TEST_MATRIX"):
    import strategy_matrix
    strategy_matrix.run("multiworker", os.environ["ZOO_TEST_MATRIX"])
sys.exit(code)
"""]
# no dropout: each replica would draw its own masks. 16 training images: two full global batches of 8, 4 a worker
SETTINGS = dict(model="narrow@nodropout", epochs=2, batch_size=8, lr=0.01, train=["fc6", "fc7", "fc8"], augment=False, seed=0)
LIMIT = 120  # seconds a launched job may take before every worker is killed


@pytest.fixture(scope="module")
def data(module_folder):
    from zoo.example import make_example

    return make_example(module_folder("mw"), per_class=10, size=40)


def cli_args(settings: dict) -> list[str]:
    args = ["finetune", settings["model"], "--weights", "random"]
    for key, value in settings.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if value is False:
            args.append("--no-" + key)
        elif value is not True:
            args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return args


def two_workers(data, out, capfd, **kw) -> tuple[int, str]:
    code = launch(2, cli_args(SETTINGS | kw | {"data": data, "out": out}), program=WORKER, timeout=LIMIT)
    return code, capfd.readouterr().err


def assert_same_weights(a, b, rtol, atol):
    a, b = load_weights(a).tensors, load_weights(b).tensors
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def test_two_workers_train_as_one_with_the_same_global_batch_and_only_the_chief_writes(tmp_path, narrow_spec, data, capfd,
                                                                                        monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where worker 1 writes its temporary folder
    monkeypatch.setenv("ZOO_TEST_MATRIX", str((tmp_path / "matrix").absolute()))
    (tmp_path / "matrix").mkdir()
    out = tmp_path / "two"
    code, err = two_workers(data, out, capfd, cache_features="off")
    assert code == 0, err[-3000:]
    assert "[w0] " in err and "[w1] " in err and "unexpected" not in err
    one = finetune(**SETTINGS, data=str(data), cache_features="off", out=str(tmp_path / "one"))
    # the same images in each global batch; the gradient is the mean of the workers' means (4 images each) instead of
    # one mean over 8, and its all-reduce adds in another order: float32 rounding, a few ulps a step over 4 steps
    assert_same_weights(one.weights, out / "weights.safetensors", rtol=1e-4, atol=1e-5)
    chief = {p.name for p in out.iterdir()}
    assert {"config.json", "checkpoints", "metrics.csv", "tensorboard", "weights.safetensors", "report"} <= chief
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]  # once, not twice
    assert "[w1] zoo: fine-tuning" in err and f"run folder {tmp_path}/.zoo-worker1." in err  # worker 1 wrote there,
    assert not list(tmp_path.glob("*zoo-worker*")) and "[w1] report" not in err  # and the folder is removed
    # every optimizer zoo offers, fused or not, under zoo's MultiWorkerMirroredStrategy: as on one device
    print("multiworker, largest difference to one device / weight scale:", strategy_matrix.check(tmp_path / "matrix", 2))


def test_a_worker_started_with_other_arguments_is_refused(tmp_path, narrow_spec, data, capfd, monkeypatch):
    monkeypatch.setenv("ZOO_TEST_WORKER1", "--lr 0.05")
    code, err = two_workers(data, tmp_path / "run", capfd, epochs=1)
    assert code == 1, err[-3000:]
    refusal = "worker(s) 1 were started with other settings than worker 0"
    assert f"[w0] zoo: error: {refusal}" in err or f"[w1] zoo: error: {refusal}" in err, err[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def float32_run(module_folder, data):
    """SETTINGS' one-epoch run in float32, to compare the mixed-precision runs with."""
    from conftest import NarrowSpecPlugin

    from zoo.plugins import get_plugins

    get_plugins().register(NarrowSpecPlugin(), name="narrow-float32-run")  # the tests' fixtures reset the plugins
    return load_weights(finetune(**SETTINGS | {"epochs": 1}, data=str(data), out=str(module_folder("f32") / "run")).weights)


@pytest.mark.parametrize("policy, export, atol", [
    ("mixed_bfloat16", "savedmodel", 0.02),  # 8 bits of mantissa (seen: 4.9e-5)
    ("mixed_float16", "onnx", 1e-4),  # 11 bits (seen: 1.7e-6); Keras' LossScaleOptimizer scales the loss
])
def test_mixed_precision_trains_and_its_checkpoints_and_exports_are_float32(policy, export, atol, tmp_path, narrow_spec,
                                                                             data, cli, float32_run):
    import keras

    out = tmp_path / policy
    code, _, err = cli(*cli_args(SETTINGS | {"epochs": 1, "data": data, "out": out, "precision": policy}), "--export", export)
    assert code == 0, err
    assert keras.config.dtype_policy().name == "float32"  # the global policy is back
    weights = load_weights(out / "weights.safetensors")
    assert all(t.dtype == np.float32 for t in weights.tensors.values())
    assert json.loads(weights.metadata["training"])["precision"] == policy
    with np.load(out / "checkpoints" / "last-a.npz") as slot:
        assert {slot[k].dtype for k in slot.files if k.startswith("model_")} == {np.dtype(np.float32)}
        assert {slot[k].dtype.kind for k in slot.files if k.startswith("optimizer_")} <= {"f", "i"}
        assert {slot[k].dtype for k in slot.files if slot[k].dtype.kind == "f"} == {np.dtype(np.float32)}
        if policy == "mixed_float16":  # Keras wrapped the optimizer: LossScaleOptimizer's variables come first (its own
            # iteration and learning rate, unused), then its count of finite steps since the scale last changed (2:
            # both steps' gradients were finite, none was skipped) and the scale, still Keras' initial 2**15; saved,
            # so that --resume goes on with the same scale
            assert (int(slot["optimizer_2"]), float(slot["optimizer_3"])) == (2, 2.0**15)
    if export == "savedmodel":
        assert os.path.exists(out / "exported" / "savedmodel" / "saved_model.pb")
    else:
        import onnx

        model = onnx.load(out / "exported" / "model.onnx", load_external_data=False)
        assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT}
        assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    a, b = float32_run.tensors["fc7.kernel"], weights.tensors["fc7.kernel"]
    assert not np.array_equal(a, b)  # computed in 16 bits: not the float32 run's weights,
    np.testing.assert_allclose(a, b, atol=atol)  # but close to them


def test_a_worker_killed_mid_epoch_and_the_job_resumed_loses_only_that_epoch(tmp_path, narrow_spec, data, capfd, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a killed worker cannot remove its temporary folder
    monkeypatch.setenv("ZOO_TEST_KILL_WORKER1", "1:1")  # the second step of epoch 2 (two steps an epoch)
    code, err = two_workers(data, out, capfd, epochs=3)
    assert code == 128 + 9, err[-3000:]  # worker 1's SIGKILL; the launcher killed worker 0 then
    assert json.loads((out / "checkpoints" / "state.json").read_text())["epoch"] == 1  # epoch 2 was lost, not more
    left = list(tmp_path.glob(".zoo-worker1.*.tmp"))  # the killed worker's copy of the run, named with its pid
    assert len(left) == 1 and (left[0] / "run" / "checkpoints").is_dir(), left
    monkeypatch.delenv("ZOO_TEST_KILL_WORKER1")
    code = launch(2, ["finetune", "--out", str(out), "--resume"], program=WORKER, timeout=LIMIT)
    err = capfd.readouterr().err
    assert code == 0 and f"[w1] zoo: resumed {out} after epoch 1" in err, err[-3000:]
    assert not list(tmp_path.glob("*zoo-worker*"))  # the next run removed it (its writer was gone), then its own
    whole = finetune(**SETTINGS | {"epochs": 3}, data=str(data), out=str(tmp_path / "whole"))
    assert_same_weights(whole.weights, out / "weights.safetensors", rtol=1e-4, atol=1e-5)  # as the first test's
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_a_failed_step_names_worker_epoch_step_and_layer_in_one_line_without_values(tmp_path, narrow_spec, data, cli, monkeypatch):
    import tensorflow as tf

    from zoo.finetune import caching
    from zoo.finetune.distributed import step_error

    real = caching.cached_datasets

    def bad_labels(plan, base):  # label 7 for a 2-class head: the loss op of the first step fails
        train_ds, *rest = real(plan, base)
        return (train_ds.map(lambda x, y: (x, y + 7)), *rest)

    monkeypatch.setattr(caching, "cached_datasets", bad_labels)
    code, _, err = cli(*cli_args(SETTINGS | {"epochs": 1, "data": data, "out": tmp_path / "run"}))
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("zoo: error: training failed (worker 0, epoch 1, step 1): InvalidArgumentError: "), err
    assert "Traceback" not in err and "tf.Tensor" not in err and len(line) < 500, line

    replica = ValueError("Attempt to convert a value (PerReplica:{\n  0: <tf.Tensor: shape=(4, 32, 32, 3), numpy=array([[1.5]])>})")
    message = str(step_error(replica, narrow_spec.layer_names, 1, 0, 3))
    assert message == "training failed (worker 1, epoch 1, step 4): ValueError: Attempt to convert a value", message
    node = tf.errors.InvalidArgumentError(None, None, "Matrix size-incompatible: In[0]: [4,800] [[{{node functional_1/fc6_1/MatMul}}]]")
    assert ", layer fc6):" in str(step_error(node, narrow_spec.layer_names, 0, 1, 0))


def test_a_dead_workers_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path):
    """zoo.weights.remove_stale_temps, which every run calls on the temporary folder: a folder under
    atomic_output's name whose pid is gone goes, whatever it holds; a running process's stays."""
    import subprocess

    from zoo.weights import atomic_output, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = atomic_output(tmp_path / "zoo-worker1")
    gone = tmp_path / mine.name.replace(f".{os.getpid()}.", f".{int(dead.stdout)}.")
    for folder in (mine, gone):
        (folder / "run" / "checkpoints").mkdir(parents=True)
        (folder / "run" / "checkpoints" / "last-a.npz").write_bytes(b"x" * 100)
    link = tmp_path / f".link.{int(dead.stdout)}.000000000000.tmp"
    link.symlink_to(mine)  # a stale name that is a link to a folder: the link goes, never what it points to
    assert sorted(remove_stale_temps(tmp_path)) == sorted([gone, link])
    assert not gone.exists() and not link.is_symlink() and (mine / "run" / "checkpoints" / "last-a.npz").is_file()
