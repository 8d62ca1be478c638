#!/usr/bin/env python3
"""Reference outputs of real BVLC Caffe 1.0 for ANY deploy prototxt, run inside the bullseye chroot (real BVLC Caffe 1.0).

Fills every parameter blob from np.random.RandomState(seed) in net.params order (He-scaled conv/fc
weights, then LSUV-rescaled on the photos, biases N(0, 0.1), BatchNorm mean N(0, 0.2)/var U(0.5, 2)
stored times a factor f in U(0.5, 4), Scale gamma U(0.5, 1.5)/beta N(0, 0.1)), saves the .caffemodel
with caffe.Net.save, runs a forward pass on skimage's photos (BGR, 0..255 minus [104, 117, 123], NCHW)
and writes the input, every top blob that is the net's output, the logits and a params npz in Caffe layout.

  sh caffe_chroot.sh run OUTDIR -- python3 /mnt/tools/caffe_reference.py --prototxt /mnt/tools/nets/X.prototxt \
      --out /mnt/out --name vgg16 --seed 31

Changes from /work/shared/tools/caffe/caffe_reference.py (the random filling, photos and outputs are
unchanged; --batch, the number of images, was already there and defaults to 4):
  * --center {none,hidden,all} (default none = the original calibration): "hidden" also centers each
    hidden conv/fc output channel over the batch before the LSUV scaling (see calibrate). Without it
    the deep nets' logits are ~95-99.9% one image-independent vector (same top-1 for every photo);
  * writes NAME_shapes.json: every blob name -> its shape, as Caffe computed it (net.blobs, in order);
  * the report also holds "center", per-image logits std and top-1 logit value, and the shapes of
    Pooling tops;
  * after saving, reloads NAME.caffemodel into a fresh caffe.Net and checks that its forward gives the
    same logits (max abs diff in the report as reload_max_abs_diff).
"""

import argparse
import json
import os

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
import caffe  # noqa: E402

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def fill(net, seed):
    rng = np.random.RandomState(seed)
    kinds = {name: layer.type for name, layer in zip(net._layer_names, net.layers)}
    for name, blobs in net.params.items():
        kind = kinds[name]
        if kind in ("Convolution", "InnerProduct"):
            W = blobs[0].data
            fan_in = int(np.prod(W.shape[1:]))
            W[...] = rng.normal(0, np.sqrt(2.0 / fan_in), W.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
        elif kind == "BatchNorm":
            # Caffe stores running sums: the statistics are blobs[0] / f and blobs[1] / f, f = blobs[2][0]
            f = rng.uniform(0.5, 4.0)
            blobs[0].data[...] = f * rng.normal(0, 0.2, blobs[0].data.shape)
            blobs[1].data[...] = f * rng.uniform(0.5, 2.0, blobs[1].data.shape)
            blobs[2].data[...] = f
        elif kind == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].data.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
        else:
            raise SystemExit(f"no filler for {kind} {name}")


def calibrate(net, x, inp, center="none"):
    """LSUV-style: layer by layer, scale each conv/fc so its output has std 1 (the last one 3), so that
    deep nets (ResNet's residual sums, GoogLeNet) give discriminative, unsaturated logits.

    center (added; "none" is the original behaviour): "hidden" also removes, before scaling, each
    output channel's mean over the batch (N, H, W) from every conv/fc but the last, "all" from the
    last one too. The mean goes into the layer's bias; a layer without a bias (ResNet's convs) has it
    added instead to the running mean of the BatchNorm that works in place on its top (stored times
    that BatchNorm's factor f), so the random BatchNorm mean stays on top of the data mean."""
    net.blobs[inp].data[...] = x
    layers = list(zip(net._layer_names, net.layers))
    weighted = [(n, lay) for n, lay in layers if lay.type in ("Convolution", "InnerProduct")]
    for i, (name, layer) in enumerate(weighted):
        net.forward(end=name)
        top = net.top_names[name][0]
        y = net.blobs[top].data
        last = i == len(weighted) - 1
        target = 3.0 if last else 1.0
        if center == "all" or (center == "hidden" and not last):
            axes = (0,) + tuple(range(2, y.ndim))
            m = y.mean(axis=axes)
            std = float((y - m.reshape((1, -1) + (1,) * (y.ndim - 2))).std()) or 1.0
            t = target / std
            for b in layer.blobs:
                b.data[...] *= t
            if len(layer.blobs) > 1:
                layer.blobs[1].data[...] -= t * m
            else:
                bn = [lay for n2, lay in layers[[n2 for n2, _ in layers].index(name) + 1 :] if lay.type == "BatchNorm" and net.bottom_names[n2] == [top]]
                if not bn:
                    raise SystemExit(f"{name}: no bias and no BatchNorm on {top} to center")
                f = float(bn[0].blobs[2].data[0])
                bn[0].blobs[0].data[...] += f * t * m
        else:
            std = float(y.std()) or 1.0
            for b in layer.blobs:
                b.data[...] *= target / std


def photos(n, h, w):
    import skimage.data
    from skimage.transform import resize

    ims = []
    for name in ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"]:
        try:
            im = getattr(skimage.data, name)()
        except Exception:
            continue
        if im.ndim == 3 and im.shape[2] == 3:
            ims.append(resize(im, (h, w), anti_aliasing=True, preserve_range=True).astype(np.float32))
    batch = [ims[i % len(ims)][:, ::-1] if (i // len(ims)) % 2 else ims[i % len(ims)] for i in range(n)]
    x = np.stack(batch)[..., ::-1].transpose(0, 3, 1, 2)  # RGB->BGR, NCHW
    return (x - MEAN_BGR.reshape(1, 3, 1, 1)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prototxt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--center", choices=["none", "hidden", "all"], default="none")
    a = ap.parse_args()
    caffe.set_mode_cpu()
    net = caffe.Net(a.prototxt, caffe.TEST)
    inp = net.inputs[0]
    _, c, h, w = net.blobs[inp].data.shape
    net.blobs[inp].reshape(a.batch, c, h, w)
    net.reshape()
    fill(net, a.seed)
    x = photos(a.batch, h, w)
    calibrate(net, x, inp, a.center)
    net.save(os.path.join(a.out, a.name + ".caffemodel"))
    net.blobs[inp].data[...] = x
    net.forward()
    outs = {"data": x}
    for k in net.outputs:
        outs[k] = net.blobs[k].data.copy()
    names = list(net.blobs.keys())
    logits = [k for k in names if net.blobs[k].data.ndim == 2][-2] if "prob" in net.outputs else net.outputs[0]
    outs["logits"] = net.blobs[logits].data.copy()
    np.savez(os.path.join(a.out, a.name + "_outputs.npz"), **outs)
    params = {f"{k}_{i}": b.data.copy() for k, bl in net.params.items() for i, b in enumerate(bl)}
    np.savez(os.path.join(a.out, a.name + "_params.npz"), **params)
    rep = {
        "name": a.name,
        "seed": a.seed,
        "center": a.center,
        "input": [a.batch, c, h, w],
        "logits_blob": logits,
        "logits_std": float(outs["logits"].std()),
        "top1": outs["logits"].argmax(1).tolist(),
        "params": int(sum(b.data.size for bl in net.params.values() for b in bl)),
        "layers": [(n, lay.type) for n, lay in zip(net._layer_names, net.layers)],
    }
    rep["logits_std_per_image"] = [float(v) for v in outs["logits"].std(1)]
    rep["top1_logit"] = [float(v) for v in outs["logits"].max(1)]
    kinds = {n: lay.type for n, lay in zip(net._layer_names, net.layers)}
    rep["pooling_tops"] = {n: [net.top_names[n][0], list(net.blobs[net.top_names[n][0]].data.shape)] for n in net._layer_names if kinds[n] == "Pooling"}
    shapes = {k: list(v.data.shape) for k, v in net.blobs.items()}
    json.dump(shapes, open(os.path.join(a.out, a.name + "_shapes.json"), "w"), indent=1)
    net2 = caffe.Net(a.prototxt, os.path.join(a.out, a.name + ".caffemodel"), caffe.TEST)
    net2.blobs[inp].reshape(a.batch, c, h, w)
    net2.reshape()
    net2.blobs[inp].data[...] = x
    net2.forward()
    rep["reload_max_abs_diff"] = float(np.abs(net2.blobs[logits].data - outs["logits"]).max())
    json.dump(rep, open(os.path.join(a.out, a.name + "_report.json"), "w"), indent=1)
    print(json.dumps({k: rep[k] for k in ("name", "input", "logits_blob", "logits_std", "top1", "params", "logits_std_per_image", "reload_max_abs_diff")}))


if __name__ == "__main__":
    main()
