"""What a weight-source plugin provides, and the matcher that fits a file's parameters to a spec.

A source reads a foreign file into `{layer: {param: array}}` as the file names them (zoo.layers.base
lists the conventions: torch, caffe, keras, caffe-tensorflow) and calls `fit_params`, which finds the
spec they are for and has each layer kind turn its parameters into canonical tensors. A new weighted
layer kind therefore needs no change to any reader. The core checks, writes and re-reads the result;
a source never writes files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.graph import consumers
from zoo.layers import KINDS
from zoo.layers.base import CONVENTIONS, ROW_MAJOR
from zoo.mapped import map_file, release_pages  # noqa: F401 (the plugin API: docs/plugins.md)
from zoo.spec import ModelSpec

Params = dict[str, dict[str, np.ndarray]]  # {layer: {param: array}} as a file names them


@dataclass
class Imported:
    spec: str | ModelSpec  # "alexnet@bvlc"; or a ModelSpec
    tensors: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)  # shown to the user: mapping used, provenance found
    metadata: dict[str, str] = field(default_factory=dict)  # extra `__metadata__` entries
    source_format: str = ""
    # release(array): let the pages of a mapped source under `array` (one of `tensors`, or a part of one) go
    # once the core has written it, so that the source is never resident beside the output (release_pages)
    release: Callable[[np.ndarray], None] | None = None


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


@dataclass
class Fit:
    spec: ModelSpec
    tensors: dict[str, np.ndarray]
    mapping: dict[str, str]  # file layer -> spec layer
    how: str  # "names", "order" or "map"
    dropped: dict[str, list[str]] = field(default_factory=dict)  # foreign param -> layers it was dropped from
    notes: list[str] = field(default_factory=list)


def _assignments(layers: list[str], spec: ModelSpec, mapping: dict | None, orders):
    """(how, {file layer: spec layer}, note) to try in turn: the user's map alone; else by names; else, when the
    counts agree, pairing the file's layers in its order with the spec's weighted layers in each order: the
    spec's own, then the reader's `orders(spec)` ((order, note) pairs), each order once."""
    wanted = [n.name for n in spec.weighted_nodes]
    if mapping:
        yield "map", {f: mapping.get(f, f) for f in layers}, None
    elif set(layers) == set(wanted):
        yield "names", {n: n for n in layers}, None
    elif len(layers) == len(wanted):
        tried = []
        for order, note in [(wanted, None), *(orders(spec) if orders else ())]:
            if order not in tried:
                tried.append(order)
                yield "order", dict(zip(layers, order)), note


def _rehead(spec: ModelSpec, arrays: dict | None, convention: str) -> ModelSpec:
    """The spec with the head's width found in the file: a fine-tuned head of another width still fits."""
    node = spec.node(spec.head)
    kind = KINDS[node.kind]
    foreign = {p: f for f, p in kind.names_in(convention, node).items()}.get("kernel")
    arr = (arrays or {}).get(foreign)
    if arr is None or arr.ndim < 2:
        return spec
    width = arr.shape[0] if convention in ROW_MAJOR else arr.shape[-1]
    return spec.with_num_classes(width) if width > 0 else spec


def _check_layer(node, kind, convention: str, arrays: dict, problems: list, dropped: dict) -> dict:
    """The arrays of one layer that the kind takes, after checking names, dtypes and foreign shapes."""
    names = kind.names_in(convention, node)
    ignored = kind.ignored.get(convention, ())
    taken = {}
    for foreign, arr in arrays.items():
        if foreign in ignored:
            dropped.setdefault(foreign, []).append(node.name)
        elif foreign not in names:
            problems.append(f"{node.name}: unexpected parameter {foreign!r} (a {node.kind} layer has {', '.join(names)})")
        elif not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"{node.name}.{foreign}: {arr.dtype}, not float")
        elif tuple(arr.shape) != (want := kind.foreign_shape(convention, node, names[foreign])):
            problems.append(f"{node.name}.{foreign}: {tuple(arr.shape)} != {want}")
        else:
            taken[foreign] = arr
    problems += [f"{node.name}.{f}: missing" for f in names if f not in arrays]
    return taken


def _unfold_scales(spec: ModelSpec, mapped: Params) -> Params:
    """caffe-tensorflow folds each Scale layer into the BatchNorm before it (as the BatchNorm's `scale` and
    `offset`, the Scale layer gone): give them back to the spec's scale layer."""
    readers = consumers(spec.nodes)
    out = dict(mapped)
    for node in spec.nodes:
        arrays, after = out.get(node.name) or {}, readers.get(node.name, [])
        if node.kind == "batchnorm" and "scale" in arrays and len(after) == 1 and spec.node(after[0]).kind == "scale" \
                and after[0] not in out:
            out[node.name] = {k: v for k, v in arrays.items() if k not in ("scale", "offset")}
            out[after[0]] = {k: v for k, v in arrays.items() if k in ("scale", "offset")}
    return out


def _try(spec: ModelSpec, layers: Params, assignment: dict[str, str], convention: str, release=None):
    """Map the layers under `assignment`: (Fit or None, problems). Shapes are checked in the file's
    layout first, so only a fitting spec pays for the transforms."""
    mapped, problems, dropped = {}, [], {}
    names = set(spec.layer_names)
    for fname, arrays in layers.items():
        target = assignment.get(fname, fname)
        if target in names:
            mapped[target] = arrays
        else:
            problems.append(f"{fname}: no layer {target!r} in the spec")
    if convention == "caffe-tensorflow":
        mapped = _unfold_scales(spec, mapped)
    spec = _rehead(spec, mapped.get(spec.head), convention)
    weighted = {n.name: n for n in spec.weighted_nodes}
    checked = {}
    for name, node in weighted.items():
        if name not in mapped:
            problems.append(f"{name}: missing")
            continue
        checked[name] = _check_layer(node, KINDS[node.kind], convention, mapped[name], problems, dropped)
    problems += [f"{name}: not a weighted layer of the spec" for name in mapped if name not in weighted]
    if problems:
        return None, problems
    tensors = {}
    for name, arrays in checked.items():
        node = weighted[name]
        for param, value in KINDS[node.kind].import_params(convention, node, arrays, release).items():
            tensors[f"{name}.{param}"] = value
    return Fit(spec, tensors, assignment, "", dropped), []


def fit_params(layers: Params, convention: str, requested: ModelSpec | None = None, path=None,
               mapping: dict[str, str] | None = None, release=None, candidates=None, orders=None) -> Fit:
    """Find the spec these parameters are for: by layer names, else by the order of weighted layers (when
    the counts agree and every shape then fits), or by an explicit `mapping` {file layer: spec layer}.
    `orders(spec)`, for a format whose writer lists layers in an order of its own, gives more orders of the
    spec's weighted layers to try after the spec's own, each with the note to show when it is the one that
    fits: [(order, note)].

    Considers `requested`, else `candidates` (default: every registered spec); exactly one must fit.
    `release(array)` is called for each source array once its transform is written (see release_pages:
    a mapped file's pages need not stay resident beside the output)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown parameter convention {convention!r}")
    if requested:
        candidates = [requested]
    elif candidates is None:
        from zoo.registry import all_specs

        candidates = list(all_specs().values())
    if not candidates:
        raise ZooError("no model spec is registered", path)
    layers = {name: arrays for name, arrays in layers.items() if arrays}
    fits, misses = [], []
    for spec in candidates:
        extra = sorted(n for n in layers if spec.extra_layers and n not in spec.layer_names and any(fnmatch(n, p) for p in spec.extra_layers))
        kept = {n: a for n, a in layers.items() if n not in extra}
        # when neither names nor counts line up, report the problems by name
        for how, assignment, note in list(_assignments(list(kept), spec, mapping, orders)) or [("names", {}, None)]:
            fit, problems = _try(spec, kept, assignment, convention, release)
            if fit:
                fit.how = how
                fit.notes += [note] if note else []
                fit.notes += [f"dropped layers that {spec.id} does not have (training only): {', '.join(extra)}"] if extra else []
                fits.append(fit)
                break
            misses.append((len(problems), spec.id, problems))
    if fits:
        return _one_fit(fits, path)
    _, spec_id, problems = min(misses)
    more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
    raise ZooError(f"the weights match no registered model spec; nearest is {spec_id}: " + "; ".join(problems[:8]) + more, path)


def _named_in(fit: Fit, filename: str) -> bool:
    """Whether the file's name says which spec: its family, or one of its published files' names."""
    stem = filename.lower()
    published = [Path(f).stem.lower() for f in fit.spec.provenance.get("reference_files", {})]
    return fit.spec.family in stem or any(p and p in stem for p in published)


def _one_fit(fits: list[Fit], path) -> Fit:
    """The fit to take when several specs hold tensors of these names and shapes: by names over by order,
    else the one the file's name names (AlexNet and CaffeNet have the same tensors); else ask."""
    if len(fits) == 1:
        return fits[0]
    for why, keep in (("by layer names", lambda f: f.how != "order"), ("from the file name", lambda f: path and _named_in(f, Path(path).name))):
        narrowed = [f for f in fits if keep(f)]
        if len(narrowed) == 1:
            others = ", ".join(f.spec.id for f in fits if f is not narrowed[0])
            narrowed[0].notes.append(f"the tensors also fit {others}; chose {narrowed[0].spec.id} ({why}); --spec chooses another")
            return narrowed[0]
        fits = narrowed or fits
    raise ZooError(f"the weights fit several specs ({', '.join(f.spec.id for f in fits)}); choose one with --spec", path)


def mapping_notes(fit: Fit) -> list[str]:
    """What to tell the user: a mapping that was not by matching names, parameters read and dropped."""
    notes = fit.notes + [f"dropped {param} of {len(layers)} layer(s) (not needed for inference or fine-tuning)"
                         for param, layers in fit.dropped.items()]
    if fit.how in ("names", ""):
        return notes
    pairs = ", ".join(f"{f} -> {t}" for f, t in fit.mapping.items())
    return [f"layers matched to {fit.spec.id} by {'the given map' if fit.how == 'map' else 'order and shape'}: {pairs}"] + notes
