"""The zoo-caffemodel plugin's hand-written wire reader against the protobuf library, on generated and
damaged NetParameter messages (hypothesis).

protobuf parses with tests/caffe_proto.py's schema (Caffe's field numbers, serialised by protobuf, no
code shared with the plugin). For every input: where protobuf parses it, the reader gives the same net
name, layers in the same order, names, types, conv groups and blobs (shape and every value), or
refuses it for one of the reasons it documents (a blob whose shape does not hold its values, a name that
is not UTF-8, groups or a deprecated wire type, no layers at all); where protobuf refuses it, so does
the reader. The reader never answers differently from protobuf.
"""

import math

import numpy as np
from caffe_proto import PB
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo_caffemodel.caffemodel import V1_TYPES, read_layers

from zoo.errors import ZooError
from zoo.wire import LENGTH, WireError, fields

# the reader's own refusals of messages protobuf accepts, by their message's start
DOCUMENTED = ("blob declares shape", "a name is not UTF-8", "unsupported wire type", "no layers", "float data whose length")

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
dims = st.lists(st.integers(0, 4), min_size=0, max_size=4)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: a message embedded in its parent, with protobuf's own varint encoder."""
    from google.protobuf.internal.encoder import _VarintBytes

    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


@st.composite
def blob_piece(draw) -> bytes:
    shape = draw(dims)
    size = math.prod(shape)
    if draw(st.integers(0, 9)) == 0:  # now and then values that do not fill the shape
        size = draw(st.integers(0, 8))
    blob = PB["BlobProto"]()
    if draw(st.booleans()):
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - len(shape)) + tuple(shape)
    else:
        blob.shape.dim.extend(shape)
    values = draw(st.lists(st.floats(width=32, allow_nan=False), min_size=size, max_size=size))
    (blob.double_data if draw(st.booleans()) else blob.data).extend(values)
    return blob.SerializeToString()


@st.composite
def layer_piece(draw, v1: bool) -> bytes:
    """Part of a layer: protobuf merges a message written in several parts (fields repeated, sub-messages merged)."""
    layer = PB["V1LayerParameter" if v1 else "LayerParameter"]()
    if draw(st.booleans()):
        layer.name = draw(names)
    if draw(st.booleans()):
        code = draw(st.sampled_from(sorted(V1_TYPES)))
        layer.type = code if v1 else V1_TYPES[code]
    if draw(st.booleans()):
        layer.convolution_param.group = draw(st.integers(1, 4))
    elif draw(st.booleans()):
        layer.convolution_param.num_output = 8  # a convolution_param without a group: an earlier group stays
    blobs = [b"".join(draw(st.lists(blob_piece(), min_size=1, max_size=2))) for _ in range(draw(st.integers(0, 2)))]
    return layer.SerializeToString() + b"".join(_field(6 if v1 else 7, b) for b in blobs)


@st.composite
def nets(draw) -> bytes:
    net = PB["NetParameter"](name=draw(names)).SerializeToString()
    for _ in range(draw(st.integers(0, 4))):
        v1 = draw(st.booleans())
        net += _field(2 if v1 else 100, b"".join(draw(st.lists(layer_piece(v1), min_size=1, max_size=2))))
        if draw(st.integers(0, 4)) == 0:  # the net's name again, later in the file
            net += PB["NetParameter"](name=draw(names)).SerializeToString()
    return net


def expected(message) -> tuple[str, list]:
    """What protobuf says the file holds, in the reader's terms (file order: V1 `layers` and `layer` are
    separate repeated fields, so a file has one or the other in practice; compare each list in order)."""
    def layer_view(layer, v1):
        out = []
        for blob in layer.blobs:
            if blob.HasField("shape"):
                shape = list(blob.shape.dim)
            else:
                shape = [blob.num if blob.HasField("num") else 1, blob.channels if blob.HasField("channels") else 1,
                         blob.height if blob.HasField("height") else 1, blob.width if blob.HasField("width") else 1]
                while len(shape) > 1 and shape[0] == 1:
                    shape = shape[1:]
            values = np.array(list(blob.data) or list(blob.double_data), np.float64)
            out.append((tuple(shape), values))
        kind = (V1_TYPES.get(layer.type, f"V1 type {layer.type}") if layer.HasField("type") else "") if v1 else layer.type
        group = layer.convolution_param.group if layer.HasField("convolution_param") and layer.convolution_param.HasField("group") else 1
        return layer.name, kind, group, out

    return message.name, [layer_view(la, True) for la in message.layers] + [layer_view(la, False) for la in message.layer]


def agree(data: bytes) -> None:
    try:
        message = PB["NetParameter"].FromString(data)
    except Exception:  # protobuf's DecodeError: the reader must refuse it too
        try:
            read_layers(memoryview(data))
        except ZooError:
            return
        raise AssertionError("the reader accepted what protobuf refuses") from None
    try:
        net, got, _ = read_layers(memoryview(data))
    except WireError as e:
        assert str(e).startswith(DOCUMENTED), f"refused for an undocumented reason: {e}"
        return
    name, want = expected(message)
    assert net == name
    v1 = _from_v1_fields(data)
    v1_first = [la for la, old in zip(got, v1) if old] + [la for la, old in zip(got, v1) if not old]
    assert [(la.name, la.type, la.group) for la in v1_first] == [(n, k, g) for n, k, g, _ in want]
    for layer, (_, _, _, want_blobs) in zip(v1_first, want):
        assert [tuple(b.shape) for b in layer.blobs] == [shape for shape, _ in want_blobs]
        for blob, (_, values) in zip(layer.blobs, want_blobs):
            np.testing.assert_array_equal(blob.astype(np.float64).ravel(), values)


def _from_v1_fields(data) -> list[bool]:
    """For each layer the reader returns (in file order), whether it came from a V1 `layers` field."""
    return [number == 2 for number, wire, _ in fields(memoryview(data)) if number in (2, 100) and wire == LENGTH]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets())
def test_generated_nets_read_as_protobuf_reads_them(data):
    agree(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets(), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=4), st.integers(0, 10 ** 6))
def test_damaged_nets_read_as_protobuf_reads_them(data, flips, cut):
    data = bytearray(data)
    for at, value in flips if data else ():
        data[at % len(data)] = value
    agree(bytes(data[: max(1, cut % (len(data) + 1))]))
