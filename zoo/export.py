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

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from zoo.backends.onnx import DEFAULT_OPSET, check_onnx, onnx_graph, size_free, write_onnx
from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.layers import KINDS
from zoo.progress import bar
from zoo.registry import load_weights
from zoo.spec import ModelSpec
from zoo.weights import Weights, atomic_write, file_digest

FORMATS = ("savedmodel", "onnx", "keras", "tflite", "tflite-int8", "onnx-int8")
DEFAULT_FORMATS = ("savedmodel", "onnx")
QUANTIZED = ("tflite-int8", "onnx-int8")
# ONNX first: it is written and checked before TensorFlow is loaded, and its runtime is gone by then
ORDER = ("onnx", "savedmodel", "keras", "tflite", "tflite-int8", "onnx-int8")
MIN_AGREEMENT = 0.5  # top-1 agreement with the float model below which an int8 export is refused


@dataclass
class Source:
    weights: Weights
    classes: list[str]
    part: Part  # what the export computes of the spec (zoo.features.select)

    @property
    def spec(self) -> ModelSpec:
        return self.weights.spec


def category_names(spec: ModelSpec) -> list[str] | None:
    if spec.categories:
        path = Path(__file__).parent / "specs" / f"{spec.categories}.txt"
        if path.exists():
            return path.read_text().splitlines()
    return None


def open_source(path, include_top: bool = True, pooling: str | None = None) -> Source:
    """A run folder (weights.safetensors, classes.txt) or a verified weights file, and what to export of it:
    with include_top=False the headless trunk, `pooling` "avg" or "max" on its map (zoo.features.select)."""
    path = Path(path)
    weights = load_weights(path / "weights.safetensors" if path.is_dir() else path, mapped=True)
    classes = weights.classes or category_names(weights.spec) or [str(i) for i in range(weights.spec.num_classes)]
    if len(classes) != weights.spec.num_classes:
        raise ZooError(f"{len(classes)} class names for a {weights.spec.num_classes}-class head", path)
    return Source(weights, classes, select(weights.spec, include_top, pooling))


def artifact_metadata(src: Source) -> dict:
    """What every artifact carries, so that it can be used without zoo's registry: the spec (name@version) and
    fingerprint, the preprocessing its input expects (the spec's input dict at the exported size), the
    output's name and the class names."""
    return {"spec": src.spec.id, "fingerprint": src.spec.fingerprint, "input": src.part.input,
            "output": "logits" if src.part.logits else "features", "classes": src.classes}


def check_batch(spec: ModelSpec, n: int = 4, seed: int = 1234, size=None) -> np.ndarray:
    """The fixed, seeded batch every export is checked on: images in the spec's input range, preprocessed, of
    the spec's size (a Part's) or `size`."""
    from zoo.preprocess import np_normalize

    rgb = np.random.default_rng(seed).uniform(0, 255, (n, *(size or spec.input["size"]), 3)).astype(np.float32)
    return np_normalize(rgb, spec.input)


def compare(name: str, got: np.ndarray, want: np.ndarray, where, ranks: bool = True) -> float:
    """Max |difference| within 1e-4 of the outputs' scale and, with `ranks` (logits), identical top-1 and
    top-5; else ZooError. Features are compared by value only: near-equal activations may swap ranks."""
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max()) / scale
    k = min(5, want.shape[1])
    same = not ranks or np.array_equal(np.argsort(-got, 1)[:, :k], np.argsort(-want, 1)[:, :k])
    if err > 1e-4 or not same:
        raise ZooError(f"{name} does not match the Keras model: max difference {err:.2e} of the outputs' scale"
                       + (f", top-{k} {'identical' if same else 'DIFFERENT'}" if ranks else ""), where)
    return err


def _checker(part: Part):
    """compare() as the part's output needs it (looked up at each call: tests replace compare)."""
    return compare if part.logits else partial(compare, ranks=False)


# --- the trained model's reference logits -------------------------------------------------------------

REFERENCE = Path("checkpoints") / "reference.npz"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_reference(weights_file: Path, model, spec: ModelSpec) -> None:
    """checkpoints/reference.npz beside `weights_file`: the Keras `model`'s logits on check_batch and the sha256s
    of the weights file and of the batch they belong to. Written at the end of `zoo finetune`, where the
    trained model is in memory anyway, so that `zoo export` of the run checks each artifact against it
    without importing TensorFlow (stored_reference). Not for a model computing in 16 bits (a mixed
    precision policy): its logits are not those of the float32 model the exports are."""
    if any(layer.compute_dtype != "float32" for layer in model.layers):
        return
    batch = check_batch(spec)
    with atomic_write(weights_file.parent / REFERENCE) as f:  # a file object: np.savez would add .npz to the name
        np.savez(f, logits=model.predict(batch, verbose=0), weights_sha256=file_digest(weights_file), batch_sha256=_digest(batch))


def stored_reference(source: Path, src: Source) -> np.ndarray | None:
    """The run's stored reference logits (save_reference) where they are those of what is exported: the whole
    network, and the check batch and weights file the same as when they were computed (their sha256s);
    else None. An unreadable file is no reference: the Keras model computes it."""
    path = source / REFERENCE
    if not (path.is_file() and src.part.logits and src.part.pooling is None):
        return None
    batch = check_batch(src.part)
    try:
        with np.load(path) as stored:
            if str(stored["batch_sha256"]) == _digest(batch) and str(stored["weights_sha256"]) == file_digest(source / "weights.safetensors"):
                return stored["logits"]
    except (OSError, ValueError, KeyError):
        pass
    return None


# --- replacing an earlier export -----------------------------------------------------------------------

ONNX_FILES = ("model.onnx.data", "model.onnx")  # the main file last
FILES = {"keras": ("model.keras.json", "model.keras"), "tflite": ("model.tflite.json", "model.tflite"),
         "tflite-int8": ("model-int8.tflite.json", "model-int8.tflite"), "onnx-int8": ("model-int8.onnx",)}
EXPORTS = (("savedmodel",), ONNX_FILES, *FILES.values())


def swap_in(out: Path, new: dict[str, Path]):
    """Move each new file or folder to out/<name>, the last name being the export's main file; a name whose new
    path does not exist is removed. The earlier export goes aside first (main file first) and is deleted
    last, so a kill at any moment leaves the earlier export whole (in place, or aside where recover() puts
    it back) or the new one whole: never a mix, never nothing."""
    names = list(new)
    aside = recover(out, names)
    aside.mkdir()
    for name in reversed(names):  # while the main file is in place, the earlier export is whole
        if (out / name).exists():
            os.replace(out / name, aside / name)
    for name in names:  # once the main file is in place, the new export is whole
        if new[name].exists():
            os.replace(new[name], out / name)
    shutil.rmtree(aside)


def recover(out: Path, names: list[str]) -> Path:
    """Finish or undo a swap_in of `names` that was killed: without its main file in place, what went aside
    goes back over what came in (the main file is absent; the others are files). Returns the aside folder's
    path (absent now)."""
    aside = out / f".{names[-1]}.old"
    if aside.exists():
        if not (out / names[-1]).exists():
            for name in names:
                if (aside / name).exists():
                    os.replace(aside / name, out / name)
        shutil.rmtree(aside)
    return aside


# --- ONNX -------------------------------------------------------------------------------------------


def export_onnx(src: Source, out: Path, reference, opset: int = DEFAULT_OPSET, external: bool | None = None) -> Path:
    """Write model.onnx (and model.onnx.data when the weights go beside it: past protobuf's 2 GiB, or
    `external`), check it (onnx.checker, then ONNX Runtime against `reference()`, the Keras model's output
    on check_batch), and only then move it into place. Where the graph allows any input size from the
    spec's up (zoo.backends.onnx.size_free), its height and width are symbolic and it is also checked at
    a second size against `reference(size)`.

    No TensorFlow is needed until `reference()` is called, after the ONNX Runtime session is gone: the
    two runtimes' memory never adds up."""
    import onnx
    import onnxruntime as ort

    target = out / "model.onnx"
    tmp = out / ".onnx.tmp"  # a folder: the external data file's name is recorded in the model
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        part = src.part
        dynamic = size_free(part, src.weights.tensors)
        model, inits = onnx_graph(src.spec, src.weights.tensors, src.classes, opset, part, dynamic)
        offsets = write_onnx(tmp / target.name, model, inits, release=src.weights.release, external=external)
        check_onnx(tmp / target.name, model, inits, offsets)
        options = ort.SessionOptions()  # prepacking would hold the dense weights twice while the session starts
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(tmp / target.name), options, providers=["CPUExecutionProvider"])
        sizes = [None, second_size(part)] if dynamic else [None]  # None: the part's own
        output = "logits" if part.logits else "features"
        got = [session.run([output], {"image": check_batch(part, size=size)})[0] for size in sizes]
        del session
        for size, g in zip(sizes, got):
            _checker(part)("the ONNX model (ONNX Runtime" + (f", at {size[0]}x{size[1]})" if size else ")"), g,
                           reference(size) if size else reference(), target)
        swap_in(out, {n: tmp / n for n in ONNX_FILES})  # no .data file: an earlier export's goes
    except onnx.checker.ValidationError as e:
        raise ZooError(f"onnx.checker rejected the model: {str(e).splitlines()[0]}", target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- SavedModel -------------------------------------------------------------------------------------


def export_savedmodel(src: Source, out: Path, model, reference: np.ndarray | None = None) -> Path:
    import tensorflow as tf

    from zoo.preprocess import tf_decode, tf_pixels, tf_scale

    part = src.part  # its input: the spec's preprocessing at the exported size
    h, w = part.size

    class Exported(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.classes = tf.constant(src.classes)
            self.class_file = tf.saved_model.Asset(str(out / ".classes.txt"))
            self.zoo_file = tf.saved_model.Asset(str(meta))  # assets/zoo.json: artifact_metadata

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

    target = out / "savedmodel"
    tmp = out / ".savedmodel.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (out / ".classes.txt").write_text("\n".join(src.classes) + "\n")
    meta = out / ".savedmodel.meta" / "zoo.json"  # an asset keeps its file's name
    meta.parent.mkdir(exist_ok=True)
    meta.write_text(json.dumps(artifact_metadata(src), indent=2) + "\n")
    try:
        module = Exported()
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve, "serve_rgb": module.serve_rgb,
                                                         "serve_encoded": module.serve_encoded})
        if reference is not None:
            loaded = tf.saved_model.load(str(tmp))
            got = loaded.signatures["serving_default"](image=tf.constant(check_batch(part)))
            _checker(part)("the SavedModel", got["logits" if part.logits else "features"].numpy(), reference, target)
        swap_in(out, {"savedmodel": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (out / ".classes.txt").unlink(missing_ok=True)
        shutil.rmtree(meta.parent, ignore_errors=True)
    return target


# --- Keras archive, LiteRT, int8 --------------------------------------------------------------------


@contextmanager
def staged(out: Path, fmt: str):
    """A fresh hidden folder in `out` for `fmt`'s files, removed afterwards whatever happens: they reach their
    names only by swap_in, once checked, so a failed check leaves an earlier export as it was."""
    tmp = out / f".{fmt}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(out: Path, tmp: Path, fmt: str, meta: dict) -> Path:
    """Write `meta` as the format's `<file>.json` where it has one, and move its checked files into place."""
    names = FILES[fmt]
    if names[0].endswith(".json"):
        (tmp / names[0]).write_text(json.dumps(meta, indent=2) + "\n")
    swap_in(out, {name: tmp / name for name in names})
    return out / names[-1]


def keras_layers() -> dict:
    """zoo's own Keras layer classes by their registered names ("zoo>SpecConv2D", ...), registered by this call.
    Keras 3 finds a class that is not its own only in that registry or in `custom_objects`: it imports a
    config's module for keras' own packages only (serialization_lib._retrieve_class_or_fn), so a .keras
    file with zoo's layers loads only in a process that ran zoo's layer code, and no Keras built-in does LRN."""
    import keras

    return {keras.saving.get_registered_name(cls): cls for kind in KINDS.values() for cls in kind.keras_classes()}


def export_keras(src: Source, out: Path, model, reference: np.ndarray) -> Path:
    """model.keras, Keras 3's archive of the built model (the spec's layer names), and model.keras.json;
    checked by reloading it with keras.saving.load_model."""
    import keras

    with staged(out, "keras") as tmp:
        model.save(tmp / "model.keras")
        loaded = keras.saving.load_model(tmp / "model.keras", custom_objects=keras_layers(), compile=False)
        _checker(src.part)("the .keras archive (reloaded)", loaded.predict(check_batch(src.part), verbose=0), reference, out / "model.keras")
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


def export_tflite(src: Source, out: Path, model, reference: np.ndarray) -> Path:
    """model.tflite (float32) and model.tflite.json, checked by the LiteRT interpreter."""
    from zoo.predict import litert, run_tflite

    with staged(out, "tflite") as tmp:
        (tmp / "model.tflite").write_bytes(tflite_convert(model))
        got = run_tflite(litert(tmp / "model.tflite"), check_batch(src.part))
        _checker(src.part)("the LiteRT model (LiteRT interpreter)", got, reference, out / "model.tflite")
        return publish(out, tmp, "tflite", artifact_metadata(src))


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


def export_tflite_int8(src: Source, out: Path, model, cal: Calibration) -> Path:
    """model-int8.tflite: full-integer post-training quantization (every op int8, int8 input and output),
    calibrated on `cal`; its agreement with the float model goes in model-int8.tflite.json."""
    import tensorflow as tf

    from zoo.predict import litert, run_tflite

    def full_integer(converter):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in cal.images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # an op without an int8 kernel fails here
        converter.inference_input_type = converter.inference_output_type = tf.int8

    with staged(out, "tflite-int8") as tmp:
        (tmp / "model-int8.tflite").write_bytes(tflite_convert(model, full_integer))
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


def second_size(part: Part) -> tuple[int, int]:
    """Where an ONNX graph of any input size is checked besides the part's own: larger, neither side a
    multiple of 32, so the layers' padding and rounding meet other remainders."""
    h, w = part.size
    return (h + 19, w + 37)


MIN_OPSET = 13  # the ops zoo writes (Softmax's axis, BatchNormalization's outputs) as they are from opset 13 on


def _check_opset(opset: int) -> None:
    """Before any work: an opset zoo's nodes are written for, up to the installed onnx's newest."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ZooError(f"ONNX opset {opset} is not supported: zoo writes opsets {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                       f"(the installed onnx {onnx.__version__}'s newest)")


def export(source, formats=DEFAULT_FORMATS, out=None, opset: int = DEFAULT_OPSET, include_top: bool = True,
           pooling: str | None = None, calibration=None) -> list[Path]:
    """Export `source` (run folder or weights file) to each of `formats` under `out`, each checked; with
    include_top=False the headless trunk, `pooling` "avg" or "max" on its map (zoo.features.select). The
    int8 formats calibrate on the images under `calibration` (default: a run's training images)."""
    formats = list(formats)
    _check_opset(opset)
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
    from functools import cache

    @cache
    def keras_model(size=None):  # built when first needed: after the ONNX check, so TensorFlow loads only then
        from zoo.backends.keras import create_model

        return create_model(None, weights=src.weights, include_top=include_top, pooling=pooling, input_size=size)

    @cache
    def reference(size=None):  # the trained model's logits stored by zoo finetune where they apply, else Keras'
        if size is None and (stored := stored_reference(Path(source), src)) is not None:
            return stored
        return keras_model(size).predict(check_batch(src.part, size=size), verbose=0)

    @cache
    def calibrated():
        return calibration_set(Path(source), calibration, src.part, keras_model())

    steps = {"onnx": lambda: export_onnx(src, out, reference, opset),
             "savedmodel": lambda: export_savedmodel(src, out, keras_model(), reference()),
             "keras": lambda: export_keras(src, out, keras_model(), reference()),
             "tflite": lambda: export_tflite(src, out, keras_model(), reference()),
             "tflite-int8": lambda: export_tflite_int8(src, out, keras_model(), calibrated()),
             "onnx-int8": lambda: export_onnx_int8(src, out, calibrated(), opset)}
    written = []
    with bar(len(formats), f"exporting to {out}", "format") as progress:
        for fmt in sorted(set(formats), key=ORDER.index):
            written.append(steps[fmt]())
            progress.update()
    (out / "classes.txt").write_text("\n".join(src.classes) + "\n")
    return written
