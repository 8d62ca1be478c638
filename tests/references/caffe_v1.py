"""Run inside the Caffe chroot (../shared/tools/caffe/caffe_chroot.sh run): a .caffemodel rewritten as old
Caffe wrote it, with Caffe's own caffe_pb2 (V1: NetParameter.layers with enum types and the net's
input/input_dim, blobs as 4-d num/channels/height/width), then loaded by Caffe (which upgrades V1 nets on
load) with the deploy prototxt and run on the same photos as the original.

    python3 caffe_v1.py --prototxt P --caffemodel M --photos photos227.npy --out DIR --name NAME

writes NAME_v1.caffemodel and NAME_v1_outputs.npz (`logits`: the last blob before `prob`; `prob`).
"""

import argparse

import caffe
import numpy as np
from caffe.proto import caffe_pb2

V1 = caffe_pb2.V1LayerParameter
TYPES = {"Convolution": V1.CONVOLUTION, "InnerProduct": V1.INNER_PRODUCT, "ReLU": V1.RELU, "LRN": V1.LRN,
         "Pooling": V1.POOLING, "Dropout": V1.DROPOUT, "Softmax": V1.SOFTMAX, "Concat": V1.CONCAT}
PARAMS = ("convolution_param", "inner_product_param", "lrn_param", "pooling_param", "dropout_param", "relu_param",
          "concat_param", "softmax_param")


def to_v1(net):
    old = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.type == "Input":
            old.input.extend(layer.top)
            old.input_dim.extend(layer.input_param.shape[0].dim)
            continue
        v1 = old.layers.add(name=layer.name, type=TYPES[layer.type])
        v1.bottom.extend(layer.bottom)
        v1.top.extend(layer.top)
        for param in PARAMS:
            if layer.HasField(param):
                getattr(v1, param).CopyFrom(getattr(layer, param))
        for blob in layer.blobs:
            dims = [1] * (4 - len(blob.shape.dim)) + list(blob.shape.dim)
            b = v1.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
            b.data.extend(blob.data)
    return old


def main():
    ap = argparse.ArgumentParser()
    for flag in ("--prototxt", "--caffemodel", "--photos", "--out", "--name"):
        ap.add_argument(flag, required=True)
    args = ap.parse_args()
    net = caffe_pb2.NetParameter()
    net.ParseFromString(open(args.caffemodel, "rb").read())
    assert not net.layers, "already a V1 file"
    path = f"{args.out}/{args.name}_v1.caffemodel"
    with open(path, "wb") as f:
        f.write(to_v1(net).SerializeToString())
    caffe.set_mode_cpu()
    loaded = caffe.Net(args.prototxt, path, caffe.TEST)
    x = np.load(args.photos)
    name = loaded.inputs[0]
    loaded.blobs[name].reshape(*x.shape)
    loaded.blobs[name].data[...] = x
    out = loaded.forward()
    before_prob = loaded.bottom_names["prob"][0]
    np.savez(f"{args.out}/{args.name}_v1_outputs.npz", logits=loaded.blobs[before_prob].data, prob=out["prob"])
    print("wrote", path)


if __name__ == "__main__":
    main()
