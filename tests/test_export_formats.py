"""Every export format: checked before it lands, carrying its metadata, read by `zoo predict`; the .keras
archive in a process of its own; a failed check leaves the earlier export as it was."""

import json
import subprocess
import sys

import numpy as np
import pytest

from zoo import ZooError
from zoo.export import FORMATS, export

FLOAT = {"onnx": "model.onnx", "keras": "model.keras", "tflite": "model.tflite", "savedmodel": "savedmodel"}
INT8 = {"tflite-int8": "model-int8.tflite", "onnx-int8": "model-int8.onnx"}


@pytest.fixture(autouse=True)
def _narrow_registered(narrow_spec):
    yield


@pytest.fixture(scope="module")
def exported(narrow_run, module_folder):
    """All formats, once; int8 calibrated on the run's training images (its config's default)."""
    from conftest import NarrowSpecPlugin

    from zoo.plugins import get_plugins

    get_plugins().register(NarrowSpecPlugin(), name="narrow-specs")
    out = module_folder("exp")
    written = export(narrow_run, formats=FORMATS, out=out)
    assert sorted(p.name for p in written) == sorted([*FLOAT.values(), *INT8.values()])
    return out


def metadata(path) -> dict:
    """The metadata an artifact carries, read the way its format keeps it."""
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return {"spec": props["zoo.spec"], "fingerprint": props["zoo.fingerprint"], "input": json.loads(props["zoo.input"]),
                "classes": json.loads(props["zoo.classes"]), **({"quantization": json.loads(props["zoo.quantization"])}
                                                                if "zoo.quantization" in props else {})}
    if path.is_dir():
        return json.loads((path / "assets" / "zoo.json").read_text())
    return json.loads(path.with_name(path.name + ".json").read_text())


def test_every_artifact_carries_spec_fingerprint_preprocessing_and_classes(exported, narrow_run):
    import zoo

    spec = zoo.load_weights(narrow_run / "weights.safetensors").spec  # the run's: a 2-class head
    for name in [*FLOAT.values(), *INT8.values()]:
        meta = metadata(exported / name)
        assert meta["spec"] == "narrow@test" and meta["fingerprint"] == spec.fingerprint, name
        assert meta["input"] == spec.input and meta["classes"] == ["circle", "square"], name
    for name in INT8.values():
        q = metadata(exported / name)["quantization"]
        assert 0.5 <= q["top1_agreement"] <= 1 and q["max_error"] > 0 and q["images"] == 80 and q["calibration_images"] == 40, q
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".")]  # no staging left


def keras_top1(run, files, spec_input):
    """The Keras model's top-1 class names on `files`, preprocessed as the Pillow path does (ONNX, LiteRT, .keras)."""
    import zoo
    from zoo.preprocess import np_eval_image

    model = zoo.create_model(None, weights=run / "weights.safetensors")
    logits = model.predict(np.stack([np_eval_image(f, spec_input) for f in files]), verbose=0)
    return [["circle", "square"][i] for i in logits.argmax(1)]


def predict_top1(cli, artifact, images):
    code, out, err = cli("predict", artifact, images, "--top", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)
    return [r["file"] for r in rows], [r["top"][0][0] for r in rows]


def test_predict_reads_each_float_format_with_the_keras_models_top1(exported, narrow_run, example_data, cli, narrow_spec):
    files, want = None, None
    for fmt, name in FLOAT.items():
        got_files, got = predict_top1(cli, exported / name, example_data)
        if fmt == "savedmodel":  # TensorFlow's preprocessing: the same as predicting from the run folder
            assert got == predict_top1(cli, narrow_run, example_data)[1]
            continue
        if want is None:
            files = got_files
            want = keras_top1(narrow_run, files, narrow_spec.input)
        assert got_files == files and got == want, fmt


def test_predict_on_int8_agrees_with_keras_as_its_metadata_says(exported, narrow_run, example_data, cli, narrow_spec):
    for name in INT8.values():
        files, got = predict_top1(cli, exported / name, example_data)
        want = keras_top1(narrow_run, files, narrow_spec.input)
        stated = metadata(exported / name)["quantization"]["top1_agreement"]  # measured on these 80 images, in one batch
        assert abs(np.mean(np.array(got) == np.array(want)) - stated) <= 2 / len(files), name


KERAS_LOAD = """
import sys, numpy as np, keras
{register}
model = keras.saving.load_model(sys.argv[1])
print("zoo" in sys.modules, [layer.name for layer in model.layers][:3])
np.save(sys.argv[2], model.predict(np.load(sys.argv[3]), verbose=0))
"""


def test_keras_archive_loads_by_plain_load_model_with_zoos_layers_registered(exported, narrow_run, tmp_path):
    """Plain keras.saving.load_model in a fresh process: with zoo's layer classes registered it loads and
    computes the Keras model's logits; without zoo it cannot (Keras resolves non-Keras classes only through
    its registry), which is the limit docs/guide.md states."""
    import zoo
    from zoo.export import check_batch

    x = check_batch(zoo.load_weights(narrow_run / "weights.safetensors").spec, n=3, seed=5)
    np.save(tmp_path / "x.npy", x)
    argv = [str(exported / "model.keras"), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")]
    bare = subprocess.run([sys.executable, "-c", KERAS_LOAD.format(register="")] + argv, capture_output=True, text=True)
    assert bare.returncode != 0 and "Could not locate class 'SpecConv2D'" in bare.stderr
    code = KERAS_LOAD.format(register="from zoo.export import keras_layers; keras_layers()")
    p = subprocess.run([sys.executable, "-c", code] + argv, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "['image', 'conv1', 'norm1']" in p.stdout  # the spec's layer names
    want = zoo.create_model(None, weights=narrow_run / "weights.safetensors").predict(x, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["keras", "tflite", "tflite-int8", "onnx-int8", "savedmodel", "onnx"])
def test_a_failed_check_leaves_the_earlier_export_untouched(fmt, narrow_run, tmp_path, monkeypatch):
    import zoo.export.checks
    import zoo.export.quantized

    out = tmp_path / "exp"
    export(narrow_run, formats=[fmt], out=out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def wrong(name, got, want, where, ranks=True):
        raise ZooError(f"{name} does not match", where)

    monkeypatch.setattr(zoo.export.checks, "compare", wrong)
    monkeypatch.setattr(zoo.export.quantized, "MIN_AGREEMENT", 1.01)  # no int8 model agrees on more than every image
    with pytest.raises(ZooError, match="does not match|refused below"):
        export(narrow_run, formats=[fmt], out=out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_int8_needs_calibration_images_and_a_classifier(narrow_run, tmp_path, example_data, cli):
    code, _, err = cli("export", narrow_run / "weights.safetensors", "--format", "tflite-int8", "--out", tmp_path)
    assert code == 1 and "--calibration DIR" in err
    code, _, err = cli("export", narrow_run, "--format", "onnx-int8", "--include-top", "false", "--out", tmp_path)
    assert code == 1 and "needs the classifier" in err
    code, out, err = cli("export", narrow_run / "weights.safetensors", "--format", "tflite-int8", "--out", tmp_path,
                         "--calibration", example_data / "circle")
    assert code == 0 and "top-1 agreement" in err
    assert metadata(tmp_path / "model-int8.tflite")["quantization"]["images"] == 40


def test_int8_litert_runs_a_graph_that_xnnpack_refuses(tmp_path):
    """LiteRT's default XNNPACK delegate refuses GoogLeNet's full-integer graph ("failed to create XNNPACK
    runtime", at any batch size; ResNet-50's too): zoo.predict.litert runs it on LiteRT's own kernels."""
    import keras
    from ai_edge_litert.interpreter import Interpreter
    from narrow import register_narrow_specs

    from zoo.backends.keras import build_model
    from zoo.export import check_batch
    from zoo.export.quantized import full_integer
    from zoo.export.to_tensorflow import tflite_convert
    from zoo.predict import litert, run_tflite
    from zoo.registry import get_spec

    register_narrow_specs()
    spec = get_spec("googlenet-narrow@test")
    keras.utils.set_random_seed(0)
    x = check_batch(spec, n=6)
    path = tmp_path / "model-int8.tflite"
    path.write_bytes(tflite_convert(build_model(spec), full_integer(x)))
    with pytest.raises(RuntimeError, match="XNNPACK"):  # what this test is about; a LiteRT that takes it makes this fail
        run_tflite(Interpreter(model_path=str(path)), x)
    got = run_tflite(litert(path), x)
    assert got.shape == (6, spec.num_classes) and np.isfinite(got).all()
