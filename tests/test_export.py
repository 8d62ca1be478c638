"""SavedModel and ONNX exports, proven equal to the Keras model; zoo predict on all three artifacts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from zoo import ZooError
from zoo.export import check_batch, export


@pytest.fixture(autouse=True)
def _narrow_registered(narrow_spec):
    yield


def test_exports_match_keras_tf_and_onnx_runtime(narrow_run, tmp_path):
    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    import zoo

    written = export(narrow_run, out=tmp_path / "exp")
    assert sorted(p.name for p in written) == ["model.onnx", "savedmodel"]
    x = check_batch(zoo.load_weights(narrow_run / "weights.safetensors").spec, n=6, seed=7)
    keras_logits = zoo.create_model(None, weights=narrow_run / "weights.safetensors").predict(x, verbose=0)
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_probs = sess.run(["logits", "probabilities"], {"image": x})
    sm = tf.saved_model.load(str(tmp_path / "exp" / "savedmodel"))
    out = sm.signatures["serving_default"](image=tf.constant(x))
    scale = np.abs(keras_logits).max()
    assert np.abs(onnx_logits - keras_logits).max() <= 1e-4 * scale
    assert np.abs(out["logits"].numpy() - keras_logits).max() <= 1e-4 * scale
    np.testing.assert_allclose(onnx_probs.sum(1), 1, rtol=1e-5)
    assert [c.decode() for c in out["class"].numpy()] == [["circle", "square"][i] for i in keras_logits.argmax(1)]
    model = onnx.load(str(tmp_path / "exp" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert "LRN" in ops and groups == [1, 2]  # grouped conv2 is one Conv with group=2
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert json.loads({p.key: p.value for p in model.metadata_props}["zoo.classes"]) == ["circle", "square"]


def test_streamed_onnx_file_is_the_model_onnx_helper_would_build(narrow_run, tmp_path):
    import onnx
    from onnx import numpy_helper

    from zoo.backends.onnx import onnx_graph, write_onnx
    from zoo.export import open_source

    src = open_source(narrow_run)
    model, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)
    write_onnx(tmp_path / "streamed.onnx", model, inits, release=src.weights.release)
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in inits)
    streamed = onnx.load(str(tmp_path / "streamed.onnx"))
    assert onnx.printer.to_text(streamed.graph) == onnx.printer.to_text(whole.graph)
    for got, want in zip(streamed.graph.initializer, whole.graph.initializer, strict=True):
        assert got.name == want.name and list(got.dims) == list(want.dims)
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))
    conv1 = dict(zip((n for n, _ in inits), (a for _, a in inits)))["conv1.kernel"]
    np.testing.assert_array_equal(conv1, src.weights.tensors["conv1.kernel"].transpose(3, 2, 0, 1))  # OIHW
    onnx.checker.check_model(str(tmp_path / "streamed.onnx"), full_check=True)


def test_raw_image_signatures_match_the_python_preprocessing(narrow_run, tmp_path, example_data):
    import tensorflow as tf

    import zoo
    from zoo.preprocess import tf_eval_image

    export(narrow_run, formats=["savedmodel"], out=tmp_path / "exp")
    sm = tf.saved_model.load(str(tmp_path / "exp" / "savedmodel"))
    weights = zoo.load_weights(narrow_run / "weights.safetensors")
    model = zoo.create_model(None, weights=weights)
    files = [example_data / "circle" / "circle_000.jpg", example_data / "square" / "square_001.png",
             example_data / "square" / "square_003.png"]  # RGB JPEG, RGB PNG, grayscale
    encoded = [f.read_bytes() for f in files]
    python_path = model.predict(np.stack([tf_eval_image(e, weights.spec).numpy() for e in encoded]), verbose=0)
    via_bytes = sm.signatures["serve_encoded"](encoded=tf.constant(encoded))["logits"].numpy()
    np.testing.assert_allclose(via_bytes, python_path, rtol=1e-4, atol=1e-4 * np.abs(python_path).max())
    rgb = np.stack([tf.io.decode_image(e, channels=3).numpy() for e in encoded])
    via_rgb = sm.signatures["serve_rgb"](rgb=tf.constant(rgb))["logits"].numpy()
    np.testing.assert_allclose(via_rgb, python_path, rtol=1e-4, atol=1e-4 * np.abs(python_path).max())


def test_a_failed_check_leaves_nothing(narrow_run, tmp_path, monkeypatch):
    import zoo.export.checks

    def wrong(name, got, want, where):
        raise ZooError(f"{name} does not match", where)

    monkeypatch.setattr(zoo.export.checks, "compare", wrong)
    for fmt in ("onnx", "savedmodel"):
        with pytest.raises(ZooError, match="does not match"):
            export(narrow_run, formats=[fmt], out=tmp_path / "exp")
        assert [p for p in os.listdir(tmp_path / "exp") if p not in ("classes.txt",)] == []


def test_predict_cli_on_all_three_artifacts(narrow_run, tmp_path, example_data, cli):
    export(narrow_run, out=tmp_path / "exp")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    images = [example_data / "circle" / "circle_000.jpg", example_data / "square", tmp_path / "bad.jpg"]
    tops = {}
    for artifact in (tmp_path / "exp" / "model.onnx", tmp_path / "exp" / "savedmodel", narrow_run):
        code, out, err = cli("predict", artifact, *images, "--top", "2", "--json")
        rows = json.loads(out)
        assert code == 1 and "bad.jpg" in err  # the bad file is named, skipped, and the exit code says so
        good = [r for r in rows if not r["error"]]
        assert len(good) == 1 + len(list((example_data / "square").iterdir()))
        assert {name for r in good for name, _ in r["top"]} <= {"circle", "square"}
        tops[artifact.name] = [r["top"][0][0] for r in good]
    # Keras and the SavedModel share TensorFlow's preprocessing: same answers
    assert tops["savedmodel"] == tops["run"]


def test_unknown_format_and_bad_source(narrow_run, tmp_path, cli):
    code, _, err = cli("export", narrow_run, "--format", "coreml")
    assert code == 1 and "unknown export format" in err
    code, _, err = cli("export", tmp_path / "nothing.safetensors")
    assert code == 1 and "nothing.safetensors" in err


@pytest.mark.slow
def test_full_alexnet_bvlc_export_in_its_own_process(tmp_path, seeded_safetensors):
    code = f"import sys; from zoo.export import export; print(export({str(seeded_safetensors)!r}, out={str(tmp_path)!r}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "savedmodel" / "saved_model.pb").exists()


def _gpu_available():
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(), reason="no GPU: ONNX Runtime has no CUDAExecutionProvider here (docs/guide.md: GPU parity)")
def test_onnx_on_gpu_matches_cpu(narrow_run, tmp_path):
    import onnxruntime as ort

    import zoo

    export(narrow_run, formats=["onnx"], out=tmp_path)
    x = check_batch(zoo.load_weights(narrow_run / "weights.safetensors").spec, n=8)
    cpu = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    gpu_session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CUDAExecutionProvider"])
    assert gpu_session.get_providers()[0] == "CUDAExecutionProvider"
    gpu = gpu_session.run(["logits"], {"image": x})[0]
    assert np.abs(gpu - cpu).max() <= 1e-4 * np.abs(cpu).max()
    np.testing.assert_array_equal(np.argsort(-gpu, 1)[:, :5], np.argsort(-cpu, 1)[:, :5])


def test_onnx_weights_go_to_external_data_past_the_protobuf_limit(narrow_run, tmp_path):
    """Forced here on the narrow model (VGG16 is 553 MB; nothing registered passes 2 GiB): the same checks
    pass on model.onnx + model.onnx.data, and the file itself holds no weights."""
    import onnx
    import onnxruntime as ort

    import zoo
    from zoo.backends.onnx import needs_external_data, onnx_graph
    from zoo.export import open_source
    from zoo.export.to_onnx import export_onnx

    src = open_source(narrow_run)
    model = zoo.create_model(None, weights=src.weights)
    path = export_onnx(src, tmp_path, lambda: model.predict(check_batch(src.spec), verbose=0), external=True)
    data = tmp_path / "model.onnx.data"
    assert data.stat().st_size >= sum(t.size * 4 for t in src.spec.tensors.values()) > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": check_batch(src.spec)})[0]
    np.testing.assert_allclose(got, model.predict(check_batch(src.spec), verbose=0), rtol=1e-4, atol=1e-5)
    graph, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)
    assert not needs_external_data(graph, inits)  # left to itself, a small model keeps its weights inside
