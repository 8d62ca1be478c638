import json

import numpy as np
import pytest
from conftest import small_layers

from zoo import ZooError


def test_layer_names_are_the_spec_names_and_grouped_kernels_are_single_tensors():
    import zoo
    from zoo.backends.keras import build_model

    spec = zoo.get_spec("alexnet")
    model = build_model(spec)
    assert [layer.name for layer in model.layers[1:]] == spec.layer_names
    assert [tuple(v.shape) for v in model.get_layer("conv2").weights] == [(5, 5, 48, 256), (256,)]
    assert model.count_params() == spec.num_params


def test_create_model_replaces_the_head_when_classes_differ(tmp_path, tiny_spec):
    import zoo

    np.save(tmp_path / "w.npy", small_layers())
    out = zoo.convert(tmp_path / "w.npy").output
    same = zoo.create_model("tiny", weights=out)
    np.testing.assert_array_equal(same.get_layer("fc2").get_weights()[0], small_layers()["fc2"][0])
    two = zoo.create_model("tiny", weights=out, num_classes=2)
    assert two.output_shape == (None, 2)
    np.testing.assert_array_equal(two.get_layer("conv1").get_weights()[0], small_layers()["conv1"][0])
    # built holding the weights, the layers' configs still say what a fresh layer uses: the model serialises
    config = json.loads(two.to_json())["config"]["layers"]
    assert {layer["config"].get("kernel_initializer", {}).get("class_name") for layer in config} >= {"GlorotUniform"}
    with pytest.raises(ZooError, match="weights are for tiny@test, not alexnet"):
        zoo.create_model("alexnet", weights=out)
