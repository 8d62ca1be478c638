"""deploy.prototxt files, read by the protobuf library with Caffe's own schema.

caffe.proto.pb is the compiled caffe/proto/caffe.proto of Caffe 1.0 (BSD 2-Clause), taken from
Debian's python3-caffe 1.0.0+git20180821 (`caffe_pb2.DESCRIPTOR.serialized_pb`): every message, field
and default exactly as Caffe parses them, V1 `layers` included; no hand-written text parser.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from zoo.errors import ZooError


@cache
def message_class(name: str):
    """The protobuf class of Caffe's message `name` (NetParameter, LayerParameter, ...)."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"caffe.{name}"))


@cache
def _pool():
    # protobuf is imported when a prototxt is read, not with the plugin: ~30 ms of every `zoo convert`
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(files(__package__).joinpath("caffe.proto.pb").read_bytes()))
    return pool


def parse(text: str, path=None):
    """A prototxt's NetParameter message."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, message_class("NetParameter")())
    except text_format.ParseError as e:
        raise ZooError(f"not a valid prototxt: {e}", path) from None


def read_prototxt(path):
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ZooError(f"cannot read prototxt: {e.strerror or e}", path) from None
    except UnicodeDecodeError:
        raise ZooError("not a prototxt: not UTF-8 text (a binary file?)", path) from None
    return parse(text, path)


def layer_type(layer) -> str:
    """A layer's type by name: LayerParameter's string, or V1LayerParameter's enum name."""
    if isinstance(layer.type, str):
        return layer.type
    return layer.DESCRIPTOR.fields_by_name["type"].enum_type.values_by_number[layer.type].name


def layer_settings(net) -> dict[str, dict]:
    """{layer name as specs write it ("/" as "_"): {"type": ..., "group": int}} for `layer` and V1 `layers` entries."""
    return {layer.name.replace("/", "_"): {"type": layer_type(layer), "group": layer.convolution_param.group}
            for layer in [*net.layer, *net.layers]}
