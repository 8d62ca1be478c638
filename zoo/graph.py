"""A spec's layers as a graph: each layer names its inputs (default: the layer before it; the first
layer's is "input", the image). Layers are listed in an order where every input comes first, so that
order is the graph's topological order and every walker is one loop.

`infer` applies each kind's schema, checks configs and derives every output shape and parameter
tensor; `cut` finds where a graph splits into a frozen prefix and a trained rest.
"""

from __future__ import annotations

from zoo.errors import ZooError
from zoo.layers import KINDS, REQUIRED, Node, TensorSpec

INPUT = "input"


_WIRING = frozenset({"name", "kind", "inputs"})  # a layer's keys that are not its kind's config


def _config(kind, layer: dict) -> dict:
    schema = kind.schema
    cfg, unknown = dict(schema), []
    for k, v in layer.items():
        if k in schema:
            cfg[k] = v
        elif k not in _WIRING:
            unknown.append(k)
    if unknown:
        raise ValueError(f"unknown config {', '.join(sorted(unknown))} for kind {kind.name} (it takes: {', '.join(schema) or 'none'})")
    missing = [k for k, v in cfg.items() if v is REQUIRED]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return cfg


def _inputs(layer: dict, previous: str) -> tuple[str, ...]:
    inputs = layer.get("inputs")
    if inputs is None:  # most layers: the one before
        return (previous,)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise ValueError(f"inputs must be a layer name or a list of them, not {inputs!r}")
    return tuple(inputs)


def infer(layers, input_shape: tuple[int, ...], where: str) -> tuple[Node, ...]:
    """Every layer as a Node, in order; one ZooError naming the layer for the first problem."""
    nodes: dict[str, Node] = {}
    shapes = {INPUT: tuple(input_shape)}
    flat_from: dict[str, tuple | None] = {INPUT: None}
    previous = INPUT
    for layer in layers:
        name = layer.get("name") if isinstance(layer, dict) else None
        if not isinstance(name, str) or not name or name in shapes:
            raise ZooError(f"{where}, layer {name!r}: layer names must be unique, non-empty and not {INPUT!r}")
        kind = KINDS.get(layer.get("kind")) if isinstance(layer.get("kind"), str) else None
        if kind is None:
            raise ZooError(f"{where}, layer {name!r}: unknown kind {layer.get('kind')!r} (known: {', '.join(sorted(KINDS))})")
        try:
            inputs = _inputs(layer, previous)
            unknown = [i for i in inputs if i not in shapes]
            if unknown:
                raise ValueError(f"input {unknown[0]!r} is not an earlier layer (layers are listed inputs first)")
            if kind.inputs and len(inputs) != kind.inputs or not kind.inputs and len(inputs) < 2:
                raise ValueError(f"takes {kind.inputs or 'two or more'} input(s), not {len(inputs)}")
            cfg = _config(kind, layer)
            in_shapes = [shapes[i] for i in inputs]
            kind.check(cfg, in_shapes)
            out = tuple(kind.output_shape(cfg, in_shapes))
            tensors = tuple(TensorSpec(f"{name}.{p}", name, p, tuple(shape), layout)
                            for p, (shape, layout) in kind.params(cfg, in_shapes).items())
        except (KeyError, ValueError, TypeError) as e:
            raise ZooError(f"{where}, layer {name!r}: {e if not isinstance(e, KeyError) else f'missing {e}'}") from None
        flat = in_shapes[0] if kind.name == "flatten" and len(in_shapes[0]) == 3 else \
            flat_from[inputs[0]] if kind.passthrough else None
        nodes[name] = Node(name, kind.name, cfg, inputs, tuple(in_shapes), out, tensors, flat_from[inputs[0]])
        shapes[name], flat_from[name], previous = out, flat, name
    return tuple(nodes.values())


def consumers(nodes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {INPUT: []}
    for node in nodes:
        out.setdefault(node.name, [])
        for i in node.inputs:
            out[i].append(node.name)
    return out


def cut(nodes, first: str) -> tuple[str, int] | None:
    """Where the graph splits into a frozen prefix and the layers from `first` on: (the one layer whose
    output is all that the rest reads of the prefix, the index of the rest's first layer), or None when
    the rest reads several prefix layers (no single tensor to cache). Dropout right before `first` stays
    on the trained side: cached training must still apply it."""
    names = [n.name for n in nodes]
    start = names.index(first)
    while start > 0 and nodes[start - 1].kind == "dropout" and nodes[start].inputs == (names[start - 1],):
        start -= 1
    before = set(names[:start]) | {INPUT}
    read = {i for node in nodes[start:] for i in node.inputs if i in before}
    return (read.pop(), start) if len(read) == 1 else None


def ancestors(nodes, outputs) -> set[str]:
    """The layers that `outputs` (layer names) are computed from, themselves included."""
    inputs = {n.name: n.inputs for n in nodes}
    keep, todo = set(), list(outputs)
    while todo:
        name = todo.pop()
        if name != INPUT and name not in keep:
            keep.add(name)
            todo += inputs[name]
    return keep


def trunk(nodes, where: str) -> str:
    """The last layer of the convolutional trunk: the last layer, in the graph's order, whose output is a
    map (H, W, C) of more than one position. What follows it is the classifier (include_top=False drops
    it): global or whole-map pooling (a 1x1 map), flatten, dense, dropout, the head. An adaptive pooling
    only sizes the map for the flatten after it, so it belongs to the classifier too. One ZooError when
    the classifier also reads an earlier layer: no single tensor is the trunk's output."""
    for i in range(len(nodes) - 1, -1, -1):
        shape = nodes[i].output_shape
        if len(shape) == 3 and shape[0] * shape[1] > 1 and nodes[i].kind != "adaptive_avgpool":
            rest = {n.name for n in nodes[i + 1:]}
            read = {x for n in nodes[i + 1:] for x in n.inputs if x not in rest}
            if read != {nodes[i].name}:
                raise ZooError(f"{where}: the layers after {nodes[i].name!r}, its last spatial map, also read "
                               f"{', '.join(sorted(read - {nodes[i].name}))}: no single trunk output")
            return nodes[i].name
    raise ZooError(f"{where}: no layer outputs a spatial map of more than one position: no convolutional trunk")
