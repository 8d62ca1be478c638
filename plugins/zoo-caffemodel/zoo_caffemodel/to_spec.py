"""A deploy.prototxt as a zoo spec's layers: Caffe's network written as zoo's graph data.

Caffe's layers read and write named blobs, often in place (ReLU, BatchNorm, Scale write their input
blob); zoo's layers read layers. Each blob is tracked to the layer that last wrote it, so in-place
layers chain. Layer names keep Caffe's, with "/" written "_" (as caffe-tensorflow does; Keras refuses
"/" in names): `inception_3a/1x1` is `inception_3a_1x1`. Caffe's implicit flatten before an
InnerProduct on a map becomes a `<name>_flatten` layer; a final Softmax is left out (specs end in
logits). Pooling rounds up, as Caffe does.
"""

from __future__ import annotations

import numpy as np

from zoo.errors import ZooError
from zoo_caffemodel.prototxt import parse


def layer_name(caffe_name: str) -> str:
    return caffe_name.replace("/", "_")


def _decimal(value: float) -> float:
    """A float field as the prototxt wrote it: protobuf holds it as float32 (1e-5 comes back as
    9.99999974e-06); the shortest decimal that is that float32 keeps specs and fingerprints as written."""
    return float(str(np.float32(value)))


def _enum(param, field: str) -> str:
    return param.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(param, field)].name


def _side(param, key: str, repeated: bool, default):
    """kernel/stride/pad of a convolution_param (repeated fields) or pooling_param: square or [h, w]."""
    if param.HasField(f"{key}_h") or param.HasField(f"{key}_w"):
        return [getattr(param, f"{key}_h"), getattr(param, f"{key}_w")]
    field = "kernel_size" if key == "kernel" else key
    if not repeated:
        return getattr(param, field) if param.HasField(field) or default is None else default
    values = list(getattr(param, field))
    return default if not values else values[0] if len(values) == 1 else values


def _window(param, what: str, repeated: bool) -> dict:
    return {what: _side(param, "kernel", repeated, None), "stride": _side(param, "stride", repeated, 1),
            "pad": _side(param, "pad", repeated, 0)}


def _pooling(p) -> dict:
    mode = _enum(p, "pool")
    if mode not in ("MAX", "AVE"):
        raise ValueError(f"pooling {mode} is not supported")
    if p.global_pooling:
        if mode != "AVE":
            raise ValueError("global max pooling is not supported")
        return {"kind": "global_avgpool"}
    rounding = "floor" if _enum(p, "round_mode") == "FLOOR" else "ceil"  # Caffe's default is CEIL
    return {"kind": "maxpool" if mode == "MAX" else "avgpool", **_window(p, "size", repeated=False), "rounding": rounding}


def _translate(kind: str, entry) -> dict | None:
    if kind == "Convolution":
        p = entry.convolution_param
        return {"kind": "conv", "filters": p.num_output, **_window(p, "kernel", repeated=True), "groups": p.group, "bias": p.bias_term}
    if kind == "InnerProduct":
        return {"kind": "dense", "units": entry.inner_product_param.num_output, "bias": entry.inner_product_param.bias_term}
    if kind == "Pooling":
        return _pooling(entry.pooling_param)
    if kind == "LRN":
        p = entry.lrn_param
        if _enum(p, "norm_region") != "ACROSS_CHANNELS":
            raise ValueError("only ACROSS_CHANNELS LRN is supported")
        return {"kind": "lrn", "size": p.local_size, "alpha": _decimal(p.alpha), "beta": _decimal(p.beta), "k": _decimal(p.k)}
    if kind == "ReLU":
        if entry.relu_param.negative_slope != 0:
            raise ValueError("leaky ReLU is not supported")
        return {"kind": "relu"}
    if kind == "Dropout":
        return {"kind": "dropout", "rate": _decimal(entry.dropout_param.dropout_ratio)}
    if kind == "Concat":
        if entry.concat_param.axis != 1:
            raise ValueError("concatenation is supported along the channels only")
        return {"kind": "concat"}
    if kind == "Eltwise":
        if _enum(entry.eltwise_param, "operation") != "SUM" or len(entry.eltwise_param.coeff):
            raise ValueError("only a plain SUM Eltwise is supported")
        return {"kind": "add"}
    if kind == "BatchNorm":
        return {"kind": "batchnorm", "epsilon": _decimal(entry.batch_norm_param.eps), "scale": False, "center": False}
    if kind == "Scale":
        return {"kind": "scale", "bias": entry.scale_param.bias_term}
    if kind in ("Input", "Softmax"):
        return None
    raise ValueError(f"layer type {kind} is not supported")


def input_size(net) -> list[int]:
    dims = list(net.input_dim)
    if not dims:
        shapes = list(net.input_shape) or [e.input_param.shape[0] for e in net.layer if e.type == "Input" and e.input_param.shape]
        dims = list(shapes[0].dim) if shapes else []
    if len(dims) != 4 or dims[1] != 3:
        raise ZooError(f"no 1x3xHxW input declared (found {dims})")
    return dims[2:]


def spec_layers(text: str, path=None) -> tuple[list[dict], list[int]]:
    """(zoo layers, input [H, W]) of a deploy prototxt."""
    net = parse(text, path)
    writer = {}  # blob -> the zoo layer that last wrote it
    layers = []
    for entry in net.layer:
        kind, name = entry.type, layer_name(entry.name)
        try:
            layer = _translate(kind, entry)
        except ValueError as e:
            raise ZooError(f"layer {name!r} ({kind}): {e}", path) from None
        bottoms, tops = list(entry.bottom), list(entry.top)
        if layer is None:
            if kind == "Softmax" and tops:
                writer[tops[0]] = writer.get(bottoms[0], "input")
            continue
        inputs = [writer.get(b, "input") for b in bottoms]
        if layer["kind"] == "dense" and layers and _is_map(layers, inputs[0]):
            layers.append({"name": f"{name}_flatten", "kind": "flatten", "inputs": inputs})
            inputs = [f"{name}_flatten"]
        layers.append({"name": name, **layer, "inputs": inputs})
        for top in tops:
            writer[top] = name
    return _implicit_inputs(layers), input_size(net)


def _is_map(layers: list[dict], name: str) -> bool:
    """Whether `name`'s output is still a spatial map (nothing flat before it on its path)."""
    by_name = {layer["name"]: layer for layer in layers}
    while name in by_name:
        layer = by_name[name]
        if layer["kind"] in ("dense", "flatten", "global_avgpool"):
            return False
        name = layer["inputs"][0]
    return True


def _implicit_inputs(layers: list[dict]) -> list[dict]:
    """Drop `inputs` where it is the default (the layer before), so chains read as chains."""
    previous = "input"
    for layer in layers:
        if layer["inputs"] == [previous]:
            del layer["inputs"]
        previous = layer["name"]
    return layers
