"""Export verified weights (or a fine-tune run) to a TensorFlow SavedModel and to ONNX, each proven
equal to the Keras model on a fixed seeded batch before it is called done.

ONNX is written from the spec by zoo.backends.onnx (each layer kind's own nodes, weights streamed);
nothing is trusted until onnx.checker and ONNX Runtime agree with TensorFlow.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from zoo.backends.onnx import DEFAULT_OPSET, onnx_graph, size_free, write_onnx
from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.progress import bar
from zoo.registry import load_weights
from zoo.spec import ModelSpec
from zoo.weights import Weights

FORMATS = ("savedmodel", "onnx")


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


# --- replacing an earlier export -----------------------------------------------------------------------

ONNX_FILES = ("model.onnx.data", "model.onnx")  # the main file last
EXPORTS = (("savedmodel",), ONNX_FILES)


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
        write_onnx(tmp / target.name, model, inits, release=src.weights.release, external=external)
        onnx.checker.check_model(str(tmp / target.name), full_check=True)
        session = ort.InferenceSession(str(tmp / target.name), providers=["CPUExecutionProvider"])
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
    return target


def second_size(part: Part) -> tuple[int, int]:
    """Where an ONNX graph of any input size is checked besides the part's own: larger, neither side a
    multiple of 32, so the layers' padding and rounding meet other remainders."""
    h, w = part.size
    return (h + 19, w + 37)


def export(source, formats=FORMATS, out=None, opset: int = DEFAULT_OPSET, include_top: bool = True,
           pooling: str | None = None) -> list[Path]:
    """Export `source` (run folder or weights file) to each of `formats` under `out`, each checked; with
    include_top=False the headless trunk, `pooling` "avg" or "max" on its map (zoo.features.select)."""
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ZooError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)}")
    src = open_source(source, include_top, pooling)
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
    def reference(size=None):
        return keras_model(size).predict(check_batch(src.part, size=size), verbose=0)

    written = []
    with bar(len(formats), f"exporting to {out}", "format") as progress:
        if "onnx" in formats:
            written.append(export_onnx(src, out, reference, opset))
            progress.update()
        if "savedmodel" in formats:
            written.append(export_savedmodel(src, out, keras_model(), reference()))
            progress.update()
    (out / "classes.txt").write_text("\n".join(src.classes) + "\n")
    return written
