"""A .caffemodel writer for tests, built on the protobuf runtime from a schema written here.

It shares no code with zoo-caffemodel's reader: the message types are declared below (the subset of
Caffe's public caffe.proto that a model file uses, with its field numbers) and serialised by protobuf.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED

SCHEMA = {
    "BlobShape": [("dim", 1, REP, F.TYPE_INT64, None, True)],
    "BlobProto": [("shape", 7, OPT, F.TYPE_MESSAGE, "BlobShape", False), ("data", 5, REP, F.TYPE_FLOAT, None, True),
                  ("double_data", 8, REP, F.TYPE_DOUBLE, None, True),
                  ("num", 1, OPT, F.TYPE_INT32, None, False), ("channels", 2, OPT, F.TYPE_INT32, None, False),
                  ("height", 3, OPT, F.TYPE_INT32, None, False), ("width", 4, OPT, F.TYPE_INT32, None, False)],
    "ConvolutionParameter": [("num_output", 1, OPT, F.TYPE_UINT32, None, False), ("group", 5, OPT, F.TYPE_UINT32, None, False)],
    "LayerParameter": [("name", 1, OPT, F.TYPE_STRING, None, False), ("type", 2, OPT, F.TYPE_STRING, None, False),
                       ("bottom", 3, REP, F.TYPE_STRING, None, False), ("top", 4, REP, F.TYPE_STRING, None, False),
                       ("blobs", 7, REP, F.TYPE_MESSAGE, "BlobProto", False),
                       ("convolution_param", 106, OPT, F.TYPE_MESSAGE, "ConvolutionParameter", False)],
    "V1LayerParameter": [("bottom", 2, REP, F.TYPE_STRING, None, False), ("top", 3, REP, F.TYPE_STRING, None, False),
                         ("name", 4, OPT, F.TYPE_STRING, None, False), ("type", 5, OPT, F.TYPE_INT32, None, False),
                         ("blobs", 6, REP, F.TYPE_MESSAGE, "BlobProto", False),
                         ("convolution_param", 10, OPT, F.TYPE_MESSAGE, "ConvolutionParameter", False)],
    "NetParameter": [("name", 1, OPT, F.TYPE_STRING, None, False),
                     ("layers", 2, REP, F.TYPE_MESSAGE, "V1LayerParameter", False),
                     ("layer", 100, REP, F.TYPE_MESSAGE, "LayerParameter", False)],
}
V1_CONVOLUTION, V1_INNER_PRODUCT, V1_RELU = 4, 14, 18


def _classes():
    fdp = descriptor_pb2.FileDescriptorProto(name="test_caffe.proto", package="caffe", syntax="proto2")
    for message, fields in SCHEMA.items():
        m = fdp.message_type.add(name=message)
        for name, number, label, type_, type_name, packed in fields:
            f = m.field.add(name=name, number=number, label=label, type=type_)
            if type_name:
                f.type_name = f".caffe.{type_name}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}")) for name in SCHEMA}


PB = _classes()


def write_caffemodel(path, weights: dict, groups: dict | None = None, v1: bool = False, name: str = "AlexNet") -> None:
    """weights: {layer: (W, b)} in Caffe's layout (conv OIHW, fc (out, in)), in network order."""
    net = PB["NetParameter"](name=name)
    groups = groups or {}
    for layer, (w, b) in weights.items():
        entry = net.layers.add() if v1 else net.layer.add()
        entry.name = layer
        conv = w.ndim == 4
        if v1:
            entry.type = V1_CONVOLUTION if conv else V1_INNER_PRODUCT
        else:
            entry.type = "Convolution" if conv else "InnerProduct"
        if conv:
            entry.convolution_param.num_output = w.shape[0]
            entry.convolution_param.group = groups.get(layer, 1)
        for arr in (w, b):
            blob = entry.blobs.add()
            if v1:  # legacy 4-d num/channels/height/width
                dims = (1,) * (4 - arr.ndim) + arr.shape
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(arr.shape)
            blob.data.extend(arr.ravel().tolist())  # from a list: ~10x faster than from numpy elements
        relu = net.layers.add() if v1 else net.layer.add()
        relu.name = f"relu_{layer}"
        relu.type = V1_RELU if v1 else "ReLU"
    with open(path, "wb") as f:
        f.write(net.SerializeToString())
