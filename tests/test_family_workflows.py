"""Every family through the whole workflow on its narrow variant: weights written by real Caffe converted,
fine-tuned (the last layers, a new 2-class head), exported (each export checked against the Keras model
by export itself), and the export used by `zoo predict`."""

import json

import pytest
from conftest import DATA
from narrow import CAFFE, register_narrow_specs

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
