"""Keras HDF5 weights written by Keras itself: Keras 3 .weights.h5 and legacy model.save .h5."""

import json
import os

import numpy as np
import pytest
from conftest import fuzz_convert

from zoo import ZooError
from zoo.conversion import convert
from zoo.registry import load_weights


def keras_tiny(names=True):
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((9, 9, 3)),
        L.Conv2D(4, 3, activation="relu", name="conv1" if names else None),
        L.MaxPooling2D(2, 1), L.MaxPooling2D(3, 1), L.Flatten(),
        L.Dense(3, name="fc2" if names else None),
    ])


@pytest.mark.parametrize("filename", ["w.weights.h5", "model.h5"])
@pytest.mark.parametrize("names", [True, False])
def test_keras_files_convert_and_compute_the_same(tmp_path, tiny_spec, cli, filename, names):
    model = keras_tiny(names)
    model.set_weights([np.random.default_rng(i).normal(size=w.shape).astype(np.float32) for i, w in enumerate(model.get_weights())])
    path = tmp_path / filename
    model.save_weights(path) if filename.endswith(".weights.h5") else model.save(path)
    code, out, err = cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert code == 0, err
    if not names:
        assert "by order and shape: conv2d" in out and "-> conv1" in out
    import zoo

    x = np.random.default_rng(9).random((4, 9, 9, 3), dtype=np.float32)
    ours = zoo.create_model("tiny", weights=tmp_path / "out.safetensors")
    np.testing.assert_allclose(ours.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sequential_alexnet_with_default_names_maps_to_bvlc(tmp_path, cli):
    """A Sequential AlexNet as the second seed article builds it (Keras' auto names), saved by Keras."""
    import keras

    keras.backend.clear_session()  # Keras' auto names start again at conv2d, dense
    L = keras.layers
    model = keras.Sequential([
        keras.Input((227, 227, 3)),
        L.Conv2D(96, 11, strides=4, activation="relu"), L.MaxPooling2D(3, 2),
        L.Conv2D(256, 5, padding="same", groups=2, activation="relu"), L.MaxPooling2D(3, 2),
        L.Conv2D(384, 3, padding="same", activation="relu"),
        L.Conv2D(384, 3, padding="same", groups=2, activation="relu"),
        L.Conv2D(256, 3, padding="same", groups=2, activation="relu"), L.MaxPooling2D(3, 2),
        L.Flatten(), L.Dense(4096, activation="relu"), L.Dropout(0.5), L.Dense(4096, activation="relu"), L.Dropout(0.5),
        L.Dense(1000),
    ])
    assert model.layers[-1].name == "dense_2"
    model.save_weights(tmp_path / "alexnet.weights.h5")
    code, out, err = cli("convert", "h5", tmp_path / "alexnet.weights.h5")
    assert code == 0, err
    assert "alexnet@bvlc by order and shape" in out and "conv2d_4 -> conv5" in out and "dense_2 -> fc8" in out
    w = load_weights(tmp_path / "alexnet.safetensors")
    np.testing.assert_array_equal(w.tensors["conv4.kernel"], model.layers[5].get_weights()[0])


def test_explicit_map_and_spec(tmp_path, tiny_spec, cli):
    import keras

    L = keras.layers
    model = keras.Sequential([keras.Input((9, 9, 3)), L.Conv2D(4, 3, name="a"), L.MaxPooling2D(2, 1), L.MaxPooling2D(3, 1),
                              L.Flatten(), L.Dense(3, name="b")])
    model.save_weights(tmp_path / "w.weights.h5")
    (tmp_path / "map.json").write_text(json.dumps({"a": "conv1", "b": "fc2"}))
    code, out, err = cli("convert", "h5", tmp_path / "w.weights.h5", "--map", tmp_path / "map.json", "--spec", "tiny@test")
    assert code == 0 and "by the given map: a -> conv1, b -> fc2" in out
    (tmp_path / "bad.json").write_text(json.dumps({"a": "conv9"}))
    code, _, err = cli("convert", "h5", tmp_path / "w.weights.h5", "--map", tmp_path / "bad.json")
    assert code == 1 and "a: no layer 'conv9' in the spec" in err
    code, _, err = cli("convert", "h5", tmp_path / "w.weights.h5", "--spec", "alexnet@torchvision")
    assert code == 1 and "nearest is alexnet@torchvision" in err


def test_broken_h5_files(tmp_path, tiny_spec, cli):
    import h5py

    model = keras_tiny()
    model.save_weights(tmp_path / "good.weights.h5")
    good = (tmp_path / "good.weights.h5").read_bytes()
    (tmp_path / "truncated.weights.h5").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.h5").write_bytes(b"")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with h5py.File(tmp_path / "huge.weights.h5", "w") as f:
        g = f.create_group("layers/conv1/vars")
        g.attrs["name"] = "conv1"
        g.create_dataset("0", shape=(50_000, 50_000, 10), dtype="f4")  # 100 GB declared, nothing stored
    before = set(os.listdir(tmp_path))
    for name, message in {"truncated.weights.h5": "", "empty.h5": "", "other.h5": "neither Keras 3",
                          "huge.weights.h5": "more than any tensor"}.items():
        code, _, err = cli("convert", "h5", tmp_path / name)
        assert code == 1 and err.startswith(f"zoo: error: {tmp_path / name}: ") and err.count("\n") == 1, err
        assert message in err
    assert set(os.listdir(tmp_path)) == before
    with pytest.raises(ZooError):
        convert(tmp_path / "good.weights.h5", source="torch")


def test_mutated_h5_files_fail_cleanly(tmp_path, tiny_spec):
    keras_tiny().save_weights(tmp_path / "ok.weights.h5")
    assert fuzz_convert(tmp_path, (tmp_path / "ok.weights.h5").read_bytes(), ".h5", "h5", 200, seed=5) > 40


@pytest.mark.parametrize("how", [dict(chunks=True, compression="gzip"), dict(dtype=">f4"), dict()])
def test_h5_datasets_of_every_storage_read_the_same(tmp_path, tiny_spec, how):
    """Contiguous little-endian datasets (Keras' own) are views of the mapped file; chunked, compressed and
    big-endian ones go through h5py: the values are the same."""
    import h5py
    from conftest import small_layers

    layers = small_layers()
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1", b"fc2"]
        for name, arrays in layers.items():
            group = f.create_group(name)
            names = [f"{name}/kernel:0", f"{name}/bias:0"]  # as Keras 2 wrote them: a sub-group per layer
            group.attrs["weight_names"] = [n.encode() for n in names]
            for n, a in zip(names, arrays):
                group.create_dataset(n, data=a, **how)
    w = load_weights(convert(path, output=tmp_path / "w.safetensors").output)
    for name, (kernel, bias) in layers.items():
        np.testing.assert_array_equal(w.tensors[f"{name}.kernel"], kernel)
        np.testing.assert_array_equal(w.tensors[f"{name}.bias"], bias)


def test_mapped_datasets_are_written_from_the_file_and_let_go_chunk_by_chunk(tmp_path, tiny_spec, monkeypatch):
    """Keras' contiguous datasets are written out from the mapped file a chunk at a time, and each chunk's
    pages are released once it is written (Imported.release): the source is never resident beside the output."""
    import h5py
    import zoo.converters.keras_h5 as keras_h5
    from conftest import small_layers

    import zoo.weights

    released = []
    monkeypatch.setattr(zoo.weights, "_CHUNK", 64)  # values per chunk: the small layers span several
    monkeypatch.setattr(zoo.weights, "_RELEASE_MIN", 0)  # arrays under 2 MiB are otherwise left to their neighbours
    monkeypatch.setattr(keras_h5, "release_pages", lambda data, arr: released.append(np.lib.array_utils.byte_bounds(arr)))
    layers = small_layers()
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1", b"fc2"]
        for name, (kernel, bias) in layers.items():
            f.create_group(name).attrs["weight_names"] = [b"kernel:0", b"bias:0"]
            f[name].create_dataset("kernel:0", data=kernel)
            f[name].create_dataset("bias:0", data=bias)
    w = load_weights(convert(path, output=tmp_path / "w.safetensors").output)
    for name, (kernel, bias) in layers.items():
        np.testing.assert_array_equal(w.tensors[f"{name}.kernel"], kernel)
        np.testing.assert_array_equal(w.tensors[f"{name}.bias"], bias)
    spans = sorted(released)
    assert sum(hi - lo for lo, hi in spans) == sum(a.nbytes for arrays in layers.values() for a in arrays)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "a chunk released twice"
    assert max(hi - lo for lo, hi in spans) == 64 * 4 and len(spans) > len(layers) * 2
    released.clear()
    monkeypatch.setattr(zoo.weights, "_RELEASE_MIN", 1 << 21)
    convert(path, output=tmp_path / "again.safetensors")
    assert released == []  # a release drops the 2 MiB around an array: the neighbours' pages, for these
