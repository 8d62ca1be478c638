"""The inference form of a part of a spec: every per-channel affine layer (batch norm, Caffe's Scale) folded
into the layer before it, as TensorFlow Lite, OpenVINO and ONNX Runtime do on load.

A ResNet-50 block's conv -> batch norm (-> Scale) -> relu becomes conv -> relu: the batch norm's multiply
and add leave the graph, and TensorFlow runs the conv, its bias and the ReLU as one fused op
(docs/performance.md: zoo's ResNet-50 in Keras and as a SavedModel). Only for running a model: the folded
layers are gone, so they cannot be frozen, trained or read out by name; create_model(folded=True).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from zoo import graph
from zoo.features import Part
from zoo.layers import KINDS


def fold(part: Part, tensors: dict[str, np.ndarray], release=None) -> tuple[Part, dict[str, np.ndarray]]:
    """(`part` with each affine layer folded into its input's layer, the weights of that graph). A layer is
    folded where its input's layer feeds nothing else, neither is one of the part's outputs, all their
    weights are given and the input's kind can take it (Kind.absorb). Weights not involved pass as given;
    `release(array)` follows each one folded (a mapped file's pages go)."""
    users = graph.consumers(part.nodes)
    layers = {la["name"]: la for la in part.spec.layers}
    by_name = {n.name: n for n in part.nodes}
    kept: dict[str, dict] = {}  # layer dicts of the folded graph, inputs explicit
    params: dict[str, dict] = {}  # the weights of layers that took another in
    into: dict[str, str] = {}  # a folded layer -> the layer whose output now stands for its own
    for node in part.nodes:
        inputs = [into.get(i, i) for i in node.inputs]
        src = inputs[0]
        alone = len(inputs) == 1 and src in kept and len(users[node.inputs[0]]) == 1 and \
            not {node.name, node.inputs[0]} & set(part.outputs)
        absorbed = alone and _absorbed(node, kept[src], params.get(src) or _given(by_name[src], tensors), tensors)
        if not absorbed:
            kept[node.name] = dict(layers[node.name], inputs=inputs)
            continue
        kept[src], params[src] = absorbed
        into[node.name] = src
        for t in (*node.tensors, *by_name[src].tensors) if release else ():
            release(tensors[t.name])
    nodes = graph.infer(list(kept.values()), part.input_shape, f"{part.spec.id}, folded")
    rest = {t.name: tensors[t.name] for n in nodes if n.name not in params for t in n.tensors if t.name in tensors}
    return replace(part, nodes=nodes), rest | {f"{layer}.{p}": a for layer, ps in params.items() for p, a in ps.items()}


def _absorbed(node, layer: dict, weights: dict | None, tensors) -> tuple[dict, dict] | None:
    """(layer dict, weights) of `layer` with `node` folded in; None where `node` is no affine layer, a weight is
    missing or `layer`'s kind cannot take it."""
    mine = _given(node, tensors)
    affine = KINDS[node.kind].affine(node.config, mine) if mine is not None and weights is not None else None
    return KINDS[layer["kind"]].absorb(layer, weights, *affine) if affine else None


def _given(node, tensors) -> dict | None:
    """The node's weights by param, if all are given."""
    if not all(t.name in tensors for t in node.tensors):
        return None
    return {t.param: tensors[t.name] for t in node.tensors}
