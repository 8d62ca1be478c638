"""What part of a spec a model computes, as Keras Applications and timm users choose it (create_model's
include_top, pooling, outputs and input_size; the exports' options), and `zoo features`: a layer's output
for a list of images.

A `Part` is backend-neutral: the layers to build (shapes inferred at its input size), the layers whose
outputs are the model's, and the global pooling applied to those that are spatial maps. The Keras and ONNX
drivers build what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.layers import Node
from zoo.preprocess import oversized
from zoo.spec import ModelSpec
from zoo.weights import atomic_write

POOLINGS = ("avg", "max")


@dataclass(frozen=True)
class Part:
    spec: ModelSpec
    nodes: tuple[Node, ...]  # the layers the outputs need, in the graph's order, shapes at `size`
    outputs: tuple[str, ...]
    pooling: str | None
    size: tuple[int, int]

    @property
    def input(self) -> dict:
        """The spec's `input` at this size, for preprocessing: at another size its `resize` scales with the
        larger side, so the crop keeps its share of the image (timm's crop_pct)."""
        cfg = dict(self.spec.input, size=list(self.size))
        if "resize" in cfg and list(self.size) != list(self.spec.input["size"]):
            cfg["resize"] = int(cfg["resize"] * max(self.size) / max(self.spec.input["size"]))
        return cfg

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.size, self.spec.input["channels"])

    @property
    def logits(self) -> bool:
        """Whether the part is the whole network, whose output is the logits."""
        return self.outputs == (self.spec.nodes[-1].name,)

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = next(n.output_shape for n in self.nodes if n.name == name)
        return shape[-1:] if self.pooling else shape


def select(spec: ModelSpec, include_top: bool = True, pooling: str | None = None, outputs=None, input_size=None) -> Part:
    """The part of `spec` a model computes. `include_top=False` ends at the trunk (ModelSpec.trunk);
    `outputs` (layer names or a torchvision module's dotted prefix) makes those layers' outputs the model's
    instead; `pooling` ("avg" or "max") pools each output spatial map to one value per channel; `input_size`
    (H, W) where every layer kept allows it. One ZooError for whatever cannot be."""
    if pooling not in (None, *POOLINGS):
        raise ZooError(f"pooling is 'avg', 'max' or None, not {pooling!r}")
    if outputs is not None and not include_top:
        raise ZooError("outputs names the model's outputs: give it or include_top=False, not both")
    if isinstance(outputs, str):
        outputs = [outputs]
    if outputs is not None:
        names = tuple(spec.output_name(o) for o in outputs)
        if not names or len(set(names)) != len(names):
            raise ZooError(f"outputs must name one or more distinct layers, not {list(outputs)}")
    else:
        names = (spec.nodes[-1].name,) if include_top else (spec.trunk,)
    flat = [n for n in names if len(spec.node(n).output_shape) != 3] if pooling else []
    if flat:
        hint = " (include_top=False gives the trunk's map)" if outputs is None else ""
        raise ZooError(f"{spec.id}: pooling {pooling!r} pools spatial maps; {flat[0]!r} outputs {spec.node(flat[0]).output_shape}{hint}")
    size = tuple(input_size) if input_size is not None else tuple(spec.input["size"])
    return Part(spec, spec.subgraph(names, size), names, pooling, size)


# --- zoo features ----------------------------------------------------------------------------------


def extract(model, images, layer: str | None = None, weights=None, batch_size: int = 32, pooling: str | None = None,
            input_size=None) -> tuple[np.ndarray, list[str]]:
    """(`layer`'s output for each image, one row each; the image paths in row order). `images`: files, or
    folders searched with their sub-folders. `layer` defaults to the trunk's output. The images are decoded
    by tf.data and run through the Keras model in batches, by the frozen-feature pass of fine-tuning."""
    import tensorflow as tf

    from zoo.backends.keras import create_model
    from zoo.data import Samples, image_problem
    from zoo.finetune.caching import features
    from zoo.predict import image_files

    if batch_size < 1:
        raise ZooError(f"the batch size is 1 or more, not {batch_size}")
    paths = [str(p) for p in image_files(images)]
    if not paths:
        raise ZooError("no images: give image files, or folders holding JPEG or PNG images")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ZooError("no such image", missing[0])
    for path in paths:  # headers only, before any decoder unpacks a bomb
        if problem := oversized(path):
            raise ZooError(problem, path)
    choice = {"outputs": [layer]} if layer else {"include_top": False}
    net = create_model(model, weights=weights, pooling=pooling, input_size=input_size, **choice)
    samples = Samples(paths, np.zeros(len(paths), np.int32), [])
    try:
        out = features(net, samples, net.zoo_part, batch_size, desc=f"features of {net.zoo_part.outputs[0]}")
    except tf.errors.InvalidArgumentError as e:  # a file that is no image stops tf.data: name the problem
        bad = next((p for p in paths if image_problem(p)), None)  # tf.data's error names no file: find it
        raise ZooError(f"an image could not be decoded ({e.message.splitlines()[-1].strip()})", bad) from None
    return out, paths


def outputs(output) -> tuple[Path, Path]:
    """(OUT.npy for the features, OUT.txt for the image paths, one a line, in the features' row order)."""
    output = Path(output)
    if output.suffix != ".npy":
        raise ZooError("the features file must end in .npy (the image list goes beside it, as .txt)", output)
    return output, output.with_suffix(".txt")


def write(output, feats: np.ndarray, paths: list[str]) -> tuple[Path, Path]:
    npy, txt = outputs(output)
    with atomic_write(npy) as f:
        np.save(f, feats)
    with atomic_write(txt) as f:
        f.write("".join(f"{p}\n" for p in paths).encode())
    return npy, txt
