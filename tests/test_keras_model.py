import json

import numpy as np
import pytest
from conftest import small_layers

from zoo import ZooError


def naive_conv(x, w, b, stride, pad, groups):
    """Reference convolution (NHWC, HWIO with in/groups), written out with numpy."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k, _, cin_g, cout = w.shape
    n, h, wd, _ = x.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    cout_g = cout // groups
    for g in range(groups):
        xg = x[..., g * cin_g:(g + 1) * cin_g]
        wg = w[..., g * cout_g:(g + 1) * cout_g]
        for i in range(oh):
            for j in range(ow):
                patch = xg[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
                out[:, i, j, g * cout_g:(g + 1) * cout_g] = np.tensordot(patch, wg, axes=([1, 2, 3], [0, 1, 2]))
    return out + b


def caffe_lrn(x, size, alpha, beta, k):
    """Caffe's LRN across channels: x / (k + alpha/size * sum_{window} x^2) ** beta."""
    c = x.shape[-1]
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (0, 0), (0, 0), (size // 2, size // 2)))
    window = sum(sq[..., i:i + c] for i in range(size))
    return x / (k + alpha / size * window) ** beta


@pytest.mark.parametrize("groups, pad, stride", [(1, 0, 1), (2, 2, 1), (2, 1, 1), (1, 2, 4), (4, 1, 2)])
def test_spec_conv_matches_a_naive_grouped_convolution(groups, pad, stride):
    from zoo.keras_model import SpecConv2D

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 13, 13, 8)).astype(np.float32)
    k = 5 if pad == 2 else 3
    w = rng.normal(size=(k, k, 8 // groups, 8)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    layer = SpecConv2D(8, k, stride=stride, pad=pad, groups=groups)
    layer.build(x.shape)
    layer.set_weights([w, b])
    np.testing.assert_allclose(layer(x).numpy(), naive_conv(x, w, b, stride, pad, groups), rtol=1e-4, atol=1e-4)


def test_lrn_matches_caffe_formula():
    from zoo.keras_model import CaffeLRN

    x = np.random.default_rng(2).uniform(0, 40, size=(2, 5, 5, 12)).astype(np.float32)
    got = CaffeLRN(5, 1e-4, 0.75, 1.0)(x).numpy()
    np.testing.assert_allclose(got, caffe_lrn(x, 5, 1e-4, 0.75, 1.0), rtol=1e-5)


def test_layer_names_are_the_spec_names_and_grouped_kernels_are_single_tensors():
    import zoo
    from zoo.keras_model import build_model

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
