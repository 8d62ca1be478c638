"""Model specs: plain data (zoo/specs/*.json or a plugin's) and the code that reads shapes out of it.

A spec lists layers in order; the parameter tensors, output shapes and parameter counts are derived
from the layer configs here, so the JSON never states a shape twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from zoo.errors import ZooError

# The canonical layout of every weights file zoo writes (docs/formats.md): Keras' own.
LAYOUTS = {
    "conv.kernel": "HWIO",  # (kh, kw, in_channels / groups, out_channels)
    "dense.kernel": "IO",  # (in, out); after a flatten the inputs are in H,W,C order
    "bias": "O",
}

LAYER_KINDS = {"conv", "lrn", "maxpool", "avgpool", "adaptive_avgpool", "flatten", "dense", "dropout"}
# The config keys that change what a layer computes, hence its weights' meaning (the fingerprint).
_COMPUTE_KEYS = {
    "conv": ("filters", "kernel", "stride", "pad", "groups", "activation"),
    "lrn": ("size", "alpha", "beta", "k"),
    "maxpool": ("size", "stride", "rounding"),
    "avgpool": ("size", "stride", "rounding"),
    "adaptive_avgpool": ("output",),
    "flatten": (),
    "dense": ("units", "activation"),
    "dropout": ("rate",),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "conv1.kernel"
    layer: str
    shape: tuple[int, ...]
    layout: str
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerInfo:
    """A layer with what the spec derives for it: output shape (H, W, C) or (N,) and its tensors."""

    name: str
    kind: str
    config: dict
    output_shape: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]

    @property
    def num_params(self) -> int:
        return sum(t.size for t in self.tensors)


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
                origin=origin,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ZooError(f"invalid model spec: missing or bad field {e}") from None
        _ = spec.layer_infos  # validate now, not at first use
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
        }

    def with_num_classes(self, num_classes: int) -> ModelSpec:
        """The same network with a head of `num_classes` outputs (a fine-tuned model's spec)."""
        if num_classes == self.num_classes:
            return self
        if num_classes < 1:
            raise ZooError(f"number of classes must be at least 1, not {num_classes}")
        layers = tuple(dict(layer, units=num_classes) if layer["name"] == self.head else layer for layer in self.layers)
        data = self.to_dict() | {"layers": layers, "num_classes": num_classes, "categories": None}
        return ModelSpec.from_dict(data, self.origin)

    @cached_property
    def layer_infos(self) -> tuple[LayerInfo, ...]:
        return tuple(_infer_layers(self))

    def layer(self, name: str) -> LayerInfo:
        for info in self.layer_infos:
            if info.name == name:
                return info
        raise ZooError(f"{self.id} has no layer {name!r}; layers: {', '.join(self.layer_names)}")

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layer_infos]

    @property
    def weighted_layers(self) -> list[LayerInfo]:
        return [info for info in self.layer_infos if info.tensors]

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for info in self.layer_infos for t in info.tensors}

    @property
    def num_params(self) -> int:
        return sum(info.num_params for info in self.layer_infos)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.input["size"]
        return (h, w, self.input["channels"])

    @cached_property
    def fingerprint(self) -> str:
        """Hash of what makes weights fit: input shape, layer kinds and compute configs, tensor shapes."""
        canon = {
            "input": list(self.input_shape),
            "layers": [
                [info.name, info.kind, {k: info.config.get(k) for k in _COMPUTE_KEYS[info.kind]}]
                for info in self.layer_infos
            ],
            "tensors": [[t.name, list(t.shape), t.layout, t.dtype] for t in self.tensors.values()],
        }
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _out_size(size: int, window: int, stride: int, pad: int, rounding: str) -> int:
    span = size + 2 * pad - window
    if span < 0:
        raise ValueError(f"window {window} larger than input {size}")
    return (math.ceil(span / stride) if rounding == "ceil" else span // stride) + 1


def _infer_layers(spec: ModelSpec):
    """Walk the layers, checking configs and deriving each layer's output shape and tensors."""
    shape: tuple[int, ...] = spec.input_shape
    names = set()
    for layer in spec.layers:
        name, kind = layer.get("name"), layer.get("kind")
        where = f"model spec {spec.id}, layer {name!r}"
        if kind not in LAYER_KINDS:
            raise ZooError(f"{where}: unknown kind {kind!r} (known: {', '.join(sorted(LAYER_KINDS))})")
        if not name or name in names:
            raise ZooError(f"{where}: layer names must be unique and non-empty")
        names.add(name)
        tensors: tuple[TensorSpec, ...] = ()
        try:
            if kind in ("conv", "maxpool", "avgpool", "lrn", "adaptive_avgpool") and len(shape) != 3:
                raise ValueError(f"needs an (H, W, C) input, got {shape}")
            if kind == "conv":
                h, w, c = shape
                k, s, p, g = layer["kernel"], layer.get("stride", 1), layer.get("pad", 0), layer.get("groups", 1)
                f = layer["filters"]
                if c % g or f % g:
                    raise ValueError(f"groups={g} must divide input channels {c} and filters {f}")
                shape = (_out_size(h, k, s, p, "floor"), _out_size(w, k, s, p, "floor"), f)
                tensors = (
                    TensorSpec(f"{name}.kernel", name, (k, k, c // g, f), LAYOUTS["conv.kernel"]),
                    TensorSpec(f"{name}.bias", name, (f,), LAYOUTS["bias"]),
                )
            elif kind in ("maxpool", "avgpool"):
                h, w, c = shape
                k, s, rounding = layer["size"], layer.get("stride", layer["size"]), layer.get("rounding", "floor")
                out = [_out_size(n, k, s, 0, rounding) for n in (h, w)]
                # Keras pools with floor rounding; Caffe's ceil only matters when the window does not tile.
                if out != [_out_size(n, k, s, 0, "floor") for n in (h, w)]:
                    raise ValueError(f"{rounding} rounding differs from floor at input {h}x{w}: not supported")
                shape = (out[0], out[1], c)
            elif kind == "adaptive_avgpool":
                h, w, c = shape
                o = layer["output"]
                if h % o or w % o:
                    raise ValueError(f"input {h}x{w} is not a multiple of output {o}: not supported")
                shape = (o, o, c)
            elif kind == "flatten":
                shape = (math.prod(shape),)
            elif kind == "dense":
                if len(shape) != 1:
                    raise ValueError(f"needs a flat input, got {shape}; add a flatten layer")
                u = layer["units"]
                tensors = (
                    TensorSpec(f"{name}.kernel", name, (shape[0], u), LAYOUTS["dense.kernel"]),
                    TensorSpec(f"{name}.bias", name, (u,), LAYOUTS["bias"]),
                )
                shape = (u,)
            elif kind == "lrn" and layer["size"] % 2 == 0:
                raise ValueError("size must be odd")
        except (KeyError, ValueError, TypeError) as e:
            raise ZooError(f"{where}: {e if not isinstance(e, KeyError) else f'missing {e}'}") from None
        config = {k: v for k, v in layer.items() if k not in ("name", "kind")}
        yield LayerInfo(name, kind, config, shape, tensors)
    if spec.head not in names:
        raise ZooError(f"model spec {spec.id}: head {spec.head!r} is not one of its layers")
    if shape != (spec.num_classes,):
        raise ZooError(f"model spec {spec.id}: output {shape} does not match num_classes {spec.num_classes}")
