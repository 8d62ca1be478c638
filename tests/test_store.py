"""The weights store: `zoo convert --store`, `zoo weights` (list, show, rm), stored names wherever weights are
taken (finetune, features, create_model, predict, export, verify, bench), and writes that concurrent writers cannot corrupt."""

import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import NARROW_SPEC

from zoo import store
from zoo.errors import ZooError

SPEC = dict(NARROW_SPEC, family="storednet", version="v1", provenance={"reference_files": {"storednet.npy": {"hash": "unknown"}}})


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty store, the test spec registered, and caffe-tensorflow .npy files of it: storednet.npy (its published
    name) and mine.npy (other weights)."""
    from zoo.hookspecs import hookimpl
    from zoo.plugins import get_plugins
    from zoo.spec import ModelSpec

    class Plugin:
        @hookimpl
        def zoo_model_specs(self):
            return [SPEC]

    get_plugins().register(Plugin(), name="store-test-specs")
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    spec, rng = ModelSpec.from_dict(SPEC), np.random.default_rng(0)
    for name in ("storednet", "mine"):
        layers = {}
        for tensor, t in spec.tensors.items():
            layer, param = tensor.rsplit(".", 1)
            layers.setdefault(layer, {})["weights" if param == "kernel" else "biases"] = rng.normal(size=t.shape).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", layers)
    return tmp_path / "home"


def test_home_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOO_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert store.home() == tmp_path / "cache" / "zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store.home() == tmp_path / ".cache" / "zoo"


def test_convert_store_then_list_show_rm(cli, home, tmp_path):
    code, out, err = cli("convert", tmp_path / "mine.npy", "--store")
    assert code == 0 and "note: stored as storednet@v1/mine" in out, err
    entry = store.one("storednet@v1/mine")
    assert entry.path.parent.name == entry.metadata["fingerprint"] and entry.path.parent.parent.name == "storednet@v1"
    assert entry.metadata["source_sha256"] == hashlib.sha256((tmp_path / "mine.npy").read_bytes()).hexdigest()  # without --sha256
    assert not (tmp_path / "mine.safetensors").exists()
    code, out, _ = cli("weights")
    assert code == 0 and out.startswith(f"{home}: 1 stored weights file(s)") and "storednet@v1/mine" in out and "from mine.npy" in out
    code, out, _ = cli("weights", "show", "storednet@v1")  # a spec's name names its only file
    assert code == 0 and "source_file    mine.npy" in out and out.rstrip().endswith("verified: every tensor checked against the spec")
    code, _, err = cli("weights", "show", "storednet@v1/nope")
    assert code == 1 and err.strip() == "zoo: error: storednet@v1/nope: nothing stored under this name (zoo weights lists what is)"
    code, out, _ = cli("weights", "rm", "storednet@v1/mine")
    assert code == 0 and out.startswith("removed storednet@v1/mine")
    assert store.entries() == [] and list((home / "weights").iterdir()) == [home / "weights" / ".incoming"]  # no empty folders
    code, _, err = cli("convert", tmp_path / "mine.npy", "--store", "-o", tmp_path / "x.safetensors")
    assert code == 1 and "give -o or --store, not both" in err


def test_concurrent_writers_leave_one_whole_entry_and_no_temporary_files(home, tmp_path):
    from zoo.registry import get_spec, load_weights

    errors = []

    def write():
        try:
            store.add(tmp_path / "mine.npy", spec="storednet@v1")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    get_spec("storednet@v1")  # the registry takes the plugins' specs on first use, not thread-safely: here, once
    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    [entry] = store.entries()
    load_weights(entry.path)  # whole and verified
    assert [p.name for p in home.rglob("*") if p.is_file()] == ["mine.safetensors"]


def test_stored_names_resolve_and_the_published_file_is_preferred(home, tmp_path):
    assert store.resolve(None, "storednet") is None and store.resolve("random", "storednet") is None
    with pytest.raises(ZooError, match=r"no stored weights for storednet@v1: `zoo fetch storednet@v1` .* --weights random"):
        store.resolve("stored", "storednet")
    _, mine = store.add(tmp_path / "mine.npy", spec="storednet@v1")
    assert store.resolve("stored", "storednet") == mine.path  # the only one
    _, published = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    assert store.resolve("stored", "storednet@v1") == published.path == store.resolve("storednet", None)
    assert store.resolve("storednet@v1/mine", None) == mine.path
    assert store.resolve(str(tmp_path / "mine.npy"), None) == str(tmp_path / "mine.npy")  # a file is a file
    with pytest.raises(ZooError, match="nope.safetensors: no such file, nor stored weights of that name"):
        store.resolve("nope.safetensors", None)
    code_names = {e.name for e in store.entries()}
    assert code_names == {"storednet@v1/mine", "storednet@v1/storednet"}


def test_finetune_takes_the_stored_weights_or_says_how_to_get_them(cli, home, tmp_path, example_data):
    import json

    args = ("finetune", "storednet", "--data", example_data, "--head", "2", "--train", "fc8", "--epochs", "1", "--batch-size", "16",
            "--no-augment")
    code, _, err = cli(*args, "--out", tmp_path / "none")
    assert code == 1 and err.strip().splitlines() == [
        "zoo: error: no stored weights for storednet@v1: `zoo fetch storednet@v1` downloads the published ones, "
        "`zoo convert FILE --store` stores yours; or pass --weights FILE, or --weights random"]
    assert not (tmp_path / "none").exists()
    _, entry = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    code, out, err = cli(*args, "--out", tmp_path / "run", "--json")
    assert code == 0 and f"zoo: starting from the stored weights {entry.path}" in err, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weights"] == str(entry.path)  # resume takes the same file
    from zoo.registry import load_weights

    before, after = load_weights(entry.path).tensors, load_weights(tmp_path / "run" / "weights.safetensors").tensors
    assert np.array_equal(before["conv1.kernel"], after["conv1.kernel"])  # frozen: the stored weights, bit for bit


def test_finetune_alexnet_without_stored_weights_says_so_in_one_line(tmp_path, example_data):
    """As a user runs it: a fresh process, alexnet's default version, an empty store. The line comes before
    TensorFlow starts (its import prints lines of its own on stderr)."""
    env = dict(os.environ, ZOO_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "zoo", "finetune", "alexnet", "--head", "2", "--data", str(example_data),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "zoo: error: no stored weights for alexnet@bvlc: `zoo fetch alexnet@bvlc` downloads the published ones, "
        "`zoo convert FILE --store` stores yours; or pass --weights FILE, or --weights random"], done.stderr
    assert not (tmp_path / "run").exists()


def test_random_initialisation_only_by_name(home, example_data, tmp_path, capsys):
    from zoo.finetune.config import configure
    from zoo.finetune.plan import make_plan

    for weights in ("random", None):  # None: the Python API's default, as before
        plan = make_plan(configure(None, {"model": "storednet", "weights": weights, "data": str(example_data), "head": 2,
                                          "out": str(tmp_path / "run")}))
        assert plan.weights is None and plan.cfg.weights is None  # config.json says random initialisation
        assert "zoo: starting storednet@v1 from RANDOM initialisation (weights random)" in capsys.readouterr().err


def test_create_model_and_predict_take_stored_names(cli, home, tmp_path, example_data):
    import zoo

    _, entry = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    model = zoo.create_model("storednet", weights="stored")
    assert np.array_equal(model.get_layer("conv1").get_weights()[0], zoo.load_weights(entry.path).tensors["conv1.kernel"])
    assert zoo.create_model("storednet", weights="random").count_params() == model.count_params()
    code, out, err = cli("predict", "storednet@v1/storednet", example_data / "circle", "--top", "1")
    assert code == 0 and out.count("circle_") >= 1, err


def test_verify_and_bench_take_stored_names(cli, home, tmp_path):
    import json

    code, _, err = cli("verify", "storednet@v1/storednet")
    assert code == 1 and err.strip() == "zoo: error: storednet@v1/storednet: nothing stored under this name (zoo weights lists what is)"
    _, entry = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    for name in ("storednet@v1/storednet", "storednet@v1", "storednet"):
        code, out, err = cli("verify", name)
        assert code == 0 and out.startswith(f"ok: {entry.path} holds every tensor of storednet@v1 (10 classes"), (name, err)
    code, out, _ = cli("verify", "storednet@v1/storednet", "--json")
    assert code == 0 and json.loads(out)["file"] == str(entry.path)
    bench = ("--runtimes", "keras", "--batch", "1", "--seconds", "0.05", "--json")
    code, out, err = cli("bench", "storednet@v1/storednet", *bench)
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "storednet@v1" and result["source"] == str(entry.path) and [r["runtime"] for r in result["rows"]] == ["keras"]
    code, out, err = cli("bench", "storednet@v1", *bench)  # a spec's name stays its architecture with seeded weights
    assert code == 0 and json.loads(out)["source"] == "storednet@v1", err
    code, _, err = cli("bench", "storednet@v1/nope", *bench)
    assert code == 1 and err.strip() == "zoo: error: storednet@v1/nope: nothing stored under this name (zoo weights lists what is)"


def test_export_takes_a_stored_name(cli, home, tmp_path):
    import onnxruntime as ort

    import zoo

    _, entry = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    code, out, err = cli("export", "storednet@v1/storednet", "--format", "onnx", "--out", tmp_path / "exported")
    assert code == 0 and f"exported {tmp_path / 'exported' / 'model.onnx'}" in out, err
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "exported" / "model.onnx"))
    (got,) = session.run(["logits"], {"image": x})
    want = np.asarray(zoo.create_model("storednet", weights=entry.path)(x, training=False))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # the stored file's weights, not another's


def test_features_take_the_stored_weights_or_say_how_to_get_them(cli, home, tmp_path, example_data):
    args = ("features", "storednet", example_data / "circle", "--layer", "fc7", "--batch-size", "16")
    code, out, err = cli(*args, "-o", tmp_path / "none.npy")
    assert code == 1 and out == "" and err.strip().splitlines() == [
        "zoo: error: no stored weights for storednet@v1: `zoo fetch storednet@v1` downloads the published ones, "
        "`zoo convert FILE --store` stores yours; or pass --weights FILE, or --weights random"]
    assert not (tmp_path / "none.npy").exists()
    _, entry = store.add(tmp_path / "storednet.npy", spec="storednet@v1")
    code, out, err = cli(*args, "-o", tmp_path / "stored.npy")
    assert code == 0 and f"zoo: features of the stored weights {entry.path}" in err and "random" not in err, err
    stored = np.load(tmp_path / "stored.npy")
    code, _, err = cli(*args, "--weights", entry.path, "-o", tmp_path / "file.npy")
    assert code == 0 and "stored weights" not in err, err
    np.testing.assert_array_equal(stored, np.load(tmp_path / "file.npy"))  # the stored file's features
    code, _, err = cli(*args, "--weights", "random", "-o", tmp_path / "random.npy")
    assert code == 0 and "zoo: note: --weights random: features of randomly initialised layers" in err, err
    assert not np.allclose(stored, np.load(tmp_path / "random.npy"))


def test_features_of_alexnet_without_stored_weights_says_so_in_one_line(tmp_path, example_data):
    """As a user runs it, as fine-tuning does: a fresh process, an empty store, the line before TensorFlow starts."""
    env = dict(os.environ, ZOO_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "zoo", "features", "alexnet", str(example_data / "circle"), "-o", str(tmp_path / "f.npy")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "zoo: error: no stored weights for alexnet@bvlc: `zoo fetch alexnet@bvlc` downloads the published ones, "
        "`zoo convert FILE --store` stores yours; or pass --weights FILE, or --weights random"], done.stderr
    assert not (tmp_path / "f.npy").exists()
