"""Keras 2 h5 files written by real Keras 2 (tf-keras 2.21.0, installed by the Makefile with --no-deps beside
tensorflow_cpu), as Keras Applications' published files were: `tf_keras.applications.ResNet50` and `VGG16`
(weights=None, seeded by `tf_keras.utils.set_random_seed`), their batch norms' moving statistics set from the
photos and perturbed, saved by `model.save_weights("....h5")` (the legacy h5 of
`resnet50_weights_tf_dim_ordering_tf_kernels.h5`) and `model.save("....h5")` (the whole model, weights under
`model_weights`). tf_keras computes the reference logits on the test photos after its own `preprocess_input`.

tf_keras runs in a subprocess (tests/keras2_writer.py): it and Keras 3, which zoo runs on, must not share a
process. zoo converts each file (`zoo.convert(..., source="h5")`: resnet50@keras found by itself, VGG16 with
vgg16@caffe, as its name fits two families), builds its model with `zoo.create_model(spec, weights=...)` and
must give tf_keras' logits: max|zoo - tf_keras| <= 1e-4 * max|tf_keras| and the same top-5 per photo.
ResNet50 with two seeds in both files, VGG16 (553 MB a file) with one seed in the published file's format only
(the whole-model container is ResNet50's here and VGG16's nowhere else). tf_keras missing is a failure, not a skip.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TESTS, VGG16_FILES
from keras2_writer import FILES
from test_keras_applications import PHOTOS, assert_parity, photo_crops

SPECS = {"resnet50": "resnet50@keras", "vgg16": "vgg16@caffe"}
CASES = [pytest.param(("resnet50", 0, list(FILES)), id="resnet50-seed0"),  # (name, seed, kinds of file)
         pytest.param(("resnet50", 1, list(FILES)), id="resnet50-seed1"),
         pytest.param(("vgg16", 0, ["weights"]), id="vgg16-seed0", marks=VGG16_FILES)]


def keras2_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run_keras2(*args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=keras2_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"tf_keras process failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module", params=CASES)
def keras2(request, module_folder):
    """One case written by tf_keras: {"name", "seed", "spec", "files": {kind: path}, "crops", reference arrays}."""
    from zoo.registry import get_spec

    name, seed, kinds = request.param
    folder = module_folder(f"keras2-{name}-{seed}")
    crops = photo_crops(get_spec(SPECS[name]).input)
    np.save(folder / "crops.npy", crops)
    run_keras2(str(TESTS / "keras2_writer.py"), name, str(seed), str(folder / "crops.npy"), str(folder), ",".join(kinds))
    with np.load(folder / "reference.npz") as ref:
        case = {k: ref[k] for k in ref.files}
    case.update(name=name, seed=seed, spec=SPECS[name], crops=crops, folder=folder,
                files={kind: folder / FILES[kind].format(name) for kind in kinds})
    yield case
    for path in case["files"].values():
        path.unlink(missing_ok=True)  # 553 MB each for VGG16: gone before the next case writes its own


def test_tf_keras_is_keras_2_on_the_installed_tensorflow():
    proc = run_keras2("-c", "import tf_keras, tensorflow as tf, keras; "
                            "print(tf_keras.__version__, tf.__version__, keras.__version__)", timeout=300)
    tf_keras_version, tf_version, keras_version = proc.stdout.split()
    print(f"tf_keras {tf_keras_version}, tensorflow {tf_version}, keras {keras_version}")
    assert tf_keras_version == "2.21.0" and tf_keras_version.split(".")[:2] == tf_version.split(".")[:2]
    assert keras_version.startswith("3.")  # tf_keras is beside Keras 3, not over it


def test_tf_keras_preprocess_input_is_the_specs_normalisation(keras2):
    from zoo.preprocess import np_normalize
    from zoo.registry import get_spec

    assert keras2["x"].shape == (len(PHOTOS), 224, 224, 3)
    zoo_input = np_normalize(keras2["crops"].astype(np.float32), get_spec(keras2["spec"]).input)
    assert float(np.abs(keras2["x"] - zoo_input).max()) <= 1e-4


def test_files_are_keras_2_legacy_h5(keras2):
    """What Keras 2 wrote: root attributes `layer_names`, `backend`, `keras_version` 2.21.0 (under
    `model_weights` in the whole-model file, beside `model_config`), each dataset nested under its layer
    (`layer/layer/kernel:0`), and batch norms' moving statistics neither zeros nor ones."""
    import h5py

    for kind, path in keras2["files"].items():
        with h5py.File(path, "r") as f:
            assert ("model_config" in f.attrs) == ("model_weights" in f) == (kind == "model"), kind
            g = f["model_weights"] if kind == "model" else f
            assert g.attrs["keras_version"] in ("2.21.0", b"2.21.0") and g.attrs["backend"] in ("tensorflow", b"tensorflow")
            layers = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]
            first = "conv1_conv" if keras2["name"] == "resnet50" else "block1_conv1"
            names = [n.decode() if isinstance(n, bytes) else n for n in g[first].attrs["weight_names"]]
            assert names == [f"{first}/kernel:0", f"{first}/bias:0"]
            assert g[first][first]["kernel:0"].shape[:2] == ((7, 7) if keras2["name"] == "resnet50" else (3, 3))
            assert layers[-1] == "predictions" and g["predictions"]["predictions"]["kernel:0"].shape == (
                4096 if keras2["name"] == "vgg16" else 2048, 1000)
            if keras2["name"] == "resnet50":
                bn = g["conv2_block1_0_bn"]["conv2_block1_0_bn"]
                mean, var = bn["moving_mean:0"][()], bn["moving_variance:0"][()]
                assert np.abs(mean).min() > 0 and not np.any(var == 1) and var.std() > 0.1 * var.mean()
    assert int(keras2["batchnorms"]) == (53 if keras2["name"] == "resnet50" else 0)


def test_tf_keras_logits_tell_the_photos_apart(keras2):
    logits, probs = keras2["logits"], keras2["probs"]
    assert logits.shape == (len(PHOTOS), 1000) and len(set(logits.argmax(1).tolist())) >= 3
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), probs, atol=1e-6)  # the linear head's softmax
    gaps = np.diff(-np.sort(logits, 1)[:, ::-1][:, :6], axis=1)
    print(f"{keras2['name']} seed {keras2['seed']}: top-1 {logits.argmax(1).tolist()}, "
          f"smallest gap in the top 6 {gaps.min():.3g} (bound on |diff| {1e-4 * np.abs(logits).max():.3g})")
    assert gaps.min() > 10 * 1e-4 * np.abs(logits).max()  # the top-5 comparison is not decided by round-off


def test_zoo_computes_tf_keras_logits(keras2, tmp_path):
    import keras

    import zoo

    spec = None if keras2["name"] == "resnet50" else keras2["spec"]  # resnet50@keras is found by itself
    for kind, path in keras2["files"].items():
        result = zoo.convert(path, source="h5", output=tmp_path / f"{kind}.safetensors", spec=spec)
        assert result.spec == keras2["spec"], result
        by_order = [n for n in result.notes if "by order" in n]
        assert bool(by_order) == (keras2["name"] == "vgg16"), result.notes  # ResNet50's names are the spec's
        model = zoo.create_model(keras2["spec"], weights=result.output)
        got = np.asarray(model(keras2["x"], training=False))
        del model
        keras.backend.clear_session()
        gc.collect()
        result.output.unlink()
        assert got.shape == keras2["logits"].shape
        assert_parity(got, keras2["logits"], f"{keras2['name']} seed {keras2['seed']} {kind} (tf_keras)")
