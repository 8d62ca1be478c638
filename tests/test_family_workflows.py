"""Every family through the whole workflow on its narrow variant: weights written by real Caffe converted,
fine-tuned (the last layers, a new 2-class head), exported (each export checked against the Keras model
by export itself), and the export used by `zoo predict`."""

import json

import pytest
from conftest import DATA
from narrow import CAFFE, NarrowCaffeSpecs, register_narrow_specs

# narrow net -> the layers to train (the head and the layer or block before it)
TRAIN = {"caffenet": ["fc7", "fc8"], "googlenet": ["inception_5b*", "loss3_classifier"],
         "vgg16": ["fc8"], "resnet50": ["res5c*", "scale5c*", "bn5c*", "fc1000"]}
FORMATS = {"caffenet": "onnx", "googlenet": "onnx,savedmodel", "vgg16": "onnx", "resnet50": "onnx,savedmodel"}


@pytest.fixture(autouse=True)
def _narrow_specs():
    register_narrow_specs()


@pytest.mark.parametrize("name", list(TRAIN))
def test_convert_finetune_export_predict(name, tmp_path, example_data, cli):
    weights = tmp_path / "w.safetensors"
    code, _, err = cli("convert", "caffemodel", CAFFE / f"{name}_narrow.caffemodel", "-o", weights, "--spec", f"{name}-narrow@test")
    assert code == 0, err
    run = tmp_path / "run"
    code, out, err = cli("finetune", f"{name}-narrow", "--weights", weights, "--data", example_data, "--head", "2", "--epochs", "2",
                         "--batch-size", "16", "--train", ",".join(TRAIN[name]), "--no-augment", "--out", run,
                         "--export", FORMATS[name], "--json")
    assert code == 0, err
    result = json.loads(out[out.index("{"):])
    assert result["cached_features"] and result["trained_layers"][-1] == TRAIN[name][-1]
    assert {p.name for p in (run / "exported").iterdir()} >= {"model.onnx", "classes.txt"}
    photos = sorted((DATA / "photos").glob("*.jpg"))[:2]
    code, out, err = cli("predict", run / "exported" / "model.onnx", *photos, "--top", "2", "--json")
    assert code == 0, err
    predictions = json.loads(out)
    assert [len(p["top"]) for p in predictions] == [2, 2] and {c for p in predictions for c, _ in p["top"]} <= {"circle", "square"}


def test_published_googlenet_files_carry_auxiliary_classifiers_that_are_dropped(tmp_path, cli):
    """bvlc_googlenet.caffemodel holds the training-only loss1/ and loss2/ heads beside the deploy net."""
    import numpy as np
    from caffe_proto import PB

    net = PB["NetParameter"]()
    for name in ("loss1/conv", "loss2/classifier"):
        layer = net.layer.add(name=name, type="InnerProduct")
        blob = layer.blobs.add()
        blob.shape.dim.extend([3, 2])
        blob.data.extend(np.ones(6).tolist())
    path = tmp_path / "bvlc_googlenet.caffemodel"  # protobuf appends repeated fields: the same net plus two layers
    path.write_bytes((CAFFE / "googlenet_narrow.caffemodel").read_bytes() + net.SerializeToString())
    code, out, err = cli("convert", "caffemodel", path, "-o", tmp_path / "w.safetensors", "--spec", "googlenet-narrow@test")
    assert code == 1 and "loss1_conv" in err  # the narrow test spec declares no extra layers
    narrow = next(s for s in NarrowCaffeSpecs.specs if s["family"] == "googlenet-narrow")
    narrow["extra_layers"] = ["loss1_*", "loss2_*"]  # as googlenet@bvlc does
    try:
        from zoo.plugins import reset_plugins

        reset_plugins()
        register_narrow_specs()
        code, out, err = cli("convert", "caffemodel", path, "-o", tmp_path / "w.safetensors", "--spec", "googlenet-narrow@test")
    finally:
        del narrow["extra_layers"]
    assert code == 0, err
    assert "dropped layers that googlenet-narrow@test does not have (training only): loss1_conv, loss2_classifier" in out
