import json
import os
import pickle

import numpy as np
import pytest
from conftest import small_layers
from py2pickle import save_py2_npy
from safetensors import safe_open

from zoo import ZooError
from zoo.conversion import convert
from zoo.registry import load_weights
from zoo.weights import file_digest


def test_full_size_dict_of_dicts_converts_to_verified_safetensors(seeded_npy, seeded_safetensors, seeded_layers, cli):
    with safe_open(seeded_safetensors, framework="numpy") as f:
        meta = f.metadata()
        np.testing.assert_array_equal(f.get_tensor("fc6.kernel"), seeded_layers["fc6"][0])
        np.testing.assert_array_equal(f.get_tensor("conv2.bias"), seeded_layers["conv2"][1])
        assert len(f.keys()) == 16
    assert meta["spec"] == "alexnet@bvlc" and meta["family"] == "alexnet" and meta["version"] == "bvlc"
    assert meta["fingerprint"] == "ac91ae9fd0aff751"
    assert meta["source_sha256"] == file_digest(seeded_npy)
    assert meta["source_format"] == "caffe-tensorflow-npy" and meta["plugin"] == "caffe"
    assert meta["plugin_package"] == "zoo" and meta["plugin_version"]
    code, out, _ = cli("verify", seeded_safetensors, "--json")
    assert code == 0 and json.loads(out)["spec"] == "alexnet@bvlc"


def test_source_sha256_is_recorded_on_request_or_when_the_name_can_be_checked(tmp_path, cli, tiny_spec):
    src = tmp_path / "tiny.npy"
    np.save(src, {k: {"weights": w, "biases": b} for k, (w, b) in small_layers().items()})
    code, out, _ = cli("convert", src)
    assert code == 0 and " sha256 " not in out and "source_sha256" not in load_weights(tmp_path / "tiny.safetensors").metadata
    code, out, _ = cli("convert", src, "--sha256", "-o", tmp_path / "hashed.safetensors")
    assert code == 0 and f"sha256 {file_digest(src)[:16]}" in out
    assert load_weights(tmp_path / "hashed.safetensors").metadata["source_sha256"] == file_digest(src)


def test_python2_dict_of_lists_as_in_the_seed_tutorial(tmp_path, cli):
    layers = small_layers()
    src = tmp_path / "seed.npy"
    save_py2_npy(src, layers)
    # numpy itself reads the file the same way (the emitter is faithful to Python 2's cPickle)
    theirs = np.load(src, allow_pickle=True, encoding="latin1").item()
    np.testing.assert_array_equal(theirs["fc2"][0], layers["fc2"][0])
    from conftest import TinySpecPlugin

    from zoo.plugins import get_plugins

    get_plugins().register(TinySpecPlugin(), name="tiny-specs")
    code, out, err = cli("convert", "caffe", src, "-o", tmp_path / "out.safetensors")
    assert code == 0, err
    w = load_weights(tmp_path / "out.safetensors")
    assert w.spec.id == "tiny@test"
    np.testing.assert_array_equal(w.tensors["conv1.kernel"], layers["conv1"][0])
    np.testing.assert_array_equal(w.tensors["fc2.bias"], layers["fc2"][1])


def test_format_is_recognised_without_naming_the_source(tmp_path, tiny_spec, cli):
    src = tmp_path / "w.npy"
    np.save(src, small_layers())
    code, out, err = cli("convert", src)
    assert code == 0, err
    assert (tmp_path / "w.safetensors").exists() and "tiny@test" in out


def test_float64_is_stored_as_the_spec_dtype_with_a_note(tmp_path, tiny_spec):
    layers = {k: [w.astype(np.float64), b] for k, (w, b) in small_layers().items()}
    np.save(tmp_path / "w.npy", layers)
    result = convert(tmp_path / "w.npy")
    assert any("float64" in n for n in result.notes)
    assert load_weights(result.output).tensors["fc2.kernel"].dtype == np.float32


def test_a_fine_tuned_head_matches_the_reheaded_spec(tmp_path, seeded_layers):
    layers = dict(seeded_layers)
    layers["fc8"] = (np.zeros((4096, 2), np.float32), np.zeros(2, np.float32))
    np.save(tmp_path / "alexnet_ft.npy", layers)  # AlexNet and CaffeNet have the same tensors: the name says which
    w = load_weights(convert(tmp_path / "alexnet_ft.npy").output)
    assert w.spec.id == "alexnet@bvlc" and w.spec.num_classes == 2


def _bad(tmp_path, layers, name="bad.npy"):
    src = tmp_path / name
    np.save(src, layers)
    return src


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("fc2"), r"fc2: missing"),
    (lambda d: d.update(conv1=[np.zeros((5, 5, 3, 4), np.float32), d["conv1"][1]]), r"\(5, 5, 3, 4\) != \(3, 3, 3, 4\)"),
    (lambda d: d.update(extra=[np.zeros(3, np.float32)]), r"extra: no layer 'extra' in the spec"),
])
def test_mismatched_tensors_are_listed(tmp_path, tiny_spec, cli, edit, message):
    layers = small_layers()
    edit(layers)
    code, _, err = cli("convert", "caffe", _bad(tmp_path, layers))
    assert code == 1
    assert err.count("\n") == 1 and str(tmp_path / "bad.npy") in err
    import re

    assert re.search(message, err)
    assert not (tmp_path / "bad.safetensors").exists()


def test_every_problem_is_listed_at_once(tmp_path, tiny_spec):
    layers = small_layers()
    layers["conv1"][0][0, 0, 0, 0] = np.nan
    layers["fc2"] = [layers["fc2"][0]]  # no bias
    with pytest.raises(ZooError) as e:
        convert(_bad(tmp_path, layers), spec="tiny@test")
    assert "fc2.biases: missing" in str(e.value)  # named as the file names them


def test_non_finite_values_are_refused(tmp_path, tiny_spec):
    layers = small_layers()
    layers["conv1"][0][0, 0, 0, 0] = np.inf
    with pytest.raises(ZooError, match="conv1.kernel holds NaN or infinite"):
        convert(_bad(tmp_path, layers))
    assert os.listdir(tmp_path) == ["bad.npy"]


def test_wrong_formats_get_one_clear_line(tmp_path, cli):
    cases = {
        "empty.npy": b"",
        "text.npy": b"hello, I am not numpy",
        "plain.npy": None,
        "truncated.npy": "truncate",
    }
    np.save(tmp_path / "plain.npy", np.zeros(3))
    np.save(tmp_path / "truncated.npy", small_layers())
    data = (tmp_path / "truncated.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[: len(data) // 2])
    for name, content in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        code, out, err = cli("convert", "caffe", tmp_path / name)
        assert code == 1, name
        assert err.startswith(f"zoo: error: {tmp_path / name}:") and err.count("\n") == 1, err
    code, _, err = cli("convert", tmp_path / "text.npy")
    assert code == 1 and "no weight source recognises it" in err
    assert sorted(os.listdir(tmp_path)) == sorted(cases)  # no output, no temporary file


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_spec, monkeypatch, cli):
    src = _bad(tmp_path, small_layers(), "w.npy")

    def disk_full(fd, offset, length):
        os.write(fd, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", disk_full)
    code, _, err = cli("convert", src)
    assert code == 1 and err.strip().endswith("w.safetensors: cannot write: No space left on device")
    assert os.listdir(tmp_path) == ["w.npy"]


def test_existing_output_is_untouched_when_a_convert_fails(tmp_path, tiny_spec):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"previous good file")
    layers = small_layers()
    layers["conv1"][1][0] = np.nan
    with pytest.raises(ZooError):
        convert(_bad(tmp_path, layers, "w.npy"), output=out)
    assert out.read_bytes() == b"previous good file"


def test_mapped_load_gives_the_same_tensors_as_views_and_catches_nan(tmp_path, tiny_spec):
    result = convert(_bad(tmp_path, small_layers(), "w.npy"))
    copied, mapped = load_weights(result.output), load_weights(result.output, mapped=True)
    for name, arr in copied.tensors.items():
        np.testing.assert_array_equal(mapped.tensors[name], arr)
        assert not mapped.tensors[name].flags.writeable and not mapped.tensors[name].flags.owndata
        mapped.release(mapped.tensors[name])  # pages go; the values come back from the file when read
        np.testing.assert_array_equal(mapped.tensors[name], arr)
    good = result.output.read_bytes()
    result.output.write_bytes(good[:-4] + np.array([np.nan], np.float32).tobytes())
    with pytest.raises(ZooError, match="holds NaN"):
        load_weights(result.output, mapped=True)


def test_verify_catches_tampering(tmp_path, tiny_spec, cli):
    result = convert(_bad(tmp_path, small_layers(), "w.npy"))
    good = result.output.read_bytes()
    # flip a tensor's last data byte into a NaN
    nan = good[:-4] + np.array([np.nan], np.float32).tobytes()
    (tmp_path / "nan.safetensors").write_bytes(nan)
    code, _, err = cli("verify", tmp_path / "nan.safetensors")
    assert code == 1 and "NaN" in err
    (tmp_path / "cut.safetensors").write_bytes(good[:-10])
    code, _, err = cli("verify", tmp_path / "cut.safetensors")
    assert code == 1 and "cut.safetensors" in err and err.count("\n") == 1


def test_verify_refuses_a_file_for_a_changed_spec(tmp_path, tiny_spec, cli):
    from safetensors.numpy import save_file

    result = convert(_bad(tmp_path, small_layers(), "w.npy"))
    w = load_weights(result.output)
    meta = dict(w.metadata, fingerprint="0123456789abcdef")
    save_file(w.tensors, tmp_path / "old.safetensors", metadata=meta)
    code, _, err = cli("verify", tmp_path / "old.safetensors")
    assert code == 1 and "different tiny@test" in err
    save_file(w.tensors, tmp_path / "plain.safetensors")
    code, _, err = cli("verify", tmp_path / "plain.safetensors")
    assert code == 1 and "without zoo metadata" in err


def test_hostile_pickle_is_refused_before_it_runs(tmp_path, cli):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.npy"
    np.save(src, {"conv1": [Payload()]}, allow_pickle=True)
    code, _, err = cli("convert", "caffe", src)
    assert code == 1 and "system" in err and "not on zoo's allow-list" in err
    assert not marker.exists()
    # the same file does run its payload under np.load(allow_pickle=True): the test is real
    np.load(src, allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_all_pickle_protocols_numpy_writes(tmp_path, tiny_spec, protocol):
    layers = small_layers()
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    header += b" " * (63 - len(header)) + b"\n"
    arr = np.empty((), dtype=object)
    arr[()] = layers
    (tmp_path / "p.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
                                     + pickle.dumps(arr, protocol=protocol))
    w = load_weights(convert(tmp_path / "p.npy").output)
    np.testing.assert_array_equal(w.tensors["fc2.kernel"], layers["fc2"][0])


def test_alexnet_and_caffenet_have_the_same_tensors_so_the_name_or_spec_decides(tmp_path, seeded_npy, cli):
    code, out, err = cli("convert", seeded_npy, "-o", tmp_path / "a.safetensors")  # bvlc_alexnet.npy
    assert code == 0 and "also fit caffenet@bvlc; chose alexnet@bvlc (from the file name)" in out, out + err
    anonymous = tmp_path / "weights.npy"
    anonymous.symlink_to(seeded_npy)
    code, out, err = cli("convert", anonymous, "-o", tmp_path / "b.safetensors")
    assert code == 1 and "fit several specs (alexnet@bvlc, caffenet@bvlc); choose one with --spec" in err
    code, out, err = cli("convert", anonymous, "-o", tmp_path / "c.safetensors", "--spec", "caffenet@bvlc")
    assert code == 0 and "caffenet@bvlc" in out
