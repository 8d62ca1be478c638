"""The TensorFlow formats: a SavedModel with three signatures, Keras 3's .keras archive and LiteRT (float32)."""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

from zoo.export.checks import KerasModel, Source, artifact_metadata, check_batch, checker
from zoo.export.swap import publish, staged, swap_in
from zoo.layers import KINDS


def export_savedmodel(src: Source, out: Path, model: KerasModel, reference: np.ndarray | None = None) -> Path:
    import tensorflow as tf

    target = out / "savedmodel"
    tmp = out / ".savedmodel.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    classes_file = out / ".classes.txt"
    classes_file.write_text("\n".join(src.classes) + "\n")
    meta = out / ".savedmodel.meta" / "zoo.json"  # an asset keeps its file's name
    meta.parent.mkdir(exist_ok=True)
    meta.write_text(json.dumps(artifact_metadata(src), indent=2) + "\n")
    try:
        module = _serving_module(model(folded=True), src, [classes_file, meta])  # folded: inference only (zoo.fold)
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve, "serve_rgb": module.serve_rgb,
                                                         "serve_encoded": module.serve_encoded})
        del module
        model.drop()
        if reference is not None:
            loaded = tf.saved_model.load(str(tmp))
            got = loaded.signatures["serving_default"](image=tf.constant(check_batch(src.part)))
            checker(src.part)("the SavedModel", got["logits" if src.part.logits else "features"].numpy(), reference, target)
        swap_in(out, {"savedmodel": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        classes_file.unlink(missing_ok=True)
        shutil.rmtree(meta.parent, ignore_errors=True)
    return target


def _serving_module(keras_model, src: Source, assets: list[Path]):
    """The tf.Module a SavedModel serves: the model behind three input signatures, preprocessed images, uint8 RGB
    and encoded files, each with the spec's preprocessing (`src.part`) inside; `assets` travel in its assets/
    (the class names, zoo.json: artifact_metadata)."""
    import tensorflow as tf

    from zoo.preprocess import tf_decode, tf_pixels, tf_scale

    part = src.part
    h, w = part.size

    class Exported(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = keras_model
            self.classes = tf.constant(src.classes)
            self.assets = [tf.saved_model.Asset(str(path)) for path in assets]

        def _outputs(self, x):
            if not part.logits:
                return {"features": self.model(x, training=False)}
            logits = self.model(x, training=False)
            probs = tf.nn.softmax(logits)
            return {"logits": logits, "probabilities": probs, "class": tf.gather(self.classes, tf.argmax(logits, axis=1))}

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="image")])
        def serve(self, image):
            """Input already preprocessed as the spec says (zoo info)."""
            return self._outputs(image)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="rgb")])
        def serve_rgb(self, rgb):
            """uint8 RGB images of any (common) size: resize, center crop, channel order, mean/std inside."""
            return self._outputs(tf_scale(tf.map_fn(lambda im: tf_pixels(im, part), rgb, fn_output_signature=tf.uint8), part))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="encoded")])
        def serve_encoded(self, encoded):
            """Encoded JPEG/PNG bytes, one per image."""
            crops = tf.map_fn(lambda e: tf_pixels(tf_decode(e), part), encoded, fn_output_signature=tf.uint8)
            return self._outputs(tf_scale(crops, part))

    return Exported()


def keras_layers() -> dict:
    """zoo's own Keras layer classes by their registered names ("zoo>SpecConv2D", ...), registered by this call.
    Keras 3 finds a class that is not its own only in that registry or in `custom_objects`: it imports a
    config's module for keras' own packages only (serialization_lib._retrieve_class_or_fn), so a .keras
    file with zoo's layers loads only in a process that ran zoo's layer code, and no Keras built-in does LRN."""
    import keras

    return {keras.saving.get_registered_name(cls): cls for kind in KINDS.values() for cls in kind.keras_classes()}


def export_keras(src: Source, out: Path, model: KerasModel, reference: np.ndarray) -> Path:
    """model.keras, Keras 3's archive of the built model (the spec's layer names), and model.keras.json;
    checked by reloading it with keras.saving.load_model."""
    import keras

    with staged(out, "keras") as tmp:
        model().save(tmp / "model.keras")
        model.drop()
        loaded = keras.saving.load_model(tmp / "model.keras", custom_objects=keras_layers(), compile=False)
        checker(src.part)("the .keras archive (reloaded)", loaded.predict(check_batch(src.part), verbose=0), reference, out / "model.keras")
        del loaded
        return publish(out, tmp, "keras", artifact_metadata(src))


def tflite_convert(model, setup=None) -> bytes:
    """The Keras model as a LiteRT flatbuffer by TensorFlow's converter, `setup(converter)` first. From the Keras
    model (a concrete function's variables are not frozen for int8 calibration); its model.export prints the
    SavedModel's signature on stdout, which belongs to --json: it goes to stderr."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if setup:
        setup(converter)
    with redirect_stdout(sys.stderr):
        return converter.convert()


def export_tflite(src: Source, out: Path, model: KerasModel, reference: np.ndarray) -> Path:
    """model.tflite (float32) and model.tflite.json, checked by the LiteRT interpreter."""
    from zoo.predict import litert, run_tflite

    with staged(out, "tflite") as tmp:
        (tmp / "model.tflite").write_bytes(tflite_convert(model()))
        model.drop()
        got = run_tflite(litert(tmp / "model.tflite"), check_batch(src.part))
        checker(src.part)("the LiteRT model (LiteRT interpreter)", got, reference, out / "model.tflite")
        return publish(out, tmp, "tflite", artifact_metadata(src))
