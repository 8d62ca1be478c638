"""int8 exports (LiteRT full-integer, ONNX Runtime static QDQ): calibrated on images, and measured by their
top-1 agreement with the float model instead of the float bound (quantization changes the numbers by design)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.backends.onnx import DEFAULT_OPSET, onnx_graph, write_onnx
from zoo.errors import ZooError
from zoo.export.checks import KerasModel, Source, artifact_metadata
from zoo.export.swap import publish, staged
from zoo.export.to_tensorflow import tflite_convert
from zoo.features import Part

MIN_AGREEMENT = 0.5  # top-1 agreement with the float model below which an int8 export is refused


@dataclass
class Calibration:
    """Preprocessed images for int8 quantization: `images` calibrate, `evaluation` (a superset: half of it was
    not calibrated on) measures agreement with the Keras model's `reference` logits."""
    folder: Path
    images: np.ndarray
    evaluation: np.ndarray
    reference: np.ndarray

    def record(self) -> dict:
        return {"calibration": str(self.folder), "calibration_images": len(self.images), "images": len(self.evaluation)}


EVALUATION_IMAGES = 200  # at most; every second one calibrates


def training_images(source: Path) -> Path:
    """The folder or list file a run trained on, as its config.json says (the built-in example's folder
    where it names none): int8 calibration's default."""
    config = source / "config.json"
    if not config.exists():
        raise ZooError("int8 export needs calibration images: --calibration DIR (the default, a run's training images, "
                       "needs a run folder)", source)
    cfg = json.loads(config.read_text())
    return Path(cfg.get("train_list") or cfg.get("data") or Path(cfg["out"]).parent / "zoo-example-data")


def calibration_set(source: Path, folder, part: Part, model) -> Calibration:
    from zoo.data import from_list
    from zoo.predict import image_files
    from zoo.preprocess import np_eval_image

    folder = Path(folder) if folder else training_images(source)
    files = [Path(p) for p in from_list(folder).paths] if folder.is_file() else image_files([folder])
    if not files:
        raise ZooError("no images to calibrate int8 quantization on", folder)
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:EVALUATION_IMAGES]]
    x = np.stack([np_eval_image(f, part.input) for f in files])
    return Calibration(folder, x[::2], x, model.predict(x, verbose=0))


def agreement(name: str, got: np.ndarray, cal: Calibration, where: Path) -> dict:
    """The int8 model's top-1 agreement with the float (Keras) model and its logits' error (of their scale) on
    the evaluation images; refused below MIN_AGREEMENT. Reported on stderr, returned for the metadata."""
    want = cal.reference
    scale = float(np.abs(want).max()) or 1.0
    stats = {"top1_agreement": float(np.mean(got.argmax(1) == want.argmax(1))), "max_error": float(np.abs(got - want).max()) / scale,
             "mean_error": float(np.abs(got - want).mean()) / scale} | cal.record()
    if stats["top1_agreement"] < MIN_AGREEMENT:
        raise ZooError(f"{name} agrees with the float model on top-1 for {stats['top1_agreement']:.1%} of {len(want)} images "
                       f"(refused below {MIN_AGREEMENT:.0%})", where)
    print(f"zoo: {name}: top-1 agreement with the float model {stats['top1_agreement']:.1%} on {len(want)} images, logits' error "
          f"max {stats['max_error']:.2e} / mean {stats['mean_error']:.2e} of their scale", file=sys.stderr, flush=True)
    return stats


def full_integer(images: np.ndarray):
    """The converter settings of full-integer post-training quantization calibrated on `images`."""
    import tensorflow as tf

    def setup(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # an op without an int8 kernel fails here
        converter.inference_input_type = converter.inference_output_type = tf.int8

    return setup


def export_tflite_int8(src: Source, out: Path, model: KerasModel, cal: Calibration) -> Path:
    """model-int8.tflite: full-integer post-training quantization (every op int8, int8 input and output),
    calibrated on `cal`; its agreement with the float model goes in model-int8.tflite.json."""
    from zoo.predict import litert, run_tflite

    with staged(out, "tflite-int8") as tmp:
        (tmp / "model-int8.tflite").write_bytes(tflite_convert(model(), full_integer(cal.images)))
        model.drop()
        got = run_tflite(litert(tmp / "model-int8.tflite"), cal.evaluation)
        stats = agreement("the int8 LiteRT model", got, cal, out / "model-int8.tflite")
        return publish(out, tmp, "tflite-int8", artifact_metadata(src) | {"quantization": stats})


def export_onnx_int8(src: Source, out: Path, cal: Calibration, opset: int = DEFAULT_OPSET) -> Path:
    """model-int8.onnx: ONNX Runtime's static quantization (QDQ, int8 weights per channel and activations) of
    zoo's ONNX graph, calibrated on `cal`; its agreement with the float model goes in its metadata_props."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(cal.images[:, None])

        def get_next(self):
            return {"image": x} if (x := next(self.batches, None)) is not None else None

    with staged(out, "onnx-int8") as tmp:
        graph, inits = onnx_graph(src.spec, src.weights.tensors, src.classes, opset, src.part)
        write_onnx(tmp / "float.onnx", graph, inits)
        path = tmp / "model-int8.onnx"
        quantize_static(tmp / "float.onnx", path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        stats = agreement("the int8 ONNX model", session.run(["logits"], {"image": cal.evaluation})[0], cal, out / path.name)
        del session
        model = onnx.load(str(path))  # int8: a quarter of the float model
        onnx.helper.set_model_props(model, {p.key: p.value for p in graph.metadata_props} | {"zoo.quantization": json.dumps(stats)})
        onnx.save(model, str(path))
        return publish(out, tmp, "onnx-int8", {})
