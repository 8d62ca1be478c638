import json

import pytest

from zoo import ZooError, get_spec
from zoo.spec import ModelSpec


def test_alexnet_versions_have_the_published_parameter_counts():
    assert get_spec("alexnet").id == "alexnet@bvlc"  # the default version
    assert get_spec("alexnet@bvlc").num_params == 60_965_224
    assert get_spec("alexnet@torchvision").num_params == 61_100_840


def test_bvlc_shapes_follow_caffe():
    spec = get_spec("alexnet@bvlc")
    t = spec.tensors
    assert t["conv1.kernel"].shape == (11, 11, 3, 96)
    assert t["conv2.kernel"].shape == (5, 5, 48, 256)  # group 2
    assert t["conv4.kernel"].shape == (3, 3, 192, 384)
    assert t["conv5.kernel"].shape == (3, 3, 192, 256)
    assert t["fc6.kernel"].shape == (9216, 4096)
    assert [spec.node(n).output_shape for n in ("conv1", "pool1", "pool2", "pool5")] == [
        (55, 55, 96), (27, 27, 96), (13, 13, 256), (6, 6, 256)]
    assert spec.input["channel_order"] == "BGR" and spec.input_shape == (227, 227, 3)


def test_torchvision_shapes():
    spec = get_spec("alexnet@torchvision")
    assert spec.tensors["conv1.kernel"].shape == (11, 11, 3, 64)
    assert spec.node("pool5").output_shape == (6, 6, 256)
    assert not any(i.kind == "lrn" for i in spec.nodes)


def test_fingerprint_is_stable_and_tracks_what_the_weights_mean():
    bvlc = get_spec("alexnet@bvlc")
    again = ModelSpec.from_dict(bvlc.to_dict())
    assert again.fingerprint == bvlc.fingerprint
    assert get_spec("alexnet@torchvision").fingerprint != bvlc.fingerprint
    data = bvlc.to_dict()
    data["layers"][1]["alpha"] = 1e-3  # LRN alpha: same shapes, different computation
    assert ModelSpec.from_dict(data).fingerprint != bvlc.fingerprint
    data = bvlc.to_dict()
    data["description"] = "edited prose"  # prose is not part of the fingerprint
    assert ModelSpec.from_dict(data).fingerprint == bvlc.fingerprint


def test_with_num_classes_reheads_only_the_head():
    spec = get_spec("alexnet").with_num_classes(2)
    assert spec.tensors["fc8.kernel"].shape == (4096, 2)
    assert spec.tensors["fc7.kernel"].shape == (4096, 4096)
    assert spec.fingerprint != get_spec("alexnet").fingerprint
    with pytest.raises(ZooError):
        get_spec("alexnet").with_num_classes(0)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"].append({"name": "x", "kind": "warp"}), "unknown kind"),
    (lambda d: d["layers"][3].update(groups=5), "groups=5"),
    (lambda d: d.update(head="fc9"), "head"),
    (lambda d: d["layers"][0].update(name="conv2"), "unique"),
    (lambda d: d.update(num_classes=10), "num_classes"),
    (lambda d: d["layers"][2].update(pad=3), "padding"),
    (lambda d: d["layers"][5].update(inputs=["fc8"]), "not an earlier layer"),
    (lambda d: d["layers"][1].update(stride=2), "unknown config stride"),
    (lambda d: d.pop("layers"), "layers"),
])
def test_invalid_specs_are_rejected_with_the_reason(edit, message):
    data = get_spec("alexnet@bvlc").to_dict()
    edit(data)
    with pytest.raises(ZooError, match=message):
        ModelSpec.from_dict(data)


def test_unknown_names_list_what_exists():
    with pytest.raises(ZooError, match="known: alexnet"):
        get_spec("resnet")
    with pytest.raises(ZooError, match="alexnet@bvlc, alexnet@torchvision"):
        get_spec("alexnet@caffe2")


def test_plugin_specs_join_the_registry(tiny_spec, cli):
    assert tiny_spec.num_params == 3 * 3 * 3 * 4 + 4 + 64 * 3 + 3
    code, out, _ = cli("list")
    assert code == 0 and "tiny@test" in out and "alexnet@torchvision" in out


def test_list_and_info_json(cli):
    code, out, _ = cli("list", "--json")
    listed = json.loads(out)
    assert [s["id"] for s in listed["alexnet"]] == ["alexnet@bvlc", "alexnet@torchvision"]
    code, out, _ = cli("info", "alexnet@torchvision", "--json")
    info = json.loads(out)
    assert code == 0 and info["num_params"] == 61_100_840
    assert info["input"]["mean"] == [0.485, 0.456, 0.406]
    assert info["provenance"]["reference_files"]["alexnet-owt-7be5be79.pth"]["sha256_prefix"] == "7be5be79"
    fc6 = next(layer for layer in info["layers"] if layer["name"] == "fc6")
    assert fc6["tensors"][0] == {"name": "fc6.kernel", "shape": [9216, 4096], "layout": "IO", "dtype": "float32"}
    code, out, _ = cli("info", "alexnet")
    assert code == 0 and "group" in out and "fc8" in out and "57.1" in out
    code, _, err = cli("info", "nope")
    assert code == 1 and err.startswith("zoo: error: unknown model")


def test_weights_written_before_specs_were_graphs_still_fit():
    from zoo.spec import fingerprint_v1

    assert fingerprint_v1(get_spec("alexnet@bvlc")) == "03c3fb5195d68b99"  # what zoo 0.1 wrote into every file
    assert fingerprint_v1(get_spec("resnet50@torchvision")) is None  # not expressible before


def test_the_fingerprint_covers_the_wiring():
    data = get_spec("googlenet@bvlc").to_dict()
    concat = next(layer for layer in data["layers"] if layer["name"] == "inception_3a_output")
    a, b, c, d = concat["inputs"]  # the 5x5 branch and the pool projection both have 32 channels
    concat["inputs"] = [a, b, d, c]  # same shapes and tensors, other wiring
    assert ModelSpec.from_dict(data).fingerprint != get_spec("googlenet@bvlc").fingerprint


def test_generated_spec_files_are_what_the_builders_write():
    from conftest import DATA

    from zoo.specs.builders import HERE, dumps, specs

    for name, spec in specs(DATA / "caffe" / "published").items():
        assert (HERE / name).read_text() == dumps(spec), f"{name} differs from its builder: run python -m zoo.specs.builders"
