"""The spec as an ONNX graph, written by zoo itself (onnx.helper), weights streamed to the file.

NHWC float input `image` (preprocessed as the spec says), one Transpose to NCHW, then each layer kind's
nodes; outputs `logits` and `probabilities`, or a headless part's `features`. Height and width are
symbolic where the graph is the same at every size (size_free). tf2onnx was measured on the full AlexNet at ~14 GB and
60-80 s and cannot convert Keras' grouped convs at all (it reports success on an invalid file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.features import Part, select
from zoo.graph import INPUT
from zoo.layers import KINDS
from zoo.spec import ModelSpec

DEFAULT_OPSET = 17


SIZE_DIMS = ("height", "width")  # the input's symbolic dimensions where the graph takes any size (size_free)


def session_options(threads: int | None = None, size=None):
    """The ONNX Runtime session options zoo runs its graphs with (zoo predict, zoo bench): every graph
    optimisation (ORT_ENABLE_ALL, ONNX Runtime's default: on AVX2/AVX-512 CPUs the convs run in its blocked
    NCHWc layout, with batch norms, biases and ReLUs folded into them) and as many intra-op threads as the
    CPUs this process may run on. ONNX Runtime's own default counts the machine's cores: a process confined
    to fewer (taskset, a container's cpuset) then runs more threads than CPUs, and they spin against each
    other (ResNet-50, batch 1, confined to one of two cores: 128 ms of CPU a forward instead of 70 ms;
    docs/performance.md, issue 18).

    `size` (H, W): the size every call will have, given to a graph with symbolic height and width. Not knowing
    it, ONNX Runtime cannot prove a ResNet block's residual sum the size of its last conv's output and does not
    add in place: that conv ran 15-80% slower, the network 7-10% at batch 32 (docs/performance.md)."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    for dim, value in zip(SIZE_DIMS, size or ()):  # ignored by a graph without them
        options.add_free_dimension_override_by_name(dim, int(value))
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
    (h, w), c = SIZE_DIMS if dynamic else part.size, part.input_shape[2]
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


SMALL = 1 << 16  # bytes: an initializer the checked model keeps inside (shape inference reads constants)


def checked_copy(path, offsets: dict[str, tuple[str, int]]) -> Path:
    """`.check.<name>` beside `path`: the ONNX file write_onnx wrote, parsed by the protobuf library except the
    large initializers' raw bytes, which are left where they lie in that file (ONNX external data), so
    onnx.checker and ONNX Runtime check the file's own graph and bytes, and ONNX Runtime maps the weights
    instead of holding them as protobuf beside its own tensors (its session on the file itself took 1.7x
    AlexNet's weights; parsing the file whole takes 2x: protobuf copies what it reads). The file is walked
    as write_onnx writes it (a ModelProto whose large fields are `graph { initializer { ... raw_data } }`),
    every length checked by zoo.wire; a raw_data must lie where write_onnx says (`offsets`)."""
    import onnx
    from google.protobuf.message import DecodeError

    from zoo.mapped import map_file
    from zoo.wire import WireError

    path = Path(path)
    buf = memoryview(map_file(path))
    parsed = onnx.ModelProto()
    try:
        for lo, hi, (number, span) in _split(buf, 0, len(buf)):
            if number is None:
                parsed.MergeFromString(buf[lo:hi])
                continue
            if number != 7:  # ModelProto.graph
                raise ZooError(f"the written ONNX file has a {hi - lo:,}-byte field {number} where zoo writes none", path)
            for glo, ghi, (gnumber, tspan) in _split(buf, *span):
                if gnumber is None:
                    parsed.graph.MergeFromString(buf[glo:ghi])
                elif gnumber != 5:  # GraphProto.initializer
                    raise ZooError(f"the written ONNX file's graph has a {ghi - glo:,}-byte field {gnumber} where zoo writes none", path)
                else:
                    parsed.graph.initializer.append(_pointing_into(buf, tspan, path, offsets))
    except (WireError, DecodeError) as e:
        raise ZooError(f"the written ONNX file is not valid protobuf ({e})", path) from None
    finally:
        buf.release()
    checked = path.with_name(f".check.{path.name}")
    onnx.save(parsed, str(checked))
    return checked


def _split(buf, lo: int, hi: int):
    """The message in buf[lo:hi] as runs of small fields, yielded as (start, end, (None, None)), and its large
    length-delimited fields, as (start, end, (field number, payload span)): a parser's unit of work each."""
    from zoo.wire import LENGTH, fields, varint_size

    start = lo
    for number, wire, value in fields(buf, lo, hi):
        if wire == LENGTH and value[1] - value[0] > SMALL:
            frame = value[0] - varint_size(value[1] - value[0]) - varint_size(number << 3 | wire)
            if start < frame:
                yield start, frame, (None, None)
            yield frame, value[1], (number, value)
            start = value[1]
    if start < hi:
        yield start, hi, (None, None)


def _pointing_into(buf, span, path: Path, offsets: dict[str, tuple[str, int]]):
    """The TensorProto in buf[span], its large raw_data (field 9) as external data pointing at those bytes of `path`."""
    from onnx import TensorProto

    tensor, raw = TensorProto(), None
    for lo, hi, (number, value) in _split(buf, *span):
        if number == 9:
            raw = value
        else:
            tensor.MergeFromString(buf[lo:hi])  # a large field that is not raw_data is parsed as any other
    if raw is not None:
        if offsets.get(tensor.name) != (path.name, raw[0]):
            raise ZooError(f"initializer {tensor.name}'s bytes are not where the writer put them", path)
        _external(tensor, path.name, raw[0], raw[1] - raw[0])
    return tensor


def check_onnx(checked) -> None:
    """onnx.checker's full check (strict shape inference included) of checked_copy's model."""
    import onnx

    onnx.checker.check_model(str(checked), full_check=True)
