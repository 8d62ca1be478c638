"""`zoo predict`: top-k classes from an ONNX file, a SavedModel, a .keras archive, a LiteRT (.tflite) file or
verified weights, on image files. Exported artifacts are read with the metadata they carry (zoo.export.artifact_metadata)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.data import IMAGE_SUFFIXES
from zoo.errors import ZooError
from zoo.preprocess import oversized
from zoo.safe_pickle import one_line


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]] | None = None
    error: str | None = None


def image_files(paths) -> list[Path]:
    """The given files, and the images in the given folders and their sub-folders (a class-per-folder set)."""
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()) if p.is_dir() else [p]
    return files


class OnnxPredictor:
    """ONNX Runtime with Pillow/numpy preprocessing: no TensorFlow needed."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        from zoo.backends.onnx import session_options

        # the metadata first, from a session that optimises nothing (ResNet-50: 0.08 s, against 0.5 s for the one
        # that runs): that one is then planned for the preprocessing size (session_options)
        unplanned = session_options()
        unplanned.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        meta = self._session(path, unplanned).get_modelmeta().custom_metadata_map
        if "zoo.input" not in meta:
            raise ZooError("an ONNX file without zoo metadata (export it with `zoo export`)", path)
        self.input, self.classes = json.loads(meta["zoo.input"]), json.loads(meta["zoo.classes"])
        self.session = self._session(path, session_options(size=self.input["size"]))

    @staticmethod
    def _session(path: Path, options):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())
        except Exception as e:  # onnxruntime's own errors for a file that is no model (InvalidProtobuf, Fail)
            raise ZooError(f"not a readable ONNX model ({one_line(str(e), 200)})", path) from None

    def probabilities(self, path: Path) -> np.ndarray:
        from zoo.preprocess import np_eval_image

        return self.session.run(["probabilities"], {"image": np_eval_image(path, self.input)[None]})[0][0]


class SavedModelPredictor:
    def __init__(self, path: Path):
        import tensorflow as tf

        classes = path / "assets" / ".classes.txt"
        if not classes.is_file():  # checked before TensorFlow loads: a SavedModel zoo did not write
            raise ZooError("a SavedModel without zoo's class names (assets/.classes.txt): export it with `zoo export`", path)
        self.classes = classes.read_text().splitlines()
        self.fn = tf.saved_model.load(str(path)).signatures["serve_encoded"]

    def probabilities(self, path: Path) -> np.ndarray:
        import tensorflow as tf

        return self.fn(encoded=tf.constant([path.read_bytes()]))["probabilities"].numpy()[0]


def sidecar(path: Path) -> dict:
    """The metadata `zoo export` wrote beside an artifact (`<file>.json`)."""
    meta = Path(f"{path}.json")
    if not meta.exists():
        raise ZooError(f"no {meta.name} beside it (export it with `zoo export`)", path)
    return json.loads(meta.read_text())


def litert(path: Path):
    """The LiteRT interpreter (ai-edge-litert) on a .tflite file: with its default XNNPACK delegate where that
    takes the model, else LiteRT's own kernels (XNNPACK refuses some full-integer graphs, such as
    GoogLeNet's and ResNet-50's: "failed to create XNNPACK runtime", at any batch size)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path))
    try:
        interpreter.allocate_tensors()
    except RuntimeError as e:
        if "XNNPACK" not in str(e):
            raise
        interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return interpreter


def run_tflite(interpreter, x: np.ndarray) -> np.ndarray:
    """The model's one output for the float batch `x`, through its int8 scale and zero point where it takes
    and gives int8 (full-integer quantization)."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        scale, zero = out["quantization"]
        y = (y.astype(np.float32) - zero) * scale
    return y


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


class TfLitePredictor:
    """The LiteRT interpreter with Pillow/numpy preprocessing as model.tflite.json says: no TensorFlow needed."""

    def __init__(self, path: Path):
        meta = sidecar(path)
        self.interpreter, self.input, self.classes = litert(path), meta["input"], meta["classes"]

    def probabilities(self, path: Path) -> np.ndarray:
        from zoo.preprocess import np_eval_image

        return softmax(run_tflite(self.interpreter, np_eval_image(path, self.input)[None])[0])


class KerasArchivePredictor:
    """A .keras archive by keras.saving.load_model (zoo's layer classes registered first), preprocessed as
    model.keras.json says."""

    def __init__(self, path: Path):
        import keras

        from zoo.export import keras_layers

        meta = sidecar(path)
        self.input, self.classes = meta["input"], meta["classes"]
        self.model = keras.saving.load_model(path, custom_objects=keras_layers(), compile=False)

    def probabilities(self, path: Path) -> np.ndarray:
        from zoo.preprocess import np_eval_image

        return softmax(self.model.predict(np_eval_image(path, self.input)[None], verbose=0)[0])


class KerasPredictor:
    def __init__(self, path: Path):
        from zoo.backends.keras import create_model
        from zoo.export import open_source

        src = open_source(path)
        self.spec, self.classes = src.spec, src.classes
        self.model = create_model(None, weights=src.weights, folded=True)

    def probabilities(self, path: Path) -> np.ndarray:
        import tensorflow as tf

        from zoo.preprocess import tf_eval_image

        x = tf_eval_image(tf.constant(path.read_bytes()), self.spec)[None]
        return tf.nn.softmax(self.model(x, training=False)).numpy()[0]


def predictor(artifact):
    artifact = Path(artifact)
    if not artifact.exists():
        raise ZooError("no such file or folder", artifact)
    if artifact.suffix == ".onnx":
        return OnnxPredictor(artifact)
    if artifact.suffix == ".tflite":
        return TfLitePredictor(artifact)
    if artifact.suffix == ".keras":
        return KerasArchivePredictor(artifact)
    if (artifact / "saved_model.pb").exists():
        return SavedModelPredictor(artifact)
    if artifact.suffix == ".safetensors" or (artifact / "weights.safetensors").exists():
        return KerasPredictor(artifact)
    raise ZooError("not a model: expected a .onnx, .tflite or .keras file, a SavedModel folder, a .safetensors file or a run folder",
                   artifact)


def predict(artifact, images, top: int = 5) -> list[Prediction]:
    if top < 1:
        raise ZooError(f"--top is 1 or more, not {top}")
    files = image_files(images)
    if not files:
        raise ZooError("no images in it: give image files, or folders holding JPEG or PNG images", images[0])
    missing = [p for p in files if not p.is_file()]
    if missing:  # before the model is loaded
        raise ZooError("no such image", missing[0])
    model = predictor(artifact)
    results = []
    for path in files:
        try:
            if problem := oversized(path):  # before any decoder unpacks it
                raise ValueError(problem)
            probs = model.probabilities(path)
        except Exception as e:  # one bad image is named and skipped, not fatal
            results.append(Prediction(str(path), error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))
            continue
        best = np.argsort(-probs)[:top]
        results.append(Prediction(str(path), [(model.classes[i], float(probs[i])) for i in best]))
    return results
