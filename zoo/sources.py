"""What a weight-source plugin provides, and the layout transforms plugins use to reach the canonical layout.

A source reads a foreign file and returns `Imported`: the spec the tensors are for and every tensor
under its canonical name (`conv1.kernel`, `fc6.bias`, ...) in the canonical layout of docs/formats.md.
The core checks, writes and re-reads the result; a source never writes files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.mapped import map_file, release_pages  # noqa: F401 (the plugin API: docs/plugins.md)
from zoo.spec import ModelSpec
from zoo.weights import Deferred


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
    options: dict[str, str] = {}  # extra `zoo convert` options it takes ({"prototxt": "help"}): --prototxt FILE

    def sniff(self, path: Path, head: bytes) -> bool:
        """True when the file looks like this source's format (`head` is its first 4 KiB)."""
        return False

    def read(self, path: Path, spec: ModelSpec | None, options: dict) -> Imported:
        """Read `path` into canonical tensors. `spec` is the user's `--spec`, if any. Raise ZooError."""
        raise NotImplementedError


# --- layout transforms: foreign layout -> canonical -------------------------------------------------


_SLAB = 32  # source rows per step: the slab (plus padding) stays in L2 while it is scattered into columns
_PAD = 16  # floats added to the slab's row pitch: a power-of-two pitch (fc7's 4096) thrashes cache sets


def rows_to_columns(w: np.ndarray, chw: tuple[int, int, int], out: np.ndarray) -> None:
    """out[(h, w, c), o] = w[o, (c, h, w)]: every foreign-to-canonical transform is this one transpose.

    Conv (out, in, kh, kw) -> HWIO is chw = (in, kh, kw); dense (out, in) -> (in, out) is (in, 1, 1); a
    dense layer after Caffe/PyTorch's C,H,W flatten is its feature map's (C, H, W). numpy copies a
    transposed view element by element with a large stride (0.5 s for fc7); copying a slab of rows into
    a padded buffer first, permuting (c, h, w) -> (h, w, c) on the way, then writing the slab's columns
    is 5-6x faster. Big matrices use two threads (numpy copies release the GIL)."""
    rows, cols = w.shape
    c, h, wd = chw

    def copy(lo, hi):
        pad = np.empty((_SLAB, cols + _PAD), dtype=w.dtype)
        for i in range(lo, hi, _SLAB):
            n = min(_SLAB, hi - i)
            slab = pad[:n, :cols]
            slab.reshape(n, h, wd, c)[...] = w[i:i + n].reshape(n, c, h, wd).transpose(0, 2, 3, 1)
            out[:, i:i + n] = slab.T

    half = rows // 2 // _SLAB * _SLAB
    if w.nbytes < 1 << 22 or half == 0:
        copy(0, rows)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(copy, (0, half), (half, rows)))


def flatten_input_chw(spec: ModelSpec, layer: str) -> tuple[int, int, int] | None:
    """(C, H, W) of the feature map flattened right before dense `layer`, or None if not after a flatten."""
    infos = spec.layer_infos
    j = spec.layer_names.index(layer) - 1
    while j >= 0 and infos[j].kind == "dropout":  # dropout keeps the order of values
        j -= 1
    if j < 1 or infos[j].kind != "flatten":
        return None
    h, w, c = infos[j - 1].output_shape
    return (c, h, w)


# A layer as read from a file: (weight, bias or None), in the file's own layout.
Layer = tuple[np.ndarray, "np.ndarray | None"]
CANONICAL, OIHW = "canonical", "oihw"  # source layouts: zoo's (Keras') own, or Caffe/PyTorch's


def layer_to_canonical(spec: ModelSpec, layer: str, weight: np.ndarray, layout: str, release=None) -> np.ndarray | Deferred:
    """One layer's weight in `layout` -> canonical, using the spec to know conv vs dense and flatten order.

    A foreign layout gives a Deferred: the transpose runs when the writer places the tensor in the output
    file, and `release(weight)` follows it (the source's pages are no longer needed)."""
    if layout == CANONICAL:
        return weight
    out = weight.shape[0]
    if spec.layer(layer).kind == "conv":
        _, cin, kh, kw = weight.shape
        chw, shape = (cin, kh, kw), (kh, kw, cin, out)
    else:
        chw = flatten_input_chw(spec, layer)
        if not chw or weight.shape[1] != chw[0] * chw[1] * chw[2]:
            chw = (weight.shape[1], 1, 1)
        shape = (weight.shape[1], out)

    def fill(dst):
        rows_to_columns(weight.reshape(out, -1), chw, dst.reshape(-1, out))
        if release:
            release(weight)

    return Deferred(shape, weight.dtype, fill)


@dataclass
class Fit:
    spec: ModelSpec
    tensors: dict[str, np.ndarray]
    mapping: dict[str, str]  # file layer -> spec layer
    how: str  # "names", "order" or "map"


def _assignments(names: list[str], spec: ModelSpec, mapping: dict | None):
    wanted = [i.name for i in spec.weighted_layers]
    if mapping:
        yield "map", {f: mapping.get(f, f) for f in names}
        return
    if set(names) == set(wanted):
        yield "names", {n: n for n in names}
    elif len(names) == len(wanted):
        yield "order", dict(zip(names, wanted))


def _source_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A canonical kernel shape as it appears in a source `layout`."""
    if layout == CANONICAL:
        return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])


def _try(spec: ModelSpec, layers: dict[str, Layer], assignment: dict[str, str], layout: str, release=None):
    """Map the layers under `assignment`: (canonical tensors or None, problems, spec re-headed to fit).

    Shapes are checked in the source's layout first, so only a fitting spec pays for the transforms."""
    mapped, problems = {}, []
    for fname, pair in layers.items():
        target = assignment.get(fname, fname)
        if target in spec.layer_names:
            mapped[target] = pair
        else:
            problems.append(f"{fname}: no layer {target!r} in the spec")
    head = mapped.get(spec.head)
    if head is not None and head[1] is not None and head[1].ndim == 1 and head[1].shape[0] > 0:
        spec = spec.with_num_classes(head[1].shape[0])  # a fine-tuned head of another width still fits
    weighted = {info.name: info for info in spec.weighted_layers}
    for name, info in weighted.items():
        kernel, bias = info.tensors
        w, b = mapped.get(name, (None, None))
        want = _source_shape(kernel.shape, layout)
        if w is None:
            problems.append(f"{kernel.name}: missing")
        elif tuple(w.shape) != want:
            problems.append(f"{kernel.name}: {tuple(w.shape)} != {want}")
        if b is None:
            problems.append(f"{bias.name}: missing")
        elif tuple(b.shape) != bias.shape:
            problems.append(f"{bias.name}: {tuple(b.shape)} != {bias.shape}")
    problems += [f"{name}: not a weighted layer of the spec" for name in mapped if name not in weighted]
    if problems:
        return None, problems, spec
    tensors = {}
    for name, (w, b) in mapped.items():
        tensors[f"{name}.kernel"] = layer_to_canonical(spec, name, w, layout, release)
        tensors[f"{name}.bias"] = b
    return tensors, problems, spec


def fit_layers(layers: dict[str, Layer], requested: ModelSpec | None = None, path=None, layout: str = CANONICAL,
               mapping: dict[str, str] | None = None, release=None) -> Fit:
    """Find the spec these layers are: by layer names, else by the order of weighted layers (when the
    counts agree and every shape then fits), or by an explicit `mapping` {file layer: spec layer}.

    Considers `requested` or every registered spec; exactly one must fit. Shapes are compared in the
    source's layout. `release(weight)` is called for each source weight once its transform is written
    (see release_pages: a mapped file's pages need not stay resident beside the output).
    """
    from zoo.registry import all_specs

    candidates = [requested] if requested else list(all_specs().values())
    if not candidates:
        raise ZooError("no model spec is registered", path)
    fits, misses = [], []
    for spec in candidates:
        # when neither names nor counts line up, report the problems by name
        for how, assignment in list(_assignments(list(layers), spec, mapping)) or [("names", {})]:
            tensors, problems, fitted = _try(spec, layers, assignment, layout, release)
            if not problems:
                fits.append(Fit(fitted, tensors, assignment, how))
                break
            misses.append((len(problems), spec.id, problems))
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        raise ZooError(f"the weights fit several specs ({', '.join(f.spec.id for f in fits)}); choose one with --spec", path)
    _, spec_id, problems = min(misses)
    more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
    raise ZooError(f"the weights match no registered model spec; nearest is {spec_id}: " + "; ".join(problems[:8]) + more, path)


def mapping_notes(fit: Fit) -> list[str]:
    """What to tell the user about a mapping that was not by matching names."""
    if fit.how == "names":
        return []
    pairs = ", ".join(f"{f} -> {t}" for f, t in fit.mapping.items())
    return [f"layers matched to {fit.spec.id} by {'the given map' if fit.how == 'map' else 'order and shape'}: {pairs}"]
