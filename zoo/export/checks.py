"""What every export is checked and labelled with: the exported part of the weights (Source), the fixed seeded
batch, the comparison with the Keras model's logits, and the logits a run stored at the end of training."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.registry import load_weights
from zoo.spec import ModelSpec
from zoo.weights import Weights, atomic_write, file_digest


@dataclass
class Source:
    weights: Weights
    classes: list[str]
    part: Part  # what the export computes of the spec (zoo.features.select)

    @property
    def spec(self) -> ModelSpec:
        return self.weights.spec


class KerasModel:
    """The Keras model of what is exported, built when first needed (after the ONNX check: TensorFlow loads
    only then). A TensorFlow format drops it once its file is written and before its check loads that file:
    model and reloaded file together were 3.6x VGG16's weights for a SavedModel. The next one rebuilds it."""

    def __init__(self, src: Source, include_top: bool, pooling: str | None):
        self.src, self.include_top, self.pooling, self.built = src, include_top, pooling, {}

    def __call__(self, size=None, folded: bool = False):
        """The model at `size`, `folded` for inference (zoo.fold) or as trained; one at a time: another is dropped first."""
        if (size, folded) not in self.built:
            from zoo.backends.keras import create_model

            self.drop()
            self.built[size, folded] = create_model(None, weights=self.src.weights, include_top=self.include_top,
                                                    pooling=self.pooling, input_size=size, folded=folded)
        return self.built[size, folded]

    def drop(self) -> None:
        if not self.built:
            return
        import gc

        import keras

        self.built.clear()
        keras.backend.clear_session()
        gc.collect()


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
    top-5; else ZooError. What was measured is said on stderr either way. Features are compared by value only: near-equal activations may swap ranks."""
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max()) / scale
    k = min(5, want.shape[1])
    same = not ranks or np.array_equal(np.argsort(-got, 1)[:, :k], np.argsort(-want, 1)[:, :k])
    measured = f"max difference {err:.2e} of the outputs' scale" + (f", top-{k} {'identical' if same else 'DIFFERENT'}" if ranks else "")
    if err > 1e-4 or not same:
        raise ZooError(f"{name} does not match the Keras model: {measured}", where)
    print(f"zoo: {name} matches the Keras model on {len(want)} images: {measured}", file=sys.stderr, flush=True)
    return err


def checker(part: Part):
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
