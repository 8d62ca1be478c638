"""Model specs: plain data (zoo/specs/*.json or a plugin's) and what is derived from it.

A spec is a graph of layers (zoo.graph) plus the input it expects, its head and its provenance. The
parameter tensors, output shapes and parameter counts are derived from the layer configs by each
layer kind (zoo.layers), so the JSON never states a shape twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from zoo import graph
from zoo.errors import ZooError
from zoo.layers import KINDS, Node, TensorSpec

FINGERPRINT_VERSION = 2  # 2: the graph's wiring and every kind's computing config


@dataclass(frozen=True)
class ModelSpec:
    family: str
    version: str
    input: dict
    layers: tuple[dict, ...]
    head: str
    num_classes: int
    default: bool = False
    description: str = ""
    categories: str | None = None
    provenance: dict = field(default_factory=dict)
    # layer-name globs of what published files carry beyond the network (training-only heads such as
    # GoogLeNet's auxiliary classifiers): dropped on import, with a note
    extra_layers: tuple[str, ...] = ()
    origin: str = "builtin"  # which plugin contributed it

    @property
    def id(self) -> str:
        return f"{self.family}@{self.version}"

    @classmethod
    def from_dict(cls, data: dict, origin: str = "builtin") -> ModelSpec:
        try:
            spec = cls(
                family=data["family"],
                version=data["version"],
                input=dict(data["input"]),
                layers=tuple(dict(layer) for layer in data["layers"]),
                head=data["head"],
                num_classes=int(data["num_classes"]),
                default=bool(data.get("default", False)),
                description=data.get("description", ""),
                categories=data.get("categories"),
                provenance=dict(data.get("provenance", {})),
                extra_layers=tuple(data.get("extra_layers", ())),
                origin=origin,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ZooError(f"invalid model spec: missing or bad field {e}") from None
        spec._validate()
        return spec

    @classmethod
    def from_json(cls, path, origin: str = "builtin") -> ModelSpec:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ZooError(f"cannot read model spec: {e}", path) from None
        return cls.from_dict(data, origin)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "version": self.version,
            "default": self.default,
            "description": self.description,
            "input": copy.deepcopy(self.input),
            "layers": [dict(layer) for layer in self.layers],
            "head": self.head,
            "num_classes": self.num_classes,
            "categories": self.categories,
            "provenance": copy.deepcopy(self.provenance),
        } | ({"extra_layers": list(self.extra_layers)} if self.extra_layers else {})

    def _validate(self) -> None:
        nodes = self.nodes  # every layer checked
        if self.head not in self.layer_names:
            raise ZooError(f"model spec {self.id}: head {self.head!r} is not one of its layers")
        if KINDS[self.node(self.head).kind].name not in ("dense", "conv"):
            raise ZooError(f"model spec {self.id}: head {self.head!r} must be a dense or conv layer")
        if nodes[-1].output_shape != (self.num_classes,):
            raise ZooError(f"model spec {self.id}: output {nodes[-1].output_shape} does not match num_classes {self.num_classes}")
        read = {i for n in nodes for i in n.inputs}
        unused = [n.name for n in nodes[:-1] if n.name not in read]
        if unused:
            raise ZooError(f"model spec {self.id}: layers whose output nothing reads: {', '.join(unused)}")

    def with_num_classes(self, num_classes: int) -> ModelSpec:
        """The same network with a head of `num_classes` outputs (a fine-tuned model's spec)."""
        if num_classes == self.num_classes:
            return self
        if num_classes < 1:
            raise ZooError(f"number of classes must be at least 1, not {num_classes}")
        key = "units" if self.node(self.head).kind == "dense" else "filters"
        layers = tuple(dict(layer, **{key: num_classes}) if layer["name"] == self.head else layer for layer in self.layers)
        data = self.to_dict() | {"layers": layers, "num_classes": num_classes, "categories": None}
        return ModelSpec.from_dict(data, self.origin)

    def with_input_size(self, height: int, width: int) -> ModelSpec:
        """The same network on another input size, where every layer allows it (global pooling)."""
        if [height, width] == list(self.input["size"]):
            return self
        data = self.to_dict() | {"input": dict(self.input, size=[height, width])}
        return ModelSpec.from_dict(data, self.origin)

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        return graph.infer(self.layers, self.input_shape, f"model spec {self.id}")

    @cached_property
    def trunk(self) -> str:
        """The last layer of the convolutional trunk (zoo.graph.trunk): what a headless model ends with."""
        return graph.trunk(self.nodes, f"model spec {self.id}")

    def output_name(self, name: str) -> str:
        """`name` if it is a layer; for a dotted prefix of layer names (a torchvision module such as `layer3`)
        the last of its layers, which is the module's output."""
        if name in self._by_name:
            return name
        inside = [n for n in self.layer_names if n.startswith(name + ".")]
        return inside[-1] if inside else self.node(name).name  # node() says which layers there are

    def subgraph(self, outputs, size=None) -> tuple[Node, ...]:
        """The nodes that compute `outputs` (layer names), in the graph's order, on an input of `size` (H, W;
        default the spec's). For another size the shapes are inferred again: one ZooError naming the layer
        when a layer cannot take the size or its weights would have to change shape (a dense layer reading
        a flattened map)."""
        keep = graph.ancestors(self.nodes, outputs)
        nodes = tuple(n for n in self.nodes if n.name in keep)
        if size is None or list(size) == list(self.input["size"]):
            return nodes
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise ZooError(f"{self.id}: an input size is two positive ints (height, width), not {size!r}")
        h, w = size
        where = f"{self.id} at {h}x{w}"
        layers = {la["name"]: la for la in self.layers}  # inputs made explicit: the layer listed before may be gone
        resized = graph.infer([dict(layers[n.name], inputs=list(n.inputs)) for n in nodes], (h, w, self.input["channels"]), where)
        for node, before in zip(resized, nodes):
            for t, was in zip(node.tensors, before.tensors):
                if t.shape != was.shape:
                    flat = f" (it reads a {_dims(node.flattened_from)} map flattened, not {_dims(before.flattened_from)})" \
                        if before.flattened_from else ""
                    raise ZooError(f"{where}, layer {node.name!r}: its {t.param} would have to be {_dims(t.shape)}, not "
                                   f"{_dims(was.shape)}{flat}: its weights fix the input size")
        return resized

    @cached_property
    def _by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise ZooError(f"{self.id} has no layer {name!r}; layers: {', '.join(self.layer_names)}") from None

    @cached_property
    def layer_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @cached_property
    def weighted_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.tensors]

    @cached_property
    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for n in self.nodes for t in n.tensors}

    @property
    def num_params(self) -> int:
        return sum(n.num_params for n in self.nodes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.input["size"]
        return (h, w, self.input["channels"])

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what makes weights fit: input shape, the graph's wiring, each layer's kind and computing
        config, the tensor shapes and layouts."""
        canon = {
            "fingerprint_version": FINGERPRINT_VERSION,
            "input": list(self.input_shape),
            "layers": [[n.name, n.kind, list(n.inputs), {k: n.config[k] for k in _computing(n)}] for n in self.nodes],
            "tensors": [[t.name, list(t.shape), t.layout, t.dtype] for t in self.tensors.values()],
        }
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# zoo 0.1's fingerprint covered a chain of these kinds with these config keys, read from the raw layer dicts
_V1_KEYS = {"conv": ("filters", "kernel", "stride", "pad", "groups", "activation"), "lrn": ("size", "alpha", "beta", "k"),
            "maxpool": ("size", "stride", "rounding"), "avgpool": ("size", "stride", "rounding"), "adaptive_avgpool": ("output",),
            "flatten": (), "dense": ("units", "activation"), "dropout": ("rate",)}


def fingerprint_v1(spec: ModelSpec) -> str | None:
    """The fingerprint zoo 0.1 gave a chain spec, so that weights files written before specs were graphs
    still load; None for specs it could not express."""
    if any(layer["kind"] not in _V1_KEYS or "inputs" in layer for layer in spec.layers):
        return None
    canon = {
        "input": list(spec.input_shape),
        "layers": [[la["name"], la["kind"], {k: la.get(k) for k in _V1_KEYS[la["kind"]]}] for la in spec.layers],
        "tensors": [[t.name, list(t.shape), t.layout, t.dtype] for t in spec.tensors.values()],
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def _computing(node: Node) -> tuple[str, ...]:
    kind = KINDS[node.kind]
    return kind.computes if kind.computes is not None else tuple(kind.schema)
