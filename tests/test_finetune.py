"""The fine-tune engine on the narrow AlexNet-shaped test spec (one test on the real alexnet@bvlc shape)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import strategy_matrix
from conftest import TESTS

from zoo import ZooError
from zoo.finetune import finetune
from zoo.registry import load_weights

FAST = dict(model="narrow", batch_size=32, lr=0.003, optimizer="adam", seed=0)


def run(tmp_path, name, data, **kw):
    return finetune(**(FAST | {"data": str(data), "out": str(tmp_path / name)} | kw))


def test_learnable_example_reaches_90_percent(tmp_path, narrow_spec):
    from zoo.example import make_example

    data = make_example(tmp_path / "data", per_class=100, size=48)
    result = run(tmp_path, "learn", data, epochs=30, augment=False, cache_features="off")
    assert result.best_val_accuracy >= 0.9 - 1e-6, result.history  # 36/40 is 0.89999998 in float32
    run_dir = result.run_dir
    assert (run_dir / "classes.txt").read_text().split() == ["circle", "square"]
    w = load_weights(result.weights)
    assert w.spec.id == "narrow@test" and w.spec.num_classes == 2
    assert json.loads(w.metadata["classes"]) == ["circle", "square"] and w.metadata["base_spec"] == "narrow@test"
    assert json.loads(w.metadata["training"])["epochs"] == 30
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 30 and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    events = [f for _, _, files in os.walk(run_dir / "tensorboard") for f in files if "tfevents" in f]
    assert len(events) >= 3  # train, validation, gradients
    assert (run_dir / "checkpoints" / "best.safetensors").exists()


def test_frozen_layers_are_bit_identical_and_trained_ones_move(tmp_path, narrow_spec, example_data):
    start = run(tmp_path, "init", example_data, epochs=1, train=["fc8"])
    before = load_weights(start.weights).tensors
    result = run(tmp_path, "ft", example_data, epochs=2, train=["fc7", "fc8"], weights=str(start.weights))
    after = load_weights(result.weights).tensors
    for name in before:
        if name.startswith(("fc7", "fc8")):
            assert not np.array_equal(before[name], after[name]), name
        else:
            assert np.array_equal(before[name], after[name]), name
    assert result.trained_layers == ["fc7", "fc8"]


def test_freeze_globs_and_unknown_names(tmp_path, narrow_spec, example_data):
    result = run(tmp_path, "glob", example_data, epochs=1, freeze=["conv*"])
    assert result.trained_layers == ["fc6", "fc7", "fc8"]
    with pytest.raises(ZooError, match=r"no layer matches 'fc9'; layers: conv1, norm1, pool1"):
        run(tmp_path, "bad", example_data, epochs=1, train=["fc9"])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("train", [["fc6", "fc7", "fc8"], ["fc7", "fc8"]])  # the second cut has drop6 before fc7
def test_cached_features_train_to_the_same_weights(tmp_path, narrow_spec, example_data, train):
    kw = dict(epochs=2, train=train, augment=False)
    cached = run(tmp_path, "cached", example_data, cache_features="on", **kw)
    plain = run(tmp_path, "plain", example_data, cache_features="off", **kw)
    assert cached.cached_features and not plain.cached_features
    a, b = load_weights(cached.weights).tensors, load_weights(plain.weights).tensors
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    auto = run(tmp_path, "auto", example_data, epochs=1, train=["fc7", "fc8"], augment=True)
    assert not auto.cached_features  # augmentation on: auto does not cache


def test_resume_continues_where_it_stopped_and_matches(tmp_path, narrow_spec, example_data, monkeypatch):
    import keras

    from zoo.finetune import callbacks

    kw = dict(train=["conv2", "fc6", "fc7", "fc8"], schedule="cosine", optimizer="sgd", lr=0.01)
    whole = run(tmp_path, "whole", example_data, epochs=3, **kw)

    class Crash(keras.callbacks.Callback):  # the machine dies right after epoch 2's checkpoint
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    real = callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda *a: real(*a) + [Crash()])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "split", example_data, epochs=3, **kw)
    monkeypatch.setattr(callbacks, "build_callbacks", real)
    ckpt = tmp_path / "split" / "checkpoints"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 2
    other = ckpt / ({"last-a.npz": "last-b.npz", "last-b.npz": "last-a.npz"}[state["last"]])
    other.write_bytes(other.read_bytes()[:5000])  # as if it died while writing epoch 3 over epoch 1's slot
    resumed = finetune(out=str(tmp_path / "split"), resume=True)
    a, b = load_weights(whole.weights).tensors, load_weights(resumed.weights).tensors
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # as the console counts


def test_bad_inputs_one_line_and_no_run_folder(tmp_path, narrow_spec, example_data, cli):
    from PIL import Image

    one = tmp_path / "one"
    (one / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(one / "a" / "x.png")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    Image.new("RGB", (40, 40)).save(empty / "a" / "x.png")
    lst = tmp_path / "train.txt"
    lst.write_text(f"{example_data}/circle/circle_000.jpg 0\nmissing.jpg 1\n")
    bad_label = tmp_path / "val.txt"
    bad_label.write_text(f"{example_data}/circle/circle_000.jpg 0\n{example_data}/square/square_000.jpg 7\n")
    cases = [
        (["--data", one], "at least 2"),
        (["--data", empty], "holds no JPEG or PNG"),
        (["--train-list", lst, "--val-list", bad_label], "missing.jpg"),
        (["--train-list", bad_label, "--val-list", bad_label, "--classes", TESTS / "data" / "two_classes.txt"], "label 7 out of range"),
        (["--data", example_data, "--head", "3"], "--head 3 is larger than the data's 2 classes"),
        (["--data", example_data, "--train", "nope"], "no layer matches 'nope'"),
    ]
    for args, message in cases:
        out = tmp_path / "run"
        code, _, err = cli("finetune", "narrow", "--weights", "random", "--epochs", "1", "--out", out, *args)
        assert code == 1 and message in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists(), err


@pytest.mark.slow
def test_mirrored_over_two_cpu_devices_matches_single_device(tmp_path, narrow_spec, example_data):
    """Two logical CPUs must be configured before TensorFlow starts: run in a fresh interpreter. The same process then
    trains every optimizer zoo offers under the same MirroredStrategy (tests/strategy_matrix.py)."""
    script = f"""
import sys, json
sys.path.insert(0, {str(TESTS)!r})
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from conftest import NarrowSpecPlugin
from zoo.plugins import get_plugins
get_plugins().register(NarrowSpecPlugin(), name="narrow")
from zoo.finetune import finetune
kw = dict(model="narrow@nodropout", data={str(example_data)!r}, epochs=2, batch_size=32, lr=0.01, train=["fc6", "fc7", "fc8"],
          augment=False, cache_features="off")
a = finetune(out={str(tmp_path / "single")!r}, **kw)
b = finetune(out={str(tmp_path / "mirrored")!r}, strategy="mirrored", **kw)
print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync)
import strategy_matrix  # every optimizer zoo offers, under the same strategy (a TensorFlow start saved)
strategy_matrix.run("mirrored", {str(tmp_path)!r})
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "REPLICAS 2" in p.stdout
    a = load_weights(tmp_path / "single" / "weights.safetensors").tensors
    b = load_weights(tmp_path / "mirrored" / "weights.safetensors").tensors
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4, err_msg=name)
    print("mirrored, largest difference to one device / weight scale:", strategy_matrix.check(tmp_path, 1))


@pytest.mark.slow
def test_real_alexnet_bvlc_shape_one_step(tmp_path, seeded_safetensors, example_data):
    result = finetune(model="alexnet", weights=str(seeded_safetensors), data=str(example_data), epochs=1, batch_size=16,
                      train=["fc7", "fc8"], augment=False, out=str(tmp_path / "alex"))
    assert result.cached_features
    w = load_weights(result.weights)
    assert w.spec.id == "alexnet@bvlc" and w.spec.tensors["fc8.kernel"].shape == (4096, 2)
    base = load_weights(seeded_safetensors).tensors
    np.testing.assert_array_equal(w.tensors["conv5.kernel"], base["conv5.kernel"])
    np.testing.assert_array_equal(w.tensors["fc6.kernel"], base["fc6.kernel"])


def test_gradient_histograms_are_the_trained_layers_gradients(tmp_path, narrow_spec, example_data):
    """Augmentation on (no caching), fc7+fc8 trained: the histograms' batch goes through the frozen layers
    once; what is logged must still be the whole model's gradient on that batch."""
    import keras
    import tensorflow as tf

    from zoo.backends.keras import create_model
    from zoo.data import eval_dataset, from_folder

    result = run(tmp_path, "hist", example_data, epochs=1, train=["fc7", "fc8"], augment=True)
    assert not result.cached_features
    (events,) = (tmp_path / "hist" / "tensorboard" / "histograms").glob("*tfevents*")
    logged = {v.tag: tf.make_ndarray(v.tensor) for e in tf.compat.v1.train.summary_iterator(str(events)) for v in e.summary.value}
    want = {f"{layer}/{p}{g}" for layer in ("fc7", "fc8") for p in ("kernel", "bias") for g in ("", "/gradient")}
    assert set(logged) == want

    model = create_model(None, weights=str(result.weights))  # the weights the epoch ended with
    x, y = next(iter(eval_dataset(from_folder(example_data)[0], narrow_spec.with_num_classes(2), FAST["batch_size"])))
    trained = [model.get_layer(n).kernel for n in ("fc7", "fc8")]
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x, training=False))
    for name, grad in zip(("fc7", "fc8"), tape.gradient(loss, trained)):
        buckets = logged[f"{name}/kernel/gradient"]  # rows of (left edge, right edge, count)
        assert buckets[:, 2].sum() > 0
        np.testing.assert_allclose([buckets[0, 0], buckets[-1, 1]], [grad.numpy().min(), grad.numpy().max()], rtol=1e-3, atol=1e-7)


def _narrow_resnet(tmp_path):
    """resnet50@torchvision's graph at width 8 on 32x32 images, registered, with seeded weights whose batch-norm
    statistics are far from 0/1 (so that a batch-statistics pass or an update would show)."""
    from zoo.plugins import get_plugins
    from zoo.registry import get_spec
    from zoo.specs.builders import resnet50_torchvision
    from zoo.weights import save_weights

    layers = resnet50_torchvision(width=8)
    layers[-1]["units"] = 10
    data = get_spec("resnet50@torchvision").to_dict() | {
        "family": "resnet-narrow", "version": "test", "layers": layers, "head": "fc", "num_classes": 10, "categories": None}
    data["input"] = dict(data["input"], size=[32, 32], resize=36)

    class Plugin:
        from zoo.hookspecs import hookimpl

        @hookimpl
        def zoo_model_specs(self):
            return [data]

    get_plugins().register(Plugin(), name="resnet-narrow")
    spec = get_spec("resnet-narrow@test")
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in spec.tensors.items():
        if t.param == "moving_variance":
            tensors[name] = rng.uniform(0.5, 2.0, t.shape).astype(np.float32)
        elif t.param == "gamma":
            tensors[name] = rng.uniform(0.5, 1.5, t.shape).astype(np.float32)
        else:
            scale = np.sqrt(2.0 / np.prod(t.shape[:-1])) if t.param == "kernel" else 0.2
            tensors[name] = (rng.normal(0, 1, t.shape) * scale).astype(np.float32)
    return spec, save_weights(tmp_path / "resnet-narrow.safetensors", spec, tensors)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_resnet_graph_fine_tunes_its_last_stage_with_frozen_batch_norm_in_inference_mode(tmp_path, example_data, cache):
    spec, weights = _narrow_resnet(tmp_path)
    result = run(tmp_path, "resnet", example_data, model="resnet-narrow", weights=str(weights), epochs=2, train=["layer4*", "fc"],
                 augment=cache == "off", cache_features=cache)
    assert result.cached_features == (cache == "on")
    assert result.trained_layers[0] == "layer4.0.conv1" and result.trained_layers[-1] == "fc"
    before, after = load_weights(weights).tensors, load_weights(result.weights).tensors
    for name, t in spec.with_num_classes(2).tensors.items():
        if t.layer.startswith("layer4"):  # trained: batch-norm statistics updated by training-mode passes too
            assert not np.array_equal(before[name], after[name]), name
        elif not t.layer.startswith("fc"):  # frozen, batch norm included: moving statistics untouched
            assert np.array_equal(before[name], after[name]), name
    best = load_weights(result.run_dir / "checkpoints" / "best.safetensors").tensors
    assert set(best) == set(after) and not np.array_equal(best["layer4.2.bn3.moving_mean"], before["layer4.2.bn3.moving_mean"])


def test_cache_needs_one_tensor_between_frozen_and_trained(tmp_path, example_data):
    _, weights = _narrow_resnet(tmp_path)
    with pytest.raises(ZooError, match="one tensor"):  # layer4.0.conv2 reads conv1's path, add reads the shortcut too
        run(tmp_path, "split", example_data, model="resnet-narrow", weights=str(weights), epochs=1,
            train=["layer4.0.conv2", "layer4.0.bn2", "layer4.0.conv3", "layer4.0.bn3", "layer4.1*", "layer4.2*", "fc"],
            cache_features="on", augment=False)
