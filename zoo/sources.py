"""What a weight-source plugin provides, and the layout transforms plugins use to reach the canonical layout.

A source reads a foreign file and returns `Imported`: the spec the tensors are for and every tensor
under its canonical name (`conv1.kernel`, `fc6.bias`, ...) in the canonical layout of docs/formats.md.
The core checks, writes and re-reads the result; a source never writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.spec import ModelSpec


@dataclass
class Imported:
    spec: str  # "alexnet@bvlc"; or a ModelSpec for a spec the source builds itself
    tensors: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)  # shown to the user: mapping used, provenance found
    metadata: dict[str, str] = field(default_factory=dict)  # extra `__metadata__` entries
    source_format: str = ""


class WeightSource:
    """Base class for weight sources. Subclass it, set the attributes, implement `read`."""

    name: str = ""  # what users type: `zoo convert NAME FILE`
    format: str = ""  # one line: the file format it reads
    extensions: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()  # spec ids it can produce ("alexnet@bvlc"); empty if any

    def sniff(self, path: Path, head: bytes) -> bool:
        """True when the file looks like this source's format (`head` is its first 4 KiB)."""
        return False

    def read(self, path: Path, spec: ModelSpec | None, options: dict) -> Imported:
        """Read `path` into canonical tensors. `spec` is the user's `--spec`, if any. Raise ZooError."""
        raise NotImplementedError


# --- layout transforms: foreign layout -> canonical -------------------------------------------------


def conv_from_oihw(w: np.ndarray) -> np.ndarray:
    """Caffe/PyTorch conv weight (out, in/groups, kh, kw) -> canonical HWIO. Groups need no regrouping."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def dense_from_out_in(w: np.ndarray) -> np.ndarray:
    """Caffe/PyTorch fully connected weight (out, in) -> canonical (in, out)."""
    return np.ascontiguousarray(w.T)


def dense_from_chw_flatten(w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """(out, C*H*W) weight of a dense layer after a C,H,W flatten -> canonical (H*W*C, out)."""
    c, h, wd = chw
    out = w.shape[0]
    return np.ascontiguousarray(w.reshape(out, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, out))


def flatten_input_chw(spec: ModelSpec, layer: str) -> tuple[int, int, int] | None:
    """(C, H, W) of the feature map flattened right before dense `layer`, or None if not after a flatten."""
    infos = spec.layer_infos
    names = [i.name for i in infos]
    i = names.index(layer)
    # walk back over layers that do not change values' order (dropout) to the flatten
    j = i - 1
    while j >= 0 and infos[j].kind == "dropout":
        j -= 1
    if j < 1 or infos[j].kind != "flatten":
        return None
    h, w, c = infos[j - 1].output_shape
    return (c, h, w)


def foreign_to_canonical(spec: ModelSpec, weights: dict[str, tuple[np.ndarray, np.ndarray]], path=None) -> dict:
    """Map {layer: (W, b)} in the Caffe/PyTorch layout (OIHW convs, (out, in) dense) onto the spec."""
    tensors = {}
    for info in spec.weighted_layers:
        if info.name not in weights:
            continue  # reported as missing by the core's check, with all the others
        w, b = weights[info.name]
        if info.kind == "conv":
            if w.ndim != 4:
                raise ZooError(f"{info.name}: expected a 4-d conv weight, got shape {w.shape}", path)
            w = conv_from_oihw(w)
        else:
            if w.ndim != 2:
                raise ZooError(f"{info.name}: expected a 2-d dense weight, got shape {w.shape}", path)
            chw = flatten_input_chw(spec, info.name)
            w = dense_from_chw_flatten(w, chw) if chw and w.shape[1] == chw[0] * chw[1] * chw[2] else dense_from_out_in(w)
        tensors[f"{info.name}.kernel"] = w
        tensors[f"{info.name}.bias"] = b
    return tensors


def match_spec(tensors: dict[str, np.ndarray], requested: ModelSpec | None, path=None) -> ModelSpec:
    """The spec whose tensor names and shapes these are: `requested`, or the one registered spec that fits.

    A head of another width still fits (a fine-tuned model): the spec is then re-headed to match.
    """
    from zoo.registry import all_specs

    def reheaded(spec: ModelSpec) -> ModelSpec:
        bias = tensors.get(f"{spec.head}.bias")
        return spec.with_num_classes(bias.shape[0]) if bias is not None and bias.ndim == 1 and bias.shape[0] > 0 else spec

    def misfits(spec: ModelSpec) -> list[str]:
        want = spec.tensors
        bad = [n for n in want if n not in tensors or tuple(tensors[n].shape) != want[n].shape]
        return bad + sorted(n for n in tensors if n not in want)

    candidates = [reheaded(requested)] if requested else [reheaded(s) for s in all_specs().values()]
    fitting = [s for s in candidates if not misfits(s)]
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise ZooError(f"tensors fit several specs ({', '.join(s.id for s in fitting)}); choose one with --spec", path)
    if not candidates:
        raise ZooError("no model spec is registered", path)
    nearest = min(candidates, key=lambda s: len(misfits(s)))
    details = []
    for name in misfits(nearest)[:8]:
        have = tensors.get(name)
        want = nearest.tensors.get(name)
        details.append(f"{name}: " + ("missing" if have is None else "not in the spec" if want is None else f"{tuple(have.shape)} != {want.shape}"))
    more = len(misfits(nearest)) - len(details)
    raise ZooError(
        f"tensors match no registered model spec; nearest is {nearest.id}: " + "; ".join(details) + (f" (+{more} more)" if more > 0 else ""),
        path,
    )


def map_file(path):
    """The file's bytes, memory-mapped read-only (zero-copy for readers that slice it); b"" when empty."""
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
