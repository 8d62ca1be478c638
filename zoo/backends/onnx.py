"""The spec as an ONNX graph, written by zoo itself (onnx.helper), weights streamed to the file.

NHWC float input `image` (preprocessed as the spec says), one Transpose to NCHW, then each layer kind's
nodes; outputs `logits` and `probabilities`, or a headless part's `features`. Height and width are
symbolic where the graph is the same at every size (size_free). tf2onnx was measured on the full AlexNet at ~14 GB and
60-80 s and cannot convert Keras' grouped convs at all (it reports success on an invalid file).
"""

from __future__ import annotations

import json

import numpy as np

from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.graph import INPUT
from zoo.layers import KINDS
from zoo.spec import ModelSpec

DEFAULT_OPSET = 17


def session_options(threads: int | None = None):
    """The ONNX Runtime session options zoo runs its graphs with (zoo predict, zoo bench): every graph
    optimisation (ORT_ENABLE_ALL, ONNX Runtime's default: on AVX2/AVX-512 CPUs the convs run in its blocked
    NCHWc layout, with batch norms, biases and ReLUs folded into them) and as many intra-op threads as the
    CPUs this process may run on. ONNX Runtime's own default counts the machine's cores: a process confined
    to fewer (taskset, a container's cpuset) then runs more threads than CPUs, and they spin against each
    other (ResNet-50, batch 1, confined to one of two cores: 128 ms of CPU a forward instead of 70 ms;
    docs/performance.md, issue 18)."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return options


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


def onnx_graph(spec: ModelSpec, tensors: dict[str, np.ndarray], classes: list[str], opset: int = DEFAULT_OPSET,
               part: Part | None = None, dynamic: bool = False):
    """The spec (or the one-output `part` of it that zoo.features.select chose) as an ONNX model without its
    weights, and the weights as [(initializer name, array in the ONNX layout: a view of `tensors` where
    possible)]. The whole network outputs `logits` and `probabilities`; a part `features`, NHWC like the
    Keras model's. With `dynamic` the input's height and width are symbolic (see size_free)."""
    import onnx
    from onnx import TensorProto, helper

    part = part or select(spec)
    if len(part.outputs) != 1:
        raise ZooError(f"an ONNX export has one output, not {len(part.outputs)}: {', '.join(part.outputs)}")
    g, result = _nodes(part, tensors)
    (h, w), c = ("height", "width") if dynamic else part.size, part.input_shape[2]
    shape = part.output_shape(part.outputs[0])
    if part.logits:
        g.node("Identity", [result], "logits")
        g.node("Softmax", ["logits"], "probabilities", axis=1)
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *shape]) for n in ("logits", "probabilities")]
    else:
        g.node("Identity", [result], "features")
        shape = [None, None, shape[2]] if dynamic and len(shape) == 3 else shape  # the map's size follows the input's
        outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", *shape])]
    graph = helper.make_graph(g.nodes, spec.id, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", h, w, c])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="zoo")
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    meta = {"zoo.spec": spec.id, "zoo.fingerprint": spec.fingerprint, "zoo.classes": json.dumps(classes),
            "zoo.input": json.dumps(part.input), "zoo.layout": "NHWC, preprocessed as zoo.input says"}
    helper.set_model_props(model, meta)
    return model, g.inits


def _nodes(part: Part, tensors: dict[str, np.ndarray]) -> tuple[GraphBuilder, str]:
    """The part's layers as nodes from the input `image` on (NHWC), and the name of its output: a map back
    in NHWC, or pooled as the part says."""
    g = GraphBuilder(tensors)
    outputs = {INPUT: g.node("Transpose", ["image"], "image_nchw", perm=[0, 3, 1, 2])}
    for node in part.nodes:
        outputs[node.name] = KINDS[node.kind].onnx(node, g, [outputs[i] for i in node.inputs])
    result = outputs[part.outputs[0]]
    if part.pooling:
        return g, g.node("Flatten", [g.node("GlobalAveragePool" if part.pooling == "avg" else "GlobalMaxPool", [result])], axis=1)
    if len(part.output_shape(part.outputs[0])) == 3:
        return g, g.node("Transpose", [result], perm=[0, 2, 3, 1])
    return g, result


SIZES_CHECKED = 32


def size_free(part: Part, tensors: dict[str, np.ndarray]) -> bool:
    """Whether `part` can take any input size from its own up in one ONNX graph: its nodes and constants are
    the same at each of the SIZES_CHECKED sizes above it (both sides grown together), and every layer takes
    them. A layer's padding and rounding depend on the size only through its remainder by the strides before
    it, whose product is 32 in every registered network, so those sizes meet every case; a dense layer after a
    flatten, or an adaptive pooling, fails at the first."""
    def signature(p: Part):
        g, _ = _nodes(p, tensors)
        return ([n.SerializeToString() for n in g.nodes],
                [(name, a.shape, None if name in tensors else a.tobytes()) for name, a in g.inits])

    h, w = part.size
    want = signature(part)
    for d in range(1, SIZES_CHECKED + 1):
        try:
            other = select(part.spec, pooling=part.pooling, outputs=part.outputs, input_size=(h + d, w + d))
        except ZooError:
            return False
        if signature(other) != want:
            return False
    return True


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


def write_onnx(path, model, inits: list[tuple[str, np.ndarray]], release=None, external: bool | None = None) -> dict[str, tuple[str, int]]:
    """Write `model` with `inits` as initializers, streaming each weight from its array to the file.

    protobuf merges repeated occurrences of a message field, so the file is the weightless model followed,
    per initializer, by `ModelProto.graph { initializer { dims, data_type, name, raw_data } }`: the same
    model as one with all initializers inside, without ever building it (onnx.helper would hold the
    weights as protobuf, then serialise a second copy). `release(array)` follows each write.

    With `external` (default: when the file would pass protobuf's 2 GiB limit) the weights go to
    `<name>.data` beside it, each at a 4 KiB-aligned offset, and the initializers only point there
    (ONNX's external data). Returns where each weight's bytes are: {name: (file name, offset)} (check_onnx)."""
    from contextlib import nullcontext
    from pathlib import Path

    from onnx import TensorProto, helper

    path = Path(path)
    external = needs_external_data(model, inits) if external is None else external
    data_file = path.with_name(path.name + ".data")
    offsets = {}
    with open(path, "wb") as f, (open(data_file, "wb") if external else nullcontext()) as data_out:
        f.write(model.SerializeToString())
        for name, arr in inits:
            data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            tensor = TensorProto(name=name, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
            if external:
                offset = -(-data_out.tell() // 4096) * 4096
                data_out.seek(offset)
                data_out.write(memoryview(data.reshape(-1)).cast("B"))
                offsets[name] = (data_file.name, offset)
                record = _external(tensor, data_file.name, offset, data.nbytes).SerializeToString()
                f.write(_field(7, len(_field(5, len(record))) + len(record)) + _field(5, len(record)) + record)
            else:
                head = tensor.SerializeToString()
                size = len(head) + len(_field(9, data.nbytes)) + data.nbytes
                graph = len(_field(5, size)) + size
                f.write(_field(7, graph) + _field(5, size) + head + _field(9, data.nbytes))
                offsets[name] = (path.name, f.tell())
                f.write(memoryview(data.reshape(-1)).cast("B"))
            del data
            if release:
                release(arr)
    return offsets


def _external(tensor, location: str, offset: int, length: int):
    """`tensor` as ONNX external data: its bytes are `length` at `offset` in the file `location`."""
    from onnx import TensorProto

    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


SMALL = 1 << 16  # bytes: an initializer check_onnx keeps inside the model it checks


def check_onnx(path, model, inits: list[tuple[str, np.ndarray]], offsets: dict[str, tuple[str, int]]) -> None:
    """onnx.checker's full check (strict shape inference included) of the file write_onnx wrote `model` and
    `inits` to, with `offsets` its answer, without loading the weights: checking an ONNX file loads it whole
    as protobuf (2x the model, the export's peak). What is checked instead is the same model with each
    large initializer as external data pointing at its bytes inside that file (or its .data file), written
    beside it as a small file. Small initializers keep their values: shape inference reads constants (a
    Reshape's shape). The weights' values are proven by ONNX Runtime running the file itself."""
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for name, arr in inits:
        if arr.nbytes <= SMALL:
            skeleton.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        else:
            tensor = TensorProto(name=name, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
            skeleton.graph.initializer.append(_external(tensor, *offsets[name], arr.nbytes))
    checked = path.with_name(f".check.{path.name}")
    try:
        onnx.save(skeleton, str(checked))
        onnx.checker.check_model(str(checked), full_check=True)
    finally:
        checked.unlink(missing_ok=True)
