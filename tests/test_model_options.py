"""create_model's Keras Applications and timm options (include_top, pooling, outputs, input_size), `zoo features`
and the headless, any-size ONNX export, against Keras Applications' own ResNet50 and VGG16.

Each Keras Applications model is built once with seeded weights (test_keras_applications.fill), saved by Keras'
own save_weights and converted by zoo; its headless form at another size and its intermediate tensors are
Keras' own, the weights copied layer by layer from the full model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, VGG16_FILES
from test_keras_applications import MODELS, fill, keras_preprocess, photo_crops

from zoo import ZooError

SIZE = (160, 192)  # not the specs' 224x224, nor square
# zoo's layer names for Keras' intermediate layers (resnet50@keras keeps Keras' names; VGG16's fc2 is dense + ReLU)
INTERMEDIATE = {"resnet50": {"conv3_block4_out": "conv3_block4_out", "conv4_block6_out": "conv4_block6_out", "avg_pool": "avg_pool"},
                "vgg16": {"pool4": "block4_pool", "pool5": "block5_pool", "relu7": "fc2"}}


@dataclass
class Reference:
    """Keras Applications' outputs for the four photos, and zoo's weights converted from Keras' file."""

    name: str
    spec_id: str
    weights: Path
    x: np.ndarray  # the photos at 224x224, preprocessed by Keras' preprocess_input
    x_size: np.ndarray  # at SIZE
    intermediate: dict[str, np.ndarray]  # zoo layer name -> Keras' tensor of the full model at 224x224
    headless: dict[str | None, np.ndarray]  # pooling -> Keras' include_top=False output at SIZE


def build_reference(name: str, folder: Path) -> Reference:
    import keras

    import zoo
    from zoo.features import select
    from zoo.registry import get_spec

    cls, _, spec_id, seed = MODELS[name]
    app = getattr(keras.applications, cls)
    keras.backend.clear_session()
    spec = get_spec(spec_id)
    x = keras_preprocess(name, photo_crops(spec.input))
    x_size = keras_preprocess(name, photo_crops(select(spec, include_top=False, input_size=SIZE).input))
    full = app(weights=None, input_shape=(224, 224, 3))
    fill(full, seed)
    full.save_weights(folder / f"{name}.weights.h5")
    weights = zoo.convert(folder / f"{name}.weights.h5", source="h5", output=folder / f"{name}.safetensors", spec=spec_id).output
    (folder / f"{name}.weights.h5").unlink()  # 553 MB for VGG16, read once
    names = INTERMEDIATE[name]
    taps = keras.Model(full.input, [full.get_layer(k).output for k in names.values()])
    intermediate = dict(zip(names, (np.asarray(t) for t in taps(x, training=False))))
    model = app(include_top=False, weights=None, input_shape=(*SIZE, 3))
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    trunk = model(x_size, training=False)
    # what Keras Applications' pooling="avg" / "max" add on the trunk (one model built instead of three)
    headless = {None: np.asarray(trunk), "avg": np.asarray(keras.layers.GlobalAveragePooling2D()(trunk)),
                "max": np.asarray(keras.layers.GlobalMaxPooling2D()(trunk))}
    del full, taps, model
    keras.backend.clear_session()
    gc.collect()
    return Reference(name, spec_id, weights, x, x_size, intermediate, headless)


@pytest.fixture(scope="module")
def resnet50(module_folder):
    return build_reference("resnet50", module_folder("resnet50"))


@pytest.fixture(scope="module")
def vgg16(module_folder):
    return build_reference("vgg16", module_folder("vgg16"))


def assert_close(got, want, what: str) -> float:
    """max|got - want| <= 1e-4 of max|want|; prints the measured difference."""
    assert got.shape == want.shape, f"{what}: shape {got.shape}, Keras {want.shape}"
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{what}: max|zoo - keras| = {err:.2e} of max|keras|")
    assert err <= 1e-4, f"{what}: max|zoo - keras| = {err:.2e} of max|keras| (bound 1e-4)"
    return err


# --- the spec: trunks, sizes, refusals (no TensorFlow) --------------------------------------------------


def test_trunk_is_the_last_map_before_the_classifier_in_every_registered_spec():
    from zoo.registry import all_specs

    want = {"alexnet@bvlc": "pool5", "alexnet@torchvision": "pool5", "caffenet@bvlc": "pool5",
            "googlenet@bvlc": "inception_5b_output", "resnet50@caffe": "res5c_relu", "resnet50@keras": "conv5_block3_out",
            "resnet50@torchvision": "layer4.2.relu3", "vgg16@caffe": "pool5", "vgg16@torchvision": "features.30"}
    got = {s.id: s.trunk for s in all_specs().values() if s.id in want}
    assert got == want


def test_sizes_the_graph_allows_and_refuses():
    import zoo
    from zoo.features import select
    from zoo.registry import get_spec

    alexnet = get_spec("alexnet@bvlc")
    with pytest.raises(ZooError) as e:
        zoo.create_model("alexnet", input_size=(100, 100))  # include_top=True
    print(e.value)
    assert str(e.value) == ("alexnet@bvlc at 100x100, layer 'fc6': its kernel would have to be 1024x4096, not 9216x4096 "
                            "(it reads a 2x2x256 map flattened, not 6x6x256): its weights fix the input size")
    assert select(alexnet, include_top=False, input_size=(100, 100)).output_shape("pool5") == (2, 2, 256)
    with pytest.raises(ZooError, match=r"alexnet@bvlc at 50x50, layer 'pool5': window 3 larger than the padded input 2"):
        select(alexnet, include_top=False, input_size=(50, 50))
    with pytest.raises(ZooError, match=r"vgg16@torchvision at 160x192, layer 'avgpool': input 5x6 is not a multiple of output 7"):
        select(get_spec("vgg16@torchvision"), input_size=SIZE)
    resnet = select(get_spec("resnet50@torchvision"), input_size=SIZE)  # global pooling: any size, the head kept
    assert resnet.logits and resnet.output_shape("fc") == (1000,)
    assert resnet.input["size"] == [160, 192] and resnet.input["resize"] == 219  # 256 * 192 / 224: timm's crop_pct


def test_outputs_and_pooling_options():
    from zoo.features import select
    from zoo.registry import get_spec

    spec = get_spec("resnet50@torchvision")
    part = select(spec, outputs=["layer3", "fc"], pooling=None)
    assert part.outputs == ("layer3.5.relu3", "fc")  # a torchvision module's dotted prefix names its last layer
    assert any(n.name.startswith("layer4") for n in part.nodes)  # fc needs layer4
    assert [n.name for n in select(spec, outputs="layer2").nodes][-1] == "layer2.3.relu3"
    assert not any(n.name.startswith("layer3") for n in select(spec, outputs="layer2").nodes)
    assert select(spec, include_top=False, pooling="max").output_shape("layer4.2.relu3") == (2048,)
    for kwargs, message in [
        (dict(pooling="avg"), r"pooling 'avg' pools spatial maps; 'fc' outputs \(1000,\) \(include_top=False gives"),
        (dict(pooling="mean", include_top=False), r"pooling is 'avg', 'max' or None, not 'mean'"),
        (dict(outputs=["fc"], include_top=False), r"give it or include_top=False, not both"),
        (dict(outputs=["layer5"]), r"resnet50@torchvision has no layer 'layer5'"),
        (dict(outputs=["layer3", "layer3.5.relu3"]), r"distinct layers"),
        (dict(input_size=(0, 10)), r"two positive ints"),
    ]:
        with pytest.raises(ZooError, match=message):
            select(spec, **kwargs)


def test_onnx_input_size_is_free_only_where_the_graph_is_the_same_at_every_size():
    from zoo.backends.onnx import size_free
    from zoo.features import select
    from zoo.registry import get_spec

    def free(spec_id, **kwargs):
        spec = get_spec(spec_id)
        return size_free(select(spec, **kwargs), {k: np.zeros(t.shape, np.float32) for k, t in spec.tensors.items()})

    assert free("resnet50@keras") and free("resnet50@keras", include_top=False, pooling="avg")
    assert free("vgg16@torchvision", include_top=False)
    assert not free("vgg16@torchvision")  # the adaptive pooling to 7x7 and the dense layers after it
    assert not free("vgg16@caffe", include_top=False)  # ceil pooling: its end padding follows the size
    assert not free("alexnet@bvlc")


# --- against Keras Applications ------------------------------------------------------------------------


@pytest.mark.parametrize("name, pooling", [("resnet50", None), ("resnet50", "max"),
                                           pytest.param("vgg16", None, marks=VGG16_FILES),
                                           pytest.param("vgg16", "avg", marks=VGG16_FILES)])
def test_headless_model_at_another_size_is_keras_applications_include_top_false(name, pooling, request):
    import keras

    import zoo

    ref = request.getfixturevalue(name)
    model = zoo.create_model(ref.spec_id, weights=ref.weights, include_top=False, pooling=pooling, input_size=SIZE)
    assert model.input_shape == (None, *SIZE, 3)
    got = np.asarray(model(ref.x_size, training=False))
    assert_close(got, ref.headless[pooling], f"{name} include_top=False pooling={pooling} at {SIZE[0]}x{SIZE[1]}")
    del model
    keras.backend.clear_session()


@pytest.mark.parametrize("name", ["resnet50", pytest.param("vgg16", marks=VGG16_FILES)])
def test_named_outputs_are_the_full_models_intermediate_tensors(name, request):
    import keras

    import zoo

    ref = request.getfixturevalue(name)
    model = zoo.create_model(ref.spec_id, weights=ref.weights, outputs=list(ref.intermediate))
    got = model(ref.x, training=False)
    assert isinstance(got, list) and len(got) == len(ref.intermediate)
    for (layer, want), tensor in zip(ref.intermediate.items(), got):
        assert_close(np.asarray(tensor), want, f"{name} outputs {layer}")
    del model
    keras.backend.clear_session()


def test_features_command_writes_the_named_outputs_rows(resnet50, tmp_path, cli):
    import tensorflow as tf

    import zoo
    from zoo.features import select
    from zoo.preprocess import tf_eval_image

    out = tmp_path / "feats.npy"
    code, stdout, err = cli("features", "resnet50@keras", DATA / "photos", "--layer", "conv4_block6_out", "--pooling", "max",
                            "--input-size", "160x192", "--weights", resnet50.weights, "--batch-size", "3", "-o", out)
    assert code == 0, err
    print(stdout, end="")
    feats, paths = np.load(out), out.with_suffix(".txt").read_text().splitlines()
    assert feats.shape == (4, 1024) and feats.dtype == np.float32
    assert paths == [str(DATA / "photos" / f"{p}.jpg") for p in ("astronaut", "chelsea", "coffee", "rocket")]
    model = zoo.create_model("resnet50@keras", weights=resnet50.weights, outputs=["conv4_block6_out"], pooling="max", input_size=SIZE)
    part = select(zoo.get_spec("resnet50@keras"), input_size=SIZE)
    x = np.stack([tf_eval_image(tf.io.read_file(p), part).numpy() for p in paths])
    assert_close(feats, np.asarray(model(x, training=False)), "zoo features vs create_model(outputs=...)")
    code, _, err = cli("features", "resnet50@keras", DATA / "photos", "-o", tmp_path / "feats.csv")
    assert code == 1 and "must end in .npy" in err and len(err.strip().splitlines()) == 1


def test_headless_onnx_export_takes_any_size(resnet50, tmp_path, cli):
    import onnxruntime as ort

    code, stdout, err = cli("export", resnet50.weights, "--format", "onnx", "--include-top", "false", "--pooling", "avg",
                            "--out", tmp_path)
    assert code == 0, err
    print(stdout, end="")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    image = session.get_inputs()[0]
    assert image.name == "image" and image.shape == ["batch", "height", "width", 3]
    assert [o.name for o in session.get_outputs()] == ["features"]
    (at_224,) = session.run(["features"], {"image": resnet50.x})
    (at_size,) = session.run(["features"], {"image": resnet50.x_size})
    assert_close(at_224, resnet50.intermediate["avg_pool"], "ONNX Runtime, headless, at 224x224")
    assert_close(at_size, resnet50.headless["avg"], f"ONNX Runtime, headless, at {SIZE[0]}x{SIZE[1]}")
    # zoo's own sessions plan the graph for the one size they will run (session_options(size=...)): the same
    # features, and zoo predict's session is fixed at the size its preprocessing gives
    from zoo.backends.onnx import session_options
    from zoo.predict import OnnxPredictor

    fixed = ort.InferenceSession(str(tmp_path / "model.onnx"), session_options(size=SIZE), providers=["CPUExecutionProvider"])
    assert fixed.get_inputs()[0].shape == ["batch", *SIZE, 3]
    assert_close(fixed.run(["features"], {"image": resnet50.x_size})[0], resnet50.headless["avg"], "ONNX Runtime, planned for the size")
    assert OnnxPredictor(tmp_path / "model.onnx").session.get_inputs()[0].shape == ["batch", 224, 224, 3]
