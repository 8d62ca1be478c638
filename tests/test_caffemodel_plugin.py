"""The out-of-tree zoo-caffemodel plugin, installed with pip like any third-party plugin (Makefile)."""

import json
import os

import numpy as np
import pytest
from caffe_proto import PB, write_caffemodel
from caffe_reference import caffe_input, caffe_weights
from conftest import DATA, fuzz_convert

from zoo.conversion import convert
from zoo.registry import load_weights

GROUPS = {"conv2": 2, "conv4": 2, "conv5": 2}


def test_plugin_is_installed_and_loaded_through_its_entry_point(cli):
    code, out, _ = cli("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and "caffemodel" in rows, "pip install plugins/zoo-caffemodel (make install does)"
    row = rows["caffemodel"]
    assert row["package"] == "zoo-caffemodel" and row["version"] == "0.1.0" and not row["builtin"]
    assert row["module"] == "zoo_caffemodel" and row["weight_sources"] == ["caffemodel"] and not row["error"]


@pytest.fixture(scope="module")
def reference_net(module_folder):
    """The Caffe reference AlexNet's seeded weights as .caffemodel files, current and V1 layout."""
    folder = module_folder("caffemodel")
    weights = caffe_weights()
    write_caffemodel(folder / "alexnet.caffemodel", weights, GROUPS)
    write_caffemodel(folder / "alexnet_v1.caffemodel", weights, GROUPS, v1=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet.caffemodel", "alexnet_v1.caffemodel"])
def test_caffemodel_reproduces_real_caffe(reference_net, tmp_path, cli, name):
    import zoo

    out = tmp_path / "w.safetensors"
    prototxt = DATA / "deploy.prototxt"
    code, stdout, err = cli("convert", "caffemodel", reference_net / name, "-o", out, "--prototxt", prototxt)
    assert code == 0, err
    assert ("V1 layers" if "v1" in name else "(layer,") in stdout
    assert "layer names and groups agree with alexnet@bvlc" in stdout
    assert "is not that of the published bvlc_alexnet.caffemodel" in stdout
    ref = np.load(DATA / "caffe_alexnet_seed1234.npz")
    logits = zoo.create_model("alexnet", weights=out).predict(caffe_input(), verbose=0)
    assert np.abs(logits - ref["fc8"]).max() / np.abs(ref["fc8"]).max() < 1e-4
    np.testing.assert_array_equal(np.argsort(-logits, 1)[:, :5], np.argsort(-ref["fc8"], 1)[:, :5])


def small_net():
    rng = np.random.default_rng(0)
    return {"conv1": (rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)),
            "fc2": (rng.normal(size=(3, 64)).astype(np.float32), rng.normal(size=3).astype(np.float32))}


def test_python_api_and_prototxt_differences(tmp_path, tiny_spec):
    write_caffemodel(tmp_path / "t.caffemodel", small_net(), v1=True)
    (tmp_path / "deploy.prototxt").write_text('name: "t"\nlayer { name: "conv1" type: "Convolution" convolution_param { group: 2 } }\n')
    result = convert(tmp_path / "t.caffemodel", options={"prototxt": str(tmp_path / "deploy.prototxt")})
    assert any("prototxt says conv1 has group 2, tiny@test has 1" in n for n in result.notes)
    assert any("no layer 'fc2'" in n for n in result.notes)
    w = load_weights(result.output)
    np.testing.assert_array_equal(w.tensors["conv1.kernel"], small_net()["conv1"][0].transpose(2, 3, 1, 0))


def test_genuine_file_is_recognised_by_the_specs_sha1(tmp_path, tiny_spec):
    import hashlib

    from zoo_caffemodel import genuine_notes

    write_caffemodel(tmp_path / "t.caffemodel", small_net())
    sha1 = hashlib.sha1((tmp_path / "t.caffemodel").read_bytes()).hexdigest()
    published = tiny_spec.to_dict() | {"provenance": {"reference_files": {"t.caffemodel": {"sha1": sha1}}}}
    from zoo.spec import ModelSpec

    assert genuine_notes(ModelSpec.from_dict(published), tmp_path / "t.caffemodel") == [
        f"genuine: sha1 {sha1} is that of the published t.caffemodel"]


def _blob_with_bad_shape():
    net = PB["NetParameter"](name="bad")
    layer = net.layer.add(name="conv1", type="Convolution")
    blob = layer.blobs.add()
    blob.shape.dim.extend([4, 3, 3, 3])
    blob.data.extend([0.0] * 100)  # 108 declared
    return net.SerializeToString()


def test_hostile_and_broken_files(tmp_path, tiny_spec, cli):
    write_caffemodel(tmp_path / "good.caffemodel", small_net())
    good = (tmp_path / "good.caffemodel").read_bytes()
    cases = {
        "truncated.caffemodel": (good[: len(good) - 37], "claims"),
        "empty.caffemodel": (b"", "no layers"),
        "wiretype.caffemodel": (b"\x0b" + good, "unsupported wire type 3"),
        "shape.caffemodel": (_blob_with_bad_shape(), "declares shape (4, 3, 3, 3) (108 values) but holds 100"),
        # a layer field claiming 2**62 bytes: refused before anything is allocated
        "absurd.caffemodel": (b"\xa2\x06" + bytes([0x80] * 8) + b"\x40" + good, "claims"),
        "text.caffemodel": (b"name: 'not binary'", ""),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    before = set(os.listdir(tmp_path))
    for name, (_, message) in cases.items():
        code, _, err = cli("convert", "caffemodel", tmp_path / name)
        assert code == 1 and err.startswith(f"zoo: error: {tmp_path / name}: ") and err.count("\n") == 1, err
        assert message in err, err
    assert set(os.listdir(tmp_path)) == before


def test_mutated_caffemodels_fail_cleanly(tmp_path, tiny_spec):
    write_caffemodel(tmp_path / "ok.caffemodel", small_net())
    assert fuzz_convert(tmp_path, (tmp_path / "ok.caffemodel").read_bytes(), ".caffemodel", "caffemodel", 300, seed=11) > 100


def test_unknown_source_options_are_refused(tmp_path, tiny_spec, cli):
    write_caffemodel(tmp_path / "t.caffemodel", small_net())
    code, _, err = cli("convert", "caffemodel", tmp_path / "t.caffemodel", "--protottxt", "x")
    assert code == 1 and "does not take --protottxt (its options: --prototxt)" in err
    code, _, err = cli("convert", "caffe", tmp_path / "t.caffemodel", "--prototxt", "x")
    assert code == 1 and "does not take --prototxt" in err


def test_prototxt_is_read_by_protobuf_with_caffes_schema(tmp_path):
    """Caffe's own compiled caffe.proto: V1 `layers` with enum types, defaults as Caffe has them, round_mode,
    and a binary or malformed file refused in one line."""
    from zoo_caffemodel.prototxt import layer_settings, read_prototxt
    from zoo_caffemodel.to_spec import spec_layers

    from zoo.errors import ZooError

    (tmp_path / "v1.prototxt").write_text('name: "old"\nlayers { name: "conv1" type: CONVOLUTION convolution_param { num_output: 4 group: 2 } }\n')
    assert layer_settings(read_prototxt(tmp_path / "v1.prototxt")) == {"conv1": {"type": "CONVOLUTION", "group": 2}}
    text = ('input: "data" input_dim: 1 input_dim: 3 input_dim: 9 input_dim: 9\n'
            'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { kernel_size: 3 stride: 2 round_mode: FLOOR } }\n'
            'layer { name: "n" type: "LRN" bottom: "p" top: "n" lrn_param { alpha: 1e-4 } }\n')
    layers, size = spec_layers(text)
    assert size == [9, 9] and layers[0] == {"name": "p", "kind": "maxpool", "size": 3, "stride": 2, "pad": 0, "rounding": "floor"}
    assert layers[1] == {"name": "n", "kind": "lrn", "size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}  # Caffe's defaults
    (tmp_path / "bin.prototxt").write_bytes(b"\x08\x96\x01\xff\xfe")
    (tmp_path / "bad.prototxt").write_text("layer { name: ")
    for name, message in (("bin.prototxt", "not UTF-8 text"), ("bad.prototxt", "not a valid prototxt")):
        with pytest.raises(ZooError, match=message) as e:
            read_prototxt(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
