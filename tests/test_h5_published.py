"""Keras files as the published weights come: Keras 3's `.keras` archive, and the legacy h5 of Keras 1 and 2.

The `.keras` archives are written by Keras 3 itself (`model.save`). Keras 1 and 2.0-2.2 cannot be installed
beside Keras 3 and TensorFlow here (files written by the last Keras 2, tf-keras 2.21, are tested in
tests/test_keras2_real.py), so their h5 files are written with h5py in exactly the structure their savers
wrote: Keras 2.0-2.2's `save_weights_to_hdf5_group` (keras/engine/topology.py, later keras/engine/saving.py)
and Keras 1's `Container.save_weights` (keras/engine/topology.py):

- root attributes `layer_names` (the model's layers, `model.layers` order, as bytes), and since Keras 2
  `backend` and `keras_version` (a file without `keras_version` is a Keras 1 file to Keras' loaders);
- one group per layer, its attribute `weight_names` (bytes; empty for layers without weights) naming its
  datasets in the layer's variable order (trainable, then non-trainable: batch norm's gamma, beta, moving mean,
  moving variance);
- each dataset at its weight name under the layer's group. Keras 2 names are TensorFlow variable names
  scoped by the layer, so the dataset nests: `res2a_branch2a/res2a_branch2a/kernel:0`. Keras 1 names are flat:
  `block1_conv1_W_1:0`, `bn_conv1_running_std_1:0`.

Keras 2.2's ResNet50 file and Keras 1's VGG16 file are also loaded by Keras 3's own legacy loader
(keras/src/legacy/saving/legacy_h5_format.py, by order) into a Keras model of the network that wrote them,
which then computes what the source model does: the files are ones Keras reads as meant. The weights are seeded; ResNet-50 is full size, VGG16 the narrow
variant of tests/data/caffe (every conv / 8, hidden dense layers / 16).

Keras 2.2's ResNet50 (res2a_branch2a, ..., fc1000) lists its layers in another order than Keras 3's
keras.applications.ResNet50: the same network, but its adds take (main path, shortcut) where Keras 3's take
(shortcut, main path), and Keras orders a model's layers by depth and then by a walk from the output that
follows the adds' first inputs first. So in every conv block Keras 2.2 lists res2a_branch2c before
res2a_branch1, Keras 3 conv2_block1_0_conv (the shortcut) before conv2_block1_3_conv.
"""

from __future__ import annotations

import re
import zipfile

import numpy as np
import pytest
from narrow import register_narrow_specs
from test_keras_applications import fill

from zoo.registry import load_weights

RESNET_STAGES = [(2, 3, 64, 1), (3, 4, 128, 2), (4, 6, 256, 2), (5, 3, 512, 2)]  # stage, blocks, filters, stride
KERAS1_VARS = {"kernel": "W", "bias": "b", "gamma": "gamma", "beta": "beta", "moving_mean": "running_mean",
               "moving_variance": "running_std"}  # Keras 1's names; Keras 2 and 3 load "running_std" as the moving variance


def quiet_keras():
    import keras

    keras.backend.clear_session()
    return keras


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def zoo_logits(weights, x):
    import zoo

    return np.asarray(zoo.create_model(None, weights=weights)(x, training=False))


def layer_weights(model) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{layer: [(variable name, value)]} in the order Keras' h5 savers write them (trainable, then the rest)."""
    return {layer.name: [(v.name, v.numpy()) for v in layer.trainable_weights + layer.non_trainable_weights]
            for layer in model.layers if layer.weights}


def write_legacy_h5(path, layer_names, weights, weight_name, version: str | None):
    """A legacy Keras h5 as Keras 1 (`version` None: no backend or version attributes) or 2 saved it."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layer_names]
        if version:
            f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", version.encode()
        for layer in layer_names:
            group = f.create_group(layer)
            names = [weight_name(layer, var).encode() for var, _ in weights.get(layer, [])]
            group.attrs["weight_names"] = names
            for name, (_, value) in zip(names, weights.get(layer, [])):
                group.create_dataset(name, data=value)


def keras2_name(layer: str, var: str) -> str:
    return f"{layer}/{var}:0"


def keras1_name(layer: str, var: str) -> str:
    return f"{layer}_{KERAS1_VARS[var]}_1:0"  # "_1": TensorFlow's suffix for the graph's second variable of a name


# --- ResNet-50: Keras Applications' model (Keras 3 names) and Keras 2.2's (old names) ------------------------


def keras2_resnet50():
    """The graph of Keras 2.0-2.2's keras.applications.resnet50 (conv1, bn_conv1, res2a_branch2a, ..., fc1000): each
    block's main path built first, then add([main, shortcut]). Batch norm epsilon is Keras 3's 1.001e-5 (that
    resnet50.py left Keras' default 1e-3), so that it computes what keras.applications.ResNet50 does."""
    keras = quiet_keras()
    L = keras.layers

    def bn(name, y):
        return L.BatchNormalization(epsilon=1.001e-5, name=name)(y)

    def block(x, stage, letter, filters, stride):
        conv, norm = f"res{stage}{letter}_branch", f"bn{stage}{letter}_branch"
        y = L.Activation("relu")(bn(norm + "2a", L.Conv2D(filters, 1, strides=stride or 1, name=conv + "2a")(x)))
        y = L.Activation("relu")(bn(norm + "2b", L.Conv2D(filters, 3, padding="same", name=conv + "2b")(y)))
        y = bn(norm + "2c", L.Conv2D(4 * filters, 1, name=conv + "2c")(y))
        if stride:  # a conv block: a projection shortcut
            x = bn(norm + "1", L.Conv2D(4 * filters, 1, strides=stride, name=conv + "1")(x))
        return L.Activation("relu")(L.add([y, x]))

    inputs = keras.Input((224, 224, 3))
    x = L.Activation("relu")(bn("bn_conv1", L.Conv2D(64, 7, strides=2, name="conv1")(L.ZeroPadding2D(3)(inputs))))
    x = L.MaxPooling2D(3, 2)(L.ZeroPadding2D(1)(x))
    for stage, blocks, filters, stride in RESNET_STAGES:
        for b in range(blocks):
            x = block(x, stage, "abcdef"[b], filters, stride if b == 0 else None)
    return keras.Model(inputs, L.Dense(1000, name="fc1000")(L.GlobalAveragePooling2D()(x)))


def old_resnet_name(new: str) -> str:
    """keras.applications.ResNet50's layer name -> Keras 2.2's: conv2_block1_0_conv -> res2a_branch1, ..."""
    if m := re.fullmatch(r"conv(\d)_block(\d)_(\d)_(conv|bn)", new):
        stage, block, i, kind = m.groups()
        branch = "1" if i == "0" else "2" + "abc"[int(i) - 1]
        return f"{'res' if kind == 'conv' else 'bn'}{stage}{'abcdef'[int(block) - 1]}_branch{branch}"
    return {"conv1_conv": "conv1", "conv1_bn": "bn_conv1", "predictions": "fc1000"}[new]


class ResNet:
    """A seeded keras.applications.ResNet50 (logits out), its logits on an image, its `.keras` file."""

    def __init__(self, folder):
        keras = quiet_keras()
        model = keras.applications.ResNet50(weights=None, classifier_activation=None)
        fill(model, seed=3)
        self.x = np.random.default_rng(4).normal(0, 40, (1, 224, 224, 3)).astype(np.float32)
        self.logits = np.asarray(model(self.x, training=False))
        self.weights = layer_weights(model)
        self.order = list(self.weights)  # Keras 3's model.layers order of the weighted layers
        self.archive = folder / "resnet50.keras"
        model.save(self.archive)


@pytest.fixture(scope="module")
def resnet(module_folder):
    return ResNet(module_folder("resnet50"))


@pytest.fixture(scope="module")
def keras2_model():
    return keras2_resnet50()


def test_keras_archive_of_resnet50_converts_exactly(resnet, cli, tmp_path):
    out = tmp_path / "archive.safetensors"
    code, stdout, err = cli("convert", resnet.archive, "-o", out)  # the source found by sniffing the zip
    assert code == 0, err
    assert ": resnet50@keras (fingerprint" in stdout and "by order" not in stdout
    assert_keras_tensors(out, resnet.weights)
    assert relative_error(zoo_logits(out, resnet.x), resnet.logits) <= 1e-4


def assert_keras_tensors(path, weights):
    """The zoo weights file holds exactly the Keras model's variables (resnet50@keras uses Keras' names)."""
    w = load_weights(path, mapped=True)
    assert len(w.tensors) == sum(len(v) for v in weights.values())
    for layer, variables in weights.items():
        for var, value in variables:
            np.testing.assert_array_equal(w.tensors[f"{layer}.{var}"], value, err_msg=f"{layer}.{var}")


@pytest.mark.parametrize("writer", ["keras2", "keras1", "keras3-auto-names"])
def test_legacy_resnet50_converts_by_keras_order(writer, resnet, keras2_model, cli, tmp_path):
    """Keras 2.2's and Keras 1's ResNet50 files (old names, Keras 2.2's order), and a file in Keras 3's order whose
    names match nothing (Keras' auto names): each maps to resnet50@keras in the order Keras loads it. The tensors
    are compared (the first test relates them to Keras' forward); Keras' own reading is checked once."""
    if writer == "keras3-auto-names":
        auto = {n: f"{'conv2d' if n.endswith('conv') else 'batch_normalization' if n.endswith('bn') else 'dense'}_{i}"
                for i, n in enumerate(resnet.order, 1)}
        names, weights, name_of = [auto[n] for n in resnet.order], {auto[n]: v for n, v in resnet.weights.items()}, keras2_name
    else:
        names = [layer.name for layer in keras2_model.layers]  # Keras 2's writer's order: its model.layers
        weights = {old_resnet_name(n): v for n, v in resnet.weights.items()}
        name_of = keras1_name if writer == "keras1" else keras2_name
    path = tmp_path / f"{writer}.h5"
    write_legacy_h5(path, names, weights, name_of, None if writer == "keras1" else "2.1.6")
    if writer == "keras2":  # Keras itself reads the file into the network that wrote it, by order
        keras2_model.load_weights(path)
        assert relative_error(keras2_model(resnet.x, training=False), resnet.logits) <= 1e-4
    out = tmp_path / f"{writer}.safetensors"
    code, stdout, err = cli("convert", path, "-o", out)
    assert code == 0, err
    assert ": resnet50@keras (fingerprint" in stdout and "as Keras lists resnet50@keras's graph" in stdout
    assert ("its adds' inputs the other way round" in stdout) == (writer != "keras3-auto-names")
    if writer != "keras3-auto-names":
        assert "res2a_branch1 -> conv2_block1_0_conv" in stdout and "res2a_branch2c -> conv2_block1_3_conv" in stdout
    assert_keras_tensors(out, resnet.weights)


def test_resnet50_without_its_classifier_is_named(resnet, keras2_model, cli, tmp_path):
    """resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5: no spec is headless, and the error says what the file is."""
    names = [layer.name for layer in keras2_model.layers if layer.name != "fc1000"]
    weights = {old_resnet_name(n): v for n, v in resnet.weights.items() if n != "predictions"}
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(path, names, weights, keras2_name, "2.1.6")
    code, _, err = cli("convert", path, "-o", tmp_path / "notop.safetensors")
    assert code == 1 and err.count("\n") == 1, err
    assert "resnet50@keras without its classifier predictions" in err and "no registered spec is headless" in err


# --- VGG16 as Keras 1 saved it --------------------------------------------------------------------------------


def narrow_vgg16():
    """keras.applications' VGG16 graph (block1_conv1, ..., fc1, fc2, predictions) at the narrow widths."""
    keras = quiet_keras()
    L = keras.layers
    layers = [keras.Input((224, 224, 3))]
    for block, (convs, filters) in enumerate([(2, 8), (2, 16), (3, 32), (3, 64), (3, 64)], 1):
        layers += [L.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{i}") for i in range(1, convs + 1)]
        layers.append(L.MaxPooling2D(2, name=f"block{block}_pool"))
    layers += [L.Flatten(name="flatten"), L.Dense(256, activation="relu", name="fc1"), L.Dense(256, activation="relu", name="fc2"),
               L.Dense(1000, name="predictions")]
    return keras.Sequential(layers)


def test_keras1_vgg16_converts(tmp_path, cli):
    register_narrow_specs()
    model = narrow_vgg16()
    fill(model, seed=5)
    x = np.random.default_rng(6).normal(0, 40, (1, 224, 224, 3)).astype(np.float32)
    logits = np.asarray(model(x, training=False))
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    write_legacy_h5(path, ["input_1"] + [layer.name for layer in model.layers], layer_weights(model), keras1_name, None)
    reread = narrow_vgg16()
    reread.load_weights(path)  # Keras 3 reads it as a Keras 1 file (no keras_version), by order
    assert relative_error(reread(x, training=False), logits) <= 1e-5
    code, stdout, err = cli("convert", path, "--spec", "vgg16-narrow@test", "-o", tmp_path / "vgg16.safetensors")
    assert code == 0, err
    assert "by order and shape: block1_conv1 -> conv1_1" in stdout and "predictions -> fc8" in stdout
    assert relative_error(zoo_logits(tmp_path / "vgg16.safetensors", x), logits) <= 1e-5


# --- small files: the .keras reader's details, and broken files -----------------------------------------------


def tiny_model():
    keras = quiet_keras()
    L = keras.layers
    return keras.Sequential([keras.Input((9, 9, 3)), L.Conv2D(4, 3, activation="relu", name="conv1"), L.MaxPooling2D(2, 1),
                             L.MaxPooling2D(3, 1), L.Flatten(), L.Dense(3, name="fc2")])


def rezip(src, dst, edit):
    """dst: the zip src with each member through edit(name, bytes) -> (name, bytes), stored as Keras stores them."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(*edit(info.filename, zin.read(info)))


def test_keras_archive_is_read_in_place(tmp_path):
    """Keras stores model.weights.h5 uncompressed: the tensors are views of the mapped archive."""
    from zoo.converters.keras_h5 import read_h5_params

    from zoo.mapped import map_file

    model = tiny_model()
    model.save(tmp_path / "tiny.keras")
    with zipfile.ZipFile(tmp_path / "tiny.keras") as archive:
        assert archive.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED
    data = map_file(tmp_path / "tiny.keras")
    layers, ordered = read_h5_params(tmp_path / "tiny.keras", 1 << 20, data)
    assert ordered and list(layers) == ["conv1", "fc2"]
    whole = np.frombuffer(data, np.uint8)
    for layer in (model.get_layer("conv1"), model.get_layer("fc2")):
        for i, v in enumerate(layer.weights):
            assert np.shares_memory(layers[layer.name][str(i)], whole)
            np.testing.assert_array_equal(layers[layer.name][str(i)], v.numpy())


def test_keras_archive_without_layer_names_takes_them_from_config(tmp_path, tiny_spec, cli):
    """Keras releases before the `name` attribute of `vars`: the groups are class names (conv2d, dense); config.json,
    read as JSON only, names them back (else they would be matched by order, and the output would say so)."""
    import h5py

    def strip_names(name, data):
        if name != "model.weights.h5":
            return name, data
        (tmp_path / "w.h5").write_bytes(data)
        with h5py.File(tmp_path / "w.h5", "r+") as f:
            f.visititems(lambda _, obj: obj.attrs.__delitem__("name") if "name" in obj.attrs else None)
            assert sorted(f["layers"]) == ["conv2d", "dense", "flatten", "max_pooling2d", "max_pooling2d_1"]
        return name, (tmp_path / "w.h5").read_bytes()

    model = tiny_model()
    model.save(tmp_path / "new.keras")
    rezip(tmp_path / "new.keras", tmp_path / "old.keras", strip_names)
    code, stdout, err = cli("convert", tmp_path / "old.keras", "-o", tmp_path / "old.safetensors")
    assert code == 0 and "by order" not in stdout, err
    w = load_weights(tmp_path / "old.safetensors")
    np.testing.assert_array_equal(w.tensors["fc2.kernel"], model.get_layer("fc2").kernel.numpy())


@pytest.mark.parametrize("edit, message", [
    (lambda n, d: (n.replace(".h5", ".npz"), d), "without model.weights.h5 and config.json"),
    (lambda n, d: (n, d.replace(b'"layers": [', b'"layers": 7, "x": [') if n == "config.json" else d),
     "config.json is not a Keras model's config"),
    (lambda n, d: (n, d[:4096] if n == "model.weights.h5" else d), "not a readable Keras HDF5 file"),
])
def test_broken_keras_archives_fail_in_one_line(tmp_path, tiny_spec, cli, edit, message):
    tiny_model().save(tmp_path / "good.keras")
    path = tmp_path / "bad.keras"
    rezip(tmp_path / "good.keras", path, edit)
    code, _, err = cli("convert", path, "-o", tmp_path / "bad.safetensors")
    assert code == 1 and err.startswith(f"zoo: error: {path}: ") and err.count("\n") == 1, err
    assert message in err, err


def damaged_legacy_file(folder, how: str):
    """The tiny legacy file of tests/conftest.small_layers, as Keras 2 writes it, with one thing changed."""
    import h5py
    from conftest import small_layers

    path = folder / "w.h5"
    weights = {name: list(zip(("kernel", "bias"), arrays)) for name, arrays in small_layers().items()}
    write_legacy_h5(path, ["conv1", "fc2"], weights, keras2_name, "2.1.6")
    bias = weights["fc2"][1][1]
    with h5py.File(path, "r+") as f:
        if how == "missing dataset":
            f["fc2"].attrs["weight_names"] = [b"fc2/kernel:0", b"fc2/beta:0"]
        elif how == "missing layer":
            f.attrs["layer_names"] = [b"conv1", b"fc2", b"fc3"]
        elif how == "theano":
            f.attrs["backend"] = b"theano"
        elif how == "chunked":  # as Keras splits an attribute that would pass HDF5's 64 KB header limit
            del f.attrs["layer_names"]
            f.attrs["layer_names0"], f.attrs["layer_names1"] = [b"conv1"], [b"fc2"]
        else:  # the bias elsewhere on disk, where HDF5 would read it from without the check
            del f["fc2/fc2/bias:0"]
            if how in ("external link", "soft link to an external link"):
                with h5py.File(folder / "other.h5", "w") as other:
                    other["bias"] = bias
                external = h5py.ExternalLink(str(folder / "other.h5"), "/bias")
                if how == "external link":
                    f["fc2/fc2/bias:0"] = external
                else:
                    f["elsewhere"] = external
                    f["fc2/fc2/bias:0"] = h5py.SoftLink("/elsewhere")
            else:
                (folder / "raw.bin").write_bytes(bias.tobytes())
                f["fc2/fc2"].create_dataset("bias:0", bias.shape, bias.dtype, external=[(str(folder / "raw.bin"), 0, bias.nbytes)])
    return path


@pytest.mark.parametrize("how, message", [
    ("missing dataset", "/fc2/fc2/beta:0 is named in the file but not in it"),
    ("missing layer", "/fc3 is named in the file but not in it"),
    ("external link", "/fc2/fc2/bias:0 links to another file"),
    ("soft link to an external link", "/fc2/fc2/bias:0 links to another file"),
    ("external storage", "/fc2/fc2/bias:0 is stored in other files; not read"),
    ("theano", "Theano backend"),
])
def test_broken_legacy_files_fail_in_one_line(tmp_path, tiny_spec, cli, how, message):
    path = damaged_legacy_file(tmp_path, how)
    code, _, err = cli("convert", path, "-o", tmp_path / "w.safetensors")
    assert code == 1 and err.startswith(f"zoo: error: {path}: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "w.safetensors").exists()


def test_chunked_layer_names_are_read(tmp_path, tiny_spec, cli):
    code, _, err = cli("convert", damaged_legacy_file(tmp_path, "chunked"), "-o", tmp_path / "w.safetensors")
    assert code == 0, err


def test_keras_order_is_keras_own(resnet, keras2_model):
    """keras_order of resnet50@keras is keras.applications.ResNet50's model.layers order (weighted layers); with the
    adds' inputs swapped, it is Keras 2.2's ResNet50's."""
    from zoo.converters.keras_h5 import keras_order

    from zoo.registry import get_spec

    spec = get_spec("resnet50@keras")
    assert keras_order(spec) == resnet.order != [n.name for n in spec.weighted_nodes]
    assert [old_resnet_name(n) for n in keras_order(spec, swap_adds=True)] == [layer.name for layer in keras2_model.layers if layer.weights]


def test_mutated_keras_archives_fail_cleanly(tmp_path, tiny_spec):
    from conftest import fuzz_convert

    tiny_model().save(tmp_path / "ok.keras")
    assert fuzz_convert(tmp_path, (tmp_path / "ok.keras").read_bytes(), ".keras", "h5", 100, seed=7) > 20
