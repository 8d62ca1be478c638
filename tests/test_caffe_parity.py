"""The Caffe path end to end against real BVLC Caffe's outputs (tests/data/caffe_alexnet_seed1234.npz)."""

import numpy as np
import pytest
from caffe_reference import caffe_input
from conftest import DATA, scale_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return np.load(DATA / "caffe_alexnet_seed1234.npz")


@pytest.fixture(scope="module")
def bvlc_model(seeded_safetensors):
    import zoo

    return zoo.create_model("alexnet", weights=seeded_safetensors)


def test_cli_converted_weights_reproduce_caffe(tmp_path, seeded_npy, reference, cli):
    import keras

    import zoo

    out = tmp_path / "bvlc_alexnet.safetensors"
    code, _, err = cli("convert", "caffe", seeded_npy, "-o", out)
    assert code == 0, err
    model = zoo.create_model("alexnet", weights=out)
    logits = model.predict(caffe_input(), verbose=0)
    assert scale_error(logits, reference["fc8"]) < 1e-4
    prob = keras.ops.softmax(logits).numpy()
    assert scale_error(prob, reference["prob"]) < 1e-4
    np.testing.assert_array_equal(np.argsort(-logits, 1)[:, :5], np.argsort(-reference["fc8"], 1)[:, :5])


def test_intermediate_activations_match_caffe(bvlc_model, reference):
    """pool5 checks LRN and grouped convs; fc6 checks the flatten order."""
    import keras

    probe = keras.Model(bvlc_model.input, [bvlc_model.get_layer("pool5").output, bvlc_model.get_layer("fc6").output])
    pool5, fc6 = probe.predict(caffe_input(), verbose=0)
    assert scale_error(pool5, reference["pool5"].transpose(0, 2, 3, 1)) < 1e-5
    assert scale_error(fc6, reference["fc6"]) < 1e-5


def test_the_classic_mistakes_would_be_caught(bvlc_model, reference):
    """TF's alpha without Caffe's division by size moves the logits far beyond the tolerance."""
    import zoo
    from zoo.backends.keras import model_tensors

    spec = zoo.get_spec("alexnet").to_dict()
    for layer in spec["layers"]:
        if layer["kind"] == "lrn":
            layer["alpha"] *= 5
    from zoo.backends.keras import build_model
    from zoo.spec import ModelSpec

    wrong = ModelSpec.from_dict(spec)
    model = build_model(wrong, model_tensors(bvlc_model, zoo.get_spec("alexnet")))
    assert scale_error(model.predict(caffe_input(), verbose=0), reference["fc8"]) > 1e-2
