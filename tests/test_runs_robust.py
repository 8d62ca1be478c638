"""Nothing lost, nothing half-done: bad images found up front, exports swapped whole, runs resumed from anywhere
and finished, one writer per run folder, a diverging run stopped at its first NaN, stale temporary files removed."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from zoo import ZooError
from zoo.finetune import finetune
from zoo.registry import load_weights

FAST = dict(model="narrow", batch_size=32, lr=0.003, optimizer="adam", seed=0, epochs=1)


def run(out, data, **kw):
    return finetune(**(FAST | {"data": str(data), "out": str(out)} | kw))


def random_weights(path, spec, seed):
    from zoo.weights import save_weights

    rng = np.random.default_rng(seed)
    return save_weights(path, spec, {n: (rng.normal(0, 0.1, t.shape)).astype(np.float32) for n, t in spec.tensors.items()})


@pytest.fixture
def base(tmp_path, narrow_spec):
    """Base weights for the narrow spec (the command line wants a file, or a stored name)."""
    return random_weights(tmp_path / "base.safetensors", narrow_spec, seed=0)


@pytest.fixture
def small_data(tmp_path, example_data):
    """A copy of 12 example images a class, to damage."""
    for cls in ("circle", "square"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for p in sorted((example_data / cls).iterdir())[:12]:
            shutil.copy(p, tmp_path / "data" / cls / p.name)
    return tmp_path / "data"


# --- 1: every image decoded up front ------------------------------------------------------------------


def test_damaged_images_are_named_before_the_run_and_skipped_on_request(tmp_path, base, small_data, cli):
    truncated = sorted((small_data / "circle").glob("*.jpg"))[1]
    truncated.write_bytes(truncated.read_bytes()[:700])
    flipped = sorted((small_data / "square").glob("*.png"))[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the image data: the header still reads
    flipped.write_bytes(bytes(data))

    out = tmp_path / "run"
    code, _, err = cli("finetune", "narrow", "--weights", base, "--epochs", "1", "--batch-size", "8", "--data", small_data, "--out", out)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "2 image(s) cannot be decoded" in err and str(truncated) in err and str(flipped) in err, err
    assert not out.exists()

    code, _, err = cli("finetune", "narrow", "--weights", base, "--epochs", "1", "--batch-size", "8", "--data", small_data,
                       "--out", out, "--skip-bad-images")
    assert code == 0 and "dropped 2 image(s) that do not decode" in err, err
    listed = (out / "val.txt").read_text()
    assert str(truncated) not in listed and str(flipped) not in listed


def test_images_in_class_sub_folders_are_used(tmp_path, small_data):
    from zoo.data import from_folder

    nested = small_data / "circle" / "2019" / "summer"
    nested.mkdir(parents=True)
    shutil.move(small_data / "circle" / "circle_000.jpg", nested / "circle_000.jpg")
    (small_data / "circle" / ".thumbnails").mkdir()
    shutil.copy(nested / "circle_000.jpg", small_data / "circle" / ".thumbnails" / "x.jpg")  # hidden: skipped
    train, val = from_folder(small_data)
    paths = train.paths + val.paths
    assert str(nested / "circle_000.jpg") in paths and len(paths) == 24


# --- 2: an export replaced whole, or not at all ----------------------------------------------------------


class Killed(BaseException):
    pass


@pytest.mark.parametrize("old_data,new_data", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kill_at", range(1, 6))
def test_a_swap_killed_at_any_step_leaves_one_whole_export(tmp_path, monkeypatch, old_data, new_data, kill_at):
    from zoo.export import swap

    def files(folder):
        return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}

    out, new = tmp_path / "out", tmp_path / "new"
    for folder, text, data in ((out, "old", old_data), (new, "new", new_data)):
        folder.mkdir()
        (folder / "model.onnx").write_text(text)
        if data:
            (folder / "model.onnx.data").write_text(text + " data")
    old_files, new_files = files(out), files(new)
    real, calls = os.replace, []

    def dying(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(swap.os, "replace", dying)
    try:
        swap.swap_in(out, {n: new / n for n in swap.ONNX_FILES})
    except Killed:
        pass
    monkeypatch.setattr(swap.os, "replace", real)
    swap.recover(out, list(swap.ONNX_FILES))  # what the next export does first
    got = files(out)
    assert not (out / ".model.onnx.old").exists()
    if got["model.onnx"] == "new":
        assert got == new_files
    else:  # a data file the earlier export did not have may stay beside it: its model does not name it
        assert {k: v for k, v in got.items() if k in old_files} == old_files, got


def test_a_reexport_killed_before_the_new_savedmodel_is_in_keeps_the_earlier_one(tmp_path, narrow_spec, monkeypatch):
    from zoo.export import export, swap

    weights = random_weights(tmp_path / "w.safetensors", narrow_spec.with_num_classes(2), seed=0)
    out = tmp_path / "exported"
    export(weights, formats=["savedmodel"], out=out)
    before = (out / "savedmodel" / "saved_model.pb").read_bytes()
    real = os.replace

    def dying(src, dst):
        if str(dst) == str(out / "savedmodel"):
            raise Killed
        real(src, dst)

    monkeypatch.setattr(swap.os, "replace", dying)
    with pytest.raises(Killed):
        export(weights, formats=["savedmodel"], out=out)
    monkeypatch.setattr(swap.os, "replace", real)
    export(weights, formats=["onnx"], out=out)  # the next export, of another format, puts it back first
    assert (out / "savedmodel" / "saved_model.pb").read_bytes() == before
    import tensorflow as tf

    assert "serving_default" in tf.saved_model.load(str(out / "savedmodel")).signatures


# --- 3, 4: resume from anywhere, refuse other base weights, finish a run killed at its end --------------------


def test_resume_from_elsewhere_trains_on_the_runs_own_files_and_refuses_other_weights(tmp_path, narrow_spec, example_data, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    random_weights(here / "base.safetensors", narrow_spec, seed=1)
    random_weights(elsewhere / "base.safetensors", narrow_spec, seed=2)  # same name, other weights
    monkeypatch.chdir(here)
    run("run", os.path.relpath(example_data), weights="base.safetensors", train=["fc8"])
    monkeypatch.chdir(elsewhere)
    resumed = finetune(out=str(here / "run"), resume=True, epochs=2)
    conv1 = load_weights(resumed.weights).tensors["conv1.kernel"]
    np.testing.assert_array_equal(conv1, load_weights(here / "base.safetensors").tensors["conv1.kernel"])

    shutil.copy(elsewhere / "base.safetensors", here / "base.safetensors")
    with pytest.raises(ZooError, match="not the base weights this run started from"):
        finetune(out=str(here / "run"), resume=True, epochs=3)


def test_resume_writes_the_final_files_of_a_run_killed_after_its_last_epoch(tmp_path, narrow_spec, example_data, monkeypatch):
    from zoo.finetune import callbacks

    def killed(self, logs=None):
        raise Killed

    monkeypatch.setattr(callbacks.Checkpoint, "on_train_end", killed)
    with pytest.raises(Killed):
        run(tmp_path / "run", example_data, epochs=2)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    result = finetune(out=str(tmp_path / "run"), resume=True)
    assert load_weights(result.weights).spec.num_classes == 2
    assert load_weights(tmp_path / "run" / "checkpoints" / "best.safetensors").metadata["epoch"] == str(
        json.loads((tmp_path / "run" / "checkpoints" / "state.json").read_text())["best_epoch"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # as the console counts
    with pytest.raises(ZooError, match="already finished 2 epochs"):
        finetune(out=str(tmp_path / "run"), resume=True)


# --- 5: one writer per run folder ----------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, narrow_spec, example_data, monkeypatch):
    import keras

    from zoo.finetune import callbacks

    out, refused = tmp_path / "run", []

    class Second(keras.callbacks.Callback):  # while the first run trains, another resumes the same folder
        def on_epoch_end(self, epoch, logs=None):
            try:
                finetune(out=str(out), resume=True, epochs=3)
            except ZooError as e:
                refused.append(str(e))

    real = callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda *a: real(*a) + [Second()])
    run(out, example_data)
    assert len(refused) == 1 and f"another zoo finetune (pid {os.getpid()}) is writing this run folder" in refused[0]


def test_two_new_runs_racing_for_one_folder_do_not_both_write_it(tmp_path, narrow_spec, example_data, monkeypatch):
    from zoo.finetune import engine

    out, real = tmp_path / "run", engine.make_plan

    def planned_then_overtaken(cfg):  # both checked the folder was empty; the other one got there first
        plan = real(cfg)
        monkeypatch.setattr(engine, "make_plan", real)
        run(out, example_data, seed=1)
        return plan

    monkeypatch.setattr(engine, "make_plan", planned_then_overtaken)
    with pytest.raises(ZooError, match="not empty"):
        run(out, example_data, seed=2)
    assert json.loads((out / "config.json").read_text())["seed"] == 1  # the other run's folder, untouched


# --- 6: a diverging run stops at its first NaN ----------------------------------------------------------------


def test_a_nan_loss_stops_the_run_and_names_the_last_good_checkpoint(tmp_path, base, example_data, monkeypatch, cli):
    import keras

    from zoo.finetune import callbacks

    class Diverge(keras.callbacks.Callback):  # the weights blow up during epoch 2
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 0:
                kernel = self.model.get_layer("fc8").kernel
                kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    real = callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda *a: real(*a) + [Diverge()])
    out = tmp_path / "run"
    code, _, err = cli("finetune", "narrow", "--weights", base, "--epochs", "3", "--batch-size", "32", "--data", example_data,
                       "--out", out)
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("zoo: error: ") and "Traceback" not in err, err
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1
    assert "in epoch 2, step 2" in line and "lower --lr than 0.001" in line, line
    assert f"last good checkpoint is {out / 'checkpoints' / state['last']} (epoch 1)" in line, line
    with np.load(out / "checkpoints" / state["last"]) as slot:
        assert all(np.isfinite(slot[k]).all() for k in slot.files)
    assert not (out / "weights.safetensors").exists()


# --- 7: options that were reinterpreted or crashed ---------------------------------------------------------------


def test_bad_options_are_one_line(tmp_path, base, example_data, cli):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(["--epochs", "0"], "--epochs and --batch-size must be positive"),
             (["--head", "0"], "--head must be at least 2"),
             (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
             (["--out", a_file], "--out is a file, not a run folder")]
    for args, message in cases:
        code, _, err = cli("finetune", "narrow", "--weights", base, "--data", example_data, "--out", tmp_path / "run", *args)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


# --- 8: stale temporary files ----------------------------------------------------------------------------------


def test_temporary_files_of_dead_writers_are_removed_by_the_next_write(tmp_path, narrow_spec):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".w.safetensors.{dead.pid}.0123456789ab.tmp"
    live = tmp_path / f".w.safetensors.{os.getpid()}.0123456789ab.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (stale, live, other):
        p.write_bytes(b"x" * 1000)
    random_weights(tmp_path / "w.safetensors", narrow_spec, seed=0)
    assert not stale.exists() and live.exists() and other.exists()
