"""The layer kinds, one module each; KINDS maps a spec's `kind` to its implementation.

A module defines its kind (a zoo.layers.base.Kind) as KIND, or several closely related ones as KINDS
(max and average pooling share everything but the op). Plugins add specs, not kinds: a new kind needs
a Keras and an ONNX form and the readers' conventions, and a weights file made with a plugin's kind
could not be read without that plugin (docs/plugins.md).
"""

from __future__ import annotations

from importlib import import_module

from zoo.errors import ZooError
from zoo.layers.base import REQUIRED, Kind, Node, TensorSpec

_MODULES = ("conv", "dense", "batchnorm", "scale", "relu", "lrn", "pool", "global_pool", "adaptive_pool", "add", "concat",
            "flatten", "dropout", "softmax")


def _load() -> dict[str, Kind]:
    kinds = {}
    for module in _MODULES:
        m = import_module(f"zoo.layers.{module}")
        for kind in getattr(m, "KINDS", None) or (m.KIND,):
            kinds[kind.name] = kind
    return kinds


KINDS: dict[str, Kind] = _load()


def get_kind(name) -> Kind:
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ZooError(f"unknown layer kind {name!r} (known: {', '.join(sorted(KINDS))})") from None


__all__ = ["KINDS", "REQUIRED", "Kind", "Node", "TensorSpec", "get_kind"]
