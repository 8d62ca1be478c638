"""A deploy.prototxt as a zoo spec's layers: Caffe's network written as zoo's graph data.

Caffe's layers read and write named blobs, often in place (ReLU, BatchNorm, Scale write their input
blob); zoo's layers read layers. Each blob is tracked to the layer that last wrote it, so in-place
layers chain. Layer names keep Caffe's, with "/" written "_" (as caffe-tensorflow does; Keras refuses
"/" in names): `inception_3a/1x1` is `inception_3a_1x1`. Caffe's implicit flatten before an
InnerProduct on a map becomes a `<name>_flatten` layer; a final Softmax is left out (specs end in
logits). Pooling rounds up, as Caffe does.
"""

from __future__ import annotations

from zoo.errors import ZooError
from zoo_caffemodel.prototxt import parse


def layer_name(caffe_name: str) -> str:
    return caffe_name.replace("/", "_")


def _one(msg: dict, key: str, default=None, cast=int):
    values = msg.get(key)
    return cast(values[0]) if values else default


def _param(entry: dict, key: str) -> dict:
    return (entry.get(key) or [{}])[0]


def _window(p: dict, what: str) -> dict:
    """kernel/stride/pad of a convolution_param or pooling_param, square or _h/_w."""
    def get(key, default):
        if f"{key}_h" in p:
            return [_one(p, f"{key}_h"), _one(p, f"{key}_w")]
        return _one(p, key if key != "kernel" else "kernel_size", default)
    return {what: get("kernel", None), "stride": get("stride", 1), "pad": get("pad", 0)}


def _translate(kind: str, entry: dict) -> dict | None:
    if kind == "Convolution":
        p = _param(entry, "convolution_param")
        return {"kind": "conv", "filters": _one(p, "num_output"), **_window(p, "kernel"), "groups": _one(p, "group", 1),
                "bias": _one(p, "bias_term", True, lambda v: v == "true")}
    if kind == "InnerProduct":
        p = _param(entry, "inner_product_param")
        return {"kind": "dense", "units": _one(p, "num_output"), "bias": _one(p, "bias_term", True, lambda v: v == "true")}
    if kind == "Pooling":
        p = _param(entry, "pooling_param")
        mode = _one(p, "pool", "MAX", str)
        if mode not in ("MAX", "AVE"):
            raise ValueError(f"pooling {mode} is not supported")
        if _one(p, "global_pooling", False, lambda v: v == "true"):
            if mode != "AVE":
                raise ValueError("global max pooling is not supported")
            return {"kind": "global_avgpool"}
        return {"kind": "maxpool" if mode == "MAX" else "avgpool", **_window(p, "size"), "rounding": "ceil"}
    if kind == "LRN":
        p = _param(entry, "lrn_param")
        if _one(p, "norm_region", "ACROSS_CHANNELS", str) != "ACROSS_CHANNELS":
            raise ValueError("only ACROSS_CHANNELS LRN is supported")
        return {"kind": "lrn", "size": _one(p, "local_size", 5), "alpha": _one(p, "alpha", 1.0, float),
                "beta": _one(p, "beta", 0.75, float), "k": _one(p, "k", 1.0, float)}
    if kind == "ReLU":
        if _one(_param(entry, "relu_param"), "negative_slope", 0.0, float) != 0:
            raise ValueError("leaky ReLU is not supported")
        return {"kind": "relu"}
    if kind == "Dropout":
        return {"kind": "dropout", "rate": _one(_param(entry, "dropout_param"), "dropout_ratio", 0.5, float)}
    if kind == "Concat":
        if _one(_param(entry, "concat_param"), "axis", 1) != 1:
            raise ValueError("concatenation is supported along the channels only")
        return {"kind": "concat"}
    if kind == "Eltwise":
        p = _param(entry, "eltwise_param")
        if _one(p, "operation", "SUM", str) != "SUM" or "coeff" in p:
            raise ValueError("only a plain SUM Eltwise is supported")
        return {"kind": "add"}
    if kind == "BatchNorm":
        eps = _one(_param(entry, "batch_norm_param"), "eps", 1e-5, float)
        return {"kind": "batchnorm", "epsilon": eps, "scale": False, "center": False}
    if kind == "Scale":
        return {"kind": "scale", "bias": _one(_param(entry, "scale_param"), "bias_term", False, lambda v: v == "true")}
    if kind in ("Input", "Softmax"):
        return None
    raise ValueError(f"layer type {kind} is not supported")


def input_size(net: dict) -> list[int]:
    dims = [int(d) for d in net.get("input_dim", [])]
    if not dims:
        shapes = net.get("input_shape") or [_param(e, "input_param").get("shape", [{}])[0]
                                            for e in net.get("layer", []) if _one(e, "type", "", str) == "Input"]
        dims = [int(d) for d in (shapes[0].get("dim", []) if shapes else [])]
    if len(dims) != 4 or dims[1] != 3:
        raise ZooError(f"no 1x3xHxW input declared (found {dims})")
    return dims[2:]


def spec_layers(text: str, path=None) -> tuple[list[dict], list[int]]:
    """(zoo layers, input [H, W]) of a deploy prototxt."""
    net = parse(text, path)
    writer = {}  # blob -> the zoo layer that last wrote it
    layers = []
    for entry in net.get("layer", []):
        kind, name = _one(entry, "type", "", str), layer_name(_one(entry, "name", "", str))
        try:
            layer = _translate(kind, entry)
        except ValueError as e:
            raise ZooError(f"layer {name!r} ({kind}): {e}", path) from None
        bottoms, tops = entry.get("bottom", []), entry.get("top", [])
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
