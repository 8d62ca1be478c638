"""zoo's resnet50@keras and vgg16@caffe against Keras Applications' own ResNet50 and VGG16.

The real `keras.applications` models are filled with seeded weights, calibrated on four natural photos so
their logits tell the photos apart, saved by Keras' own `save_weights` (.weights.h5) and legacy `save` (.h5),
converted with `zoo convert`, and run as zoo's Keras model and zoo's ONNX export (ONNX Runtime, CPU) on the
photos preprocessed by Keras' own `preprocess_input`. Each model is built, saved and converted once, and each
Keras file removed once converted. VGG16 (553 MB a file) is saved by `save_weights` only: ResNet-50 covers
both containers, and the legacy one holds VGG16 in tests/test_keras2_real.py.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, VGG16_FILES
from seeded import set_head

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# name: (keras.applications class, keras.applications module, zoo spec, seed)
MODELS = {"resnet50": ("ResNet50", "resnet50", "resnet50@keras", 0), "vgg16": ("VGG16", "vgg16", "vgg16@caffe", 1)}
FORMATS = {"weights.h5": "{}.weights.h5", "h5": "{}.h5"}  # Keras 3 save_weights, legacy model.save
SAVED = {"resnet50": ("weights.h5", "h5"), "vgg16": ("weights.h5",)}  # the formats each model is saved in


def model_params():
    return [pytest.param("resnet50"), pytest.param("vgg16", marks=VGG16_FILES)]


def file_params():
    """(name, format) for every file saved."""
    return [pytest.param(name, fmt, marks=() if name == "resnet50" else VGG16_FILES, id=f"{name}-{fmt}")
            for name, formats in SAVED.items() for fmt in formats]


# --- the photos, as zoo's spec prepares them ----------------------------------------------------------


def keras_crop(path, input_cfg: dict) -> np.ndarray:
    """The image as `keras.utils.load_img` reads it, then zoo.preprocess.np_eval_image's Pillow steps: the
    shorter side to `resize` (bilinear), the center crop. uint8 RGB, HxWx3."""
    import keras
    from PIL import Image

    h, w = input_cfg["size"]
    size = input_cfg.get("resize", max(h, w))
    im = keras.utils.load_img(path, target_size=None)
    scale = size / min(im.size)
    im = im.resize((max(size, int(im.size[0] * scale)), max(size, int(im.size[1] * scale))), Image.BILINEAR)
    left, top = round((im.size[0] - w) / 2), round((im.size[1] - h) / 2)
    return np.asarray(im.crop((left, top, left + w, top + h)), np.uint8)


def photo_crops(input_cfg: dict) -> np.ndarray:
    return np.stack([keras_crop(DATA / "photos" / f"{p}.jpg", input_cfg) for p in PHOTOS])


def keras_preprocess(name: str, crops: np.ndarray) -> np.ndarray:
    import keras

    module = getattr(keras.applications, MODELS[name][1])
    return np.asarray(module.preprocess_input(crops.astype(np.float32)), np.float32)  # a copy: it works in place


# --- seeded, calibrated Keras Applications models -------------------------------------------------


def fill(model, seed: int) -> None:
    """Every variable from one seeded stream: He-normal kernels, N(0, 0.1) biases, BN gamma U(0.5, 1.5),
    beta N(0, 0.1), moving mean N(0, 0.2), moving variance U(0.5, 2)."""
    rng = np.random.default_rng(seed)
    filled = 0
    for v in model.weights:
        shape = tuple(v.shape)
        if v.name == "kernel":
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / np.prod(shape[:-1])))
        elif v.name in ("bias", "beta"):
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)
        elif v.name == "gamma":
            a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif v.name == "moving_mean":
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.2)
        elif v.name == "moving_variance":
            a = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            raise AssertionError(f"no seeded value for {v.path}")
        v.assign(a)
        filled += 1
    assert filled == len(model.weights) > 0


def calibrate(model, x: np.ndarray) -> np.ndarray:
    """Run the model layer by layer on the batch (in its topological order, through the public layer.input and
    layer.output), rescaling each conv and dense layer's kernel and bias so its output's std over the batch is 1.
    Returns the features the `predictions` layer sees."""
    import keras

    values = {id(model.input): keras.ops.convert_to_tensor(x)}
    for layer in model.layers[1:]:
        inputs = layer.input
        args = [values[id(t)] for t in inputs] if isinstance(inputs, list) else values[id(inputs)]
        if layer.name == "predictions":
            return np.asarray(args)
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            std = float(np.std(np.asarray(layer(args))))
            for v in layer.weights:
                v.assign(v.numpy() / np.float32(std))
        values[id(layer.output)] = layer(args, training=False)
    raise AssertionError("no layer named predictions")


@dataclass
class Case:
    """One Keras Applications model, built, saved and dropped: its logits on the photos and Keras' files."""

    name: str
    spec_id: str
    x: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    files: dict[str, Path]
    folder: Path
    converted: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)

    def convert(self, fmt: str, cli):
        """`zoo convert h5 FILE -o OUT` once per format, then FILE is removed: (code, stdout, stderr, OUT).
        Where the spec must be named (VGG16), the run without --spec comes first: `refused[fmt]`."""
        if fmt not in self.converted:
            src, out = self.files[fmt], self.folder / f"{self.name}-{fmt.replace('.', '-')}.safetensors"
            if self.spec_args:
                self.refused[fmt] = cli("convert", "h5", src, "-o", self.folder / "ambiguous.safetensors")
            self.converted[fmt] = (*cli("convert", "h5", src, "-o", out, *self.spec_args), out)
            src.unlink()
        return self.converted[fmt]

    def weights(self, fmt: str, cli) -> Path:
        code, _, err, out = self.convert(fmt, cli)
        assert code == 0, err
        return out

    @property
    def spec_args(self):
        return () if self.name == "resnet50" else ("--spec", self.spec_id)


def build_case(name: str, folder: Path) -> Case:
    import keras

    from zoo.registry import get_spec

    cls, _, spec_id, seed = MODELS[name]
    keras.backend.clear_session()
    x = keras_preprocess(name, photo_crops(get_spec(spec_id).input))
    model = getattr(keras.applications, cls)(weights=None, classes=1000, input_shape=(224, 224, 3))
    fill(model, seed)
    set_head(model.get_layer("predictions"), calibrate(model, x))
    probs = np.asarray(model(x, training=False))
    files = {fmt: folder / FORMATS[fmt].format(name) for fmt in SAVED[name]}
    model.save_weights(files["weights.h5"])
    if "h5" in files:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*HDF5.*legacy", category=UserWarning)
            model.save(files["h5"])
    # logits from the real model: its softmax head made linear. Eager calls: model.predict would keep the
    # function it traced first (with the softmax) and give probabilities still.
    model.get_layer("predictions").activation = keras.activations.linear
    logits = np.asarray(model(x, training=False))
    del model
    keras.backend.clear_session()
    gc.collect()
    return Case(name, spec_id, x, logits, probs, files, folder)


@pytest.fixture(scope="module")
def resnet50(module_folder):
    return build_case("resnet50", module_folder("resnet50"))


@pytest.fixture(scope="module")
def vgg16(module_folder):
    return build_case("vgg16", module_folder("vgg16"))


def assert_parity(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """max|got - want| <= 1e-4 * max|want| and the same top-5, in order, per image. Returns the relative error."""
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    top_got, top_want = np.argsort(-got, 1)[:, :5], np.argsort(-want, 1)[:, :5]
    same = np.array_equal(top_got, top_want)
    assert diff <= 1e-4 * scale and same, (
        f"{what}: max|zoo - keras| {diff:.3g} = {diff / scale:.2e} of max|keras| {scale:.3g} (bound 1e-4); top-5 "
        + ("identical" if same else f"DIFFERENT: zoo {top_got.tolist()} keras {top_want.tolist()}"))
    print(f"{what}: max|zoo - keras| {diff:.3g} = {diff / scale:.2e} of max|keras| {scale:.3g}, top-5 identical")
    return diff / scale


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_keras_preprocess_input_is_the_specs_normalisation(name):
    from zoo.preprocess import np_eval_image, np_normalize
    from zoo.registry import get_spec

    spec = get_spec(MODELS[name][2])
    crops = photo_crops(spec.input)
    assert crops.shape == (4, 224, 224, 3) and crops.dtype == np.uint8
    # the test's crops are zoo's: np_eval_image is the same Pillow steps and np_normalize
    zoo_input = np_normalize(crops.astype(np.float32), spec.input)
    for i, p in enumerate(PHOTOS):
        np.testing.assert_array_equal(np_eval_image(DATA / "photos" / f"{p}.jpg", spec.input), zoo_input[i])
    keras_input = keras_preprocess(name, crops)
    assert float(np.abs(keras_input - zoo_input).max()) <= 1e-4
    assert not np.array_equal(keras_input, crops)  # preprocess_input did work on the copy


@pytest.mark.parametrize("name", model_params())
def test_seeded_model_tells_the_photos_apart(name, request):
    case = request.getfixturevalue(name)
    top1 = case.logits.argmax(1)
    print(f"{name}: logits std {case.logits.std():.3f}, max|logits| {np.abs(case.logits).max():.3f}, "
          f"max|batch mean| {np.abs(case.logits.mean(0)).max():.2e}, top-1 {top1.tolist()}")
    assert len(set(top1.tolist())) >= 3
    assert 2.5 <= case.logits.std() <= 3.5
    # the linear head changed the real model's output from probabilities to their logits
    assert np.abs(case.logits - case.probs).max() > 1
    np.testing.assert_allclose(case.probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.exp(case.logits - case.logits.max(1, keepdims=True)) /
                               np.exp(case.logits - case.logits.max(1, keepdims=True)).sum(1, keepdims=True),
                               case.probs, atol=1e-6)


@pytest.mark.parametrize("name, fmt", file_params())
def test_keras_files_convert(name, fmt, request, cli):
    case = request.getfixturevalue(name)
    code, out, err, path = case.convert(fmt, cli)
    assert code == 0, err
    print(out, end="")
    assert f": {case.spec_id} (fingerprint" in out and path.exists()
    if name == "resnet50":
        assert "by order" not in out and "--spec" not in out  # Keras' layer names are the spec's
    else:
        assert f"layers matched to {case.spec_id} by order and shape: block1_conv1 -> conv1_1" in out
        assert "predictions -> fc8" in out


@pytest.mark.parametrize("fmt", [pytest.param(fmt, marks=VGG16_FILES) for fmt in SAVED["vgg16"]])
def test_vgg16_without_spec_is_ambiguous(fmt, vgg16, cli):
    vgg16.convert(fmt, cli)
    code, out, err = vgg16.refused[fmt]
    assert code == 1 and out == ""
    print(err, end="")
    assert len(err.strip().splitlines()) == 1, err
    assert "vgg16@caffe" in err and "vgg16@torchvision" in err and "--spec" in err, err
    assert not (vgg16.folder / "ambiguous.safetensors").exists()


def test_both_keras_files_give_the_same_tensors(resnet50, cli):
    from zoo.registry import load_weights

    a, b = (load_weights(resnet50.weights(fmt, cli), mapped=True) for fmt in SAVED["resnet50"])
    assert a.spec.id == b.spec.id == resnet50.spec_id and sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k], b.tensors[k], err_msg=k)


@pytest.mark.parametrize("runtime", ["keras", "onnx"])
@pytest.mark.parametrize("name, fmt", file_params())
def test_zoo_computes_the_keras_applications_logits(name, fmt, runtime, request, cli, tmp_path):
    import keras

    case = request.getfixturevalue(name)
    weights = case.weights(fmt, cli)
    if runtime == "keras":
        import zoo

        model = zoo.create_model(None, weights=weights)
        got = np.asarray(model(case.x, training=False))
        del model
        keras.backend.clear_session()
    else:
        import onnx
        import onnxruntime as ort

        from zoo.backends.onnx import onnx_graph, write_onnx
        from zoo.export import open_source

        src = open_source(weights)
        assert src.spec.id == case.spec_id
        graph, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)
        path = tmp_path / f"{name}.onnx"
        write_onnx(path, graph, inits)
        del src, graph, inits
        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = sess.run(["logits"], {"image": case.x})
        del sess
        path.unlink()
    gc.collect()
    assert got.shape == case.logits.shape == (4, 1000)
    assert_parity(got, case.logits, f"{name} {fmt} {runtime}")
