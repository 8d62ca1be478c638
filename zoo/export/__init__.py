"""Export verified weights (or a fine-tune run) to a TensorFlow SavedModel, ONNX, a Keras 3 archive and
LiteRT (TFLite), each proven equal to the Keras model on a fixed seeded batch before it is called done; and
to int8 LiteRT and ONNX, whose agreement with the float model on calibration images is measured and
recorded instead (quantization changes the numbers by design).

ONNX is written from the spec by zoo.backends.onnx (each layer kind's own nodes, weights streamed);
nothing is trusted until onnx.checker and ONNX Runtime agree with the Keras model's logits (those a run stored
at the end of `zoo finetune`, which need no TensorFlow here, or Keras' own). Every artifact carries the
spec, its fingerprint, the preprocessing and the class names (artifact_metadata), in the format's own
metadata or in `<file>.json` beside it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from zoo.backends.onnx import DEFAULT_OPSET
from zoo.errors import ZooError
from zoo.export.checks import KerasModel, artifact_metadata, check_batch, compare, open_source, save_reference, stored_reference
from zoo.export.quantized import calibration_set, export_onnx_int8, export_tflite_int8
from zoo.export.swap import EXPORTS, recover
from zoo.export.to_onnx import check_opset, export_onnx
from zoo.export.to_tensorflow import export_keras, export_savedmodel, export_tflite, keras_layers
from zoo.progress import bar

__all__ = ["FORMATS", "artifact_metadata", "check_batch", "compare", "export", "keras_layers", "open_source", "save_reference"]

FORMATS = ("savedmodel", "onnx", "keras", "tflite", "tflite-int8", "onnx-int8")
DEFAULT_FORMATS = ("savedmodel", "onnx")
QUANTIZED = ("tflite-int8", "onnx-int8")
# ONNX first: it is written and checked before TensorFlow is loaded, and its runtime is gone by then
ORDER = ("onnx", "savedmodel", "keras", "tflite", "tflite-int8", "onnx-int8")


def export(source, formats=DEFAULT_FORMATS, out=None, opset: int = DEFAULT_OPSET, include_top: bool = True,
           pooling: str | None = None, calibration=None) -> list[Path]:
    """Export `source` (run folder or weights file) to each of `formats` under `out`, each checked; with
    include_top=False the headless trunk, `pooling` "avg" or "max" on its map (zoo.features.select). The
    int8 formats calibrate on the images under `calibration` (default: a run's training images)."""
    formats = list(formats)
    check_opset(opset)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ZooError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    src = open_source(source, include_top, pooling)
    if not src.part.logits and set(formats) & set(QUANTIZED):
        raise ZooError("an int8 export is measured by its top-1 agreement with the float model: it needs the classifier "
                       "(not --include-top false)", source)
    out = Path(out) if out else (Path(source) if Path(source).is_dir() else Path(source).parent) / "exported"
    out.mkdir(parents=True, exist_ok=True)
    for names in EXPORTS:  # an earlier export killed half-way is whole again before anything is written
        recover(out, list(names))
    keras_model = KerasModel(src, include_top, pooling)

    @cache
    def reference(size=None):  # the trained model's logits stored by zoo finetune where they apply, else Keras'
        if size is None and (stored := stored_reference(Path(source), src)) is not None:
            return stored
        return keras_model(size).predict(check_batch(src.part, size=size), verbose=0)

    @cache
    def calibrated():
        return calibration_set(Path(source), calibration, src.part, keras_model())

    steps = {"onnx": lambda: export_onnx(src, out, reference, opset),
             "savedmodel": lambda: export_savedmodel(src, out, keras_model, reference()),
             "keras": lambda: export_keras(src, out, keras_model, reference()),
             "tflite": lambda: export_tflite(src, out, keras_model, reference()),
             "tflite-int8": lambda: export_tflite_int8(src, out, keras_model, calibrated()),
             "onnx-int8": lambda: export_onnx_int8(src, out, calibrated(), opset)}
    written = []
    with bar(len(formats), f"exporting to {out}", "format") as progress:
        for fmt in sorted(set(formats), key=ORDER.index):
            written.append(steps[fmt]())
            progress.update()
    (out / "classes.txt").write_text("\n".join(src.classes) + "\n")
    return written
