"""The spec as an ONNX graph, written by zoo itself (onnx.helper), weights streamed to the file.

NHWC float input `image` (preprocessed as the spec says), one Transpose to NCHW, then each layer kind's
nodes; outputs `logits` and `probabilities`. tf2onnx was measured on the full AlexNet at ~14 GB and
60-80 s and cannot convert Keras' grouped convs at all (it reports success on an invalid file).
"""

from __future__ import annotations

import json

import numpy as np

from zoo.graph import INPUT
from zoo.layers import KINDS
from zoo.spec import ModelSpec

DEFAULT_OPSET = 17


class GraphBuilder:
    """What a layer kind's `onnx()` adds nodes and weights through."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.nodes, self.inits, self._count = [], [], 0

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        from onnx import helper

        self._count += 1
        output = name or f"_{op.lower()}_{self._count}"  # "_": never a spec layer's name
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def weight(self, node, param: str, view=None) -> str:
        """The initializer of `node`'s canonical tensor `param`, through `view` (a transpose or reshape)."""
        array = self.tensors[f"{node.name}.{param}"]
        return self.constant(f"{node.name}.{param}", view(array) if view else array)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.inits.append((name, array))
        return name


def onnx_graph(spec: ModelSpec, tensors: dict[str, np.ndarray], classes: list[str], opset: int = DEFAULT_OPSET):
    """The spec as an ONNX model without its weights, and the weights as [(initializer name, array in the
    ONNX layout: a view of `tensors` where possible)]."""
    import onnx
    from onnx import TensorProto, helper

    g = GraphBuilder(tensors)
    outputs = {INPUT: g.node("Transpose", ["image"], "image_nchw", perm=[0, 3, 1, 2])}
    for node in spec.nodes:
        outputs[node.name] = KINDS[node.kind].onnx(node, g, [outputs[i] for i in node.inputs])
    g.node("Identity", [outputs[spec.nodes[-1].name]], "logits")
    g.node("Softmax", ["logits"], "probabilities", axis=1)
    h, w = spec.input["size"]
    graph = helper.make_graph(
        g.nodes, spec.id, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", h, w, spec.input_shape[2]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", spec.num_classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", spec.num_classes])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="zoo")
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    meta = {"zoo.spec": spec.id, "zoo.fingerprint": spec.fingerprint, "zoo.classes": json.dumps(classes),
            "zoo.input": json.dumps(spec.input), "zoo.layout": "NHWC, preprocessed as zoo.input says"}
    helper.set_model_props(model, meta)
    return model, g.inits


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


PROTOBUF_LIMIT = 2**31 - 1  # bytes: no protobuf message, hence no ONNX file with its weights inside, may be larger


def needs_external_data(model, inits) -> bool:
    return model.ByteSize() + sum(a.nbytes + 64 + len(n) for n, a in inits) >= PROTOBUF_LIMIT


def write_onnx(path, model, inits: list[tuple[str, np.ndarray]], release=None, external: bool | None = None) -> None:
    """Write `model` with `inits` as initializers, streaming each weight from its array to the file.

    protobuf merges repeated occurrences of a message field, so the file is the weightless model followed,
    per initializer, by `ModelProto.graph { initializer { dims, data_type, name, raw_data } }`: the same
    model as one with all initializers inside, without ever building it (onnx.helper would hold the
    weights as protobuf, then serialise a second copy). `release(array)` follows each write.

    With `external` (default: when the file would pass protobuf's 2 GiB limit) the weights go to
    `<name>.data` beside it, each at a 4 KiB-aligned offset, and the initializers only point there
    (ONNX's external data)."""
    from contextlib import nullcontext
    from pathlib import Path

    from onnx import TensorProto, helper

    path = Path(path)
    external = needs_external_data(model, inits) if external is None else external
    data_file = path.with_name(path.name + ".data")
    with open(path, "wb") as f, (open(data_file, "wb") if external else nullcontext()) as data_out:
        f.write(model.SerializeToString())
        for name, arr in inits:
            data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            tensor = TensorProto(name=name, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
            if external:
                offset = -(-data_out.tell() // 4096) * 4096
                data_out.seek(offset)
                data_out.write(memoryview(data.reshape(-1)).cast("B"))
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_file.name), ("offset", offset), ("length", data.nbytes)):
                    tensor.external_data.add(key=key, value=str(value))
                record = tensor.SerializeToString()
                f.write(_field(7, len(_field(5, len(record))) + len(record)) + _field(5, len(record)) + record)
            else:
                head = tensor.SerializeToString()
                size = len(head) + len(_field(9, data.nbytes)) + data.nbytes
                graph = len(_field(5, size)) + size
                f.write(_field(7, graph) + _field(5, size) + head + _field(9, data.nbytes))
                f.write(memoryview(data.reshape(-1)).cast("B"))
            del data
            if release:
                release(arr)
