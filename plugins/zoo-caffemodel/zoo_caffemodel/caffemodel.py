"""Caffe NetParameter binaries (.caffemodel): layers and their blobs, as zero-copy views of the file.

Field numbers are those of Caffe's public caffe.proto:
  NetParameter      name=1, layers=2 (V1LayerParameter), layer=100 (LayerParameter)
  LayerParameter    name=1, type=2 (string), blobs=7, convolution_param=106
  V1LayerParameter  name=4, type=5 (enum), blobs=6, convolution_param=10
  BlobProto         num=1, channels=2, height=3, width=4, data=5 (packed float), shape=7, double_data=8
  BlobShape         dim=1 (packed int64)
  ConvolutionParameter  group=5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from zoo.wire import FIXED32, FIXED64, LENGTH, VARINT, WireError, fields, packed_varints, text

V1_TYPES = {4: "Convolution", 14: "InnerProduct", 15: "LRN", 17: "Pooling", 18: "ReLU", 6: "Dropout", 20: "Softmax",
            5: "Data", 21: "SoftmaxWithLoss", 1: "Accuracy", 29: "Split", 3: "Concat"}


@dataclass
class CaffeLayer:
    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)
    group: int = 1


def _values(buf: memoryview, wire: int, value, size: str, fixed_wire: int) -> list[np.ndarray]:
    """A run of packed floats of `size` bytes (a zero-copy view), or, from unusual writers, one value."""
    if wire == LENGTH:
        if (value[1] - value[0]) % int(size):
            raise WireError(f"{size}-byte float data whose length is not a multiple of {size}")
        return [np.frombuffer(buf, f"<f{size}", (value[1] - value[0]) // int(size), value[0])]
    if wire == fixed_wire:
        return [np.array([value], f"<u{size}").view(f"<f{size}")]
    return []


def _blob(buf: memoryview, span) -> np.ndarray:
    dims, legacy, floats, doubles = None, {}, [], []
    for number, wire, value in fields(buf, *span):
        if number == 7 and wire == LENGTH:  # BlobShape; a message given in parts is merged, as protobuf does
            dims = dims or []
            for n, w, v in fields(buf, *value):
                if n == 1:
                    dims += packed_varints(buf, v) if w == LENGTH else [v]
        elif number in (1, 2, 3, 4) and wire == VARINT:
            legacy[number] = value
        elif number == 5:  # data (float)
            floats += _values(buf, wire, value, "4", FIXED32)
        elif number == 8:  # double_data
            doubles += _values(buf, wire, value, "8", FIXED64)
    if dims is None:  # legacy num/channels/height/width; drop the leading 1s of 2-d and 1-d blobs
        dims = [legacy.get(i, 1) for i in (1, 2, 3, 4)]
        while len(dims) > 1 and dims[0] == 1:
            dims = dims[1:]
    parts = floats or doubles
    data = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if any(d < 0 for d in dims) or math.prod(dims) != data.size:
        raise WireError(f"blob declares shape {tuple(dims)} ({math.prod(dims):,} values) but holds {data.size:,}")
    return data.reshape(dims)


def _group(buf, span, group: int) -> int:
    """ConvolutionParameter.group, the last one given (protobuf's rule for a repeated scalar), else `group`."""
    for number, wire, value in fields(buf, *span):
        if number == 5 and wire == VARINT:
            group = value
    return group


def read_layers(buf: memoryview) -> tuple[str, list[CaffeLayer], str]:
    """(net name, layers with blobs or convolution settings, 'layer' or 'V1 layers')."""
    name, layers, kinds = "", [], set()
    for number, wire, value in fields(buf):
        if number == 1 and wire == LENGTH:
            name = text(buf, value)
        elif number in (100, 2) and wire == LENGTH:
            v1 = number == 2
            kinds.add("V1 layers" if v1 else "layer")
            layer = CaffeLayer("", "")
            for n, w, v in fields(buf, *value):
                if n == (4 if v1 else 1) and w == LENGTH:
                    layer.name = text(buf, v)
                elif n == 5 and v1 and w == VARINT:
                    layer.type = V1_TYPES.get(v, f"V1 type {v}")
                elif n == 2 and not v1 and w == LENGTH:
                    layer.type = text(buf, v)
                elif n == (6 if v1 else 7) and w == LENGTH:
                    layer.blobs.append(_blob(buf, v))
                elif n == (10 if v1 else 106) and w == LENGTH:
                    layer.group = _group(buf, v, layer.group)
            layers.append(layer)
    if not layers:
        raise WireError("no layers: not a Caffe NetParameter")
    return name, layers, " and ".join(sorted(kinds))
