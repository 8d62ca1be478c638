"""The short builders behind the generated spec files: `python -m zoo.specs.builders` rewrites them.

The specs are data: the JSON files beside this module are what zoo reads and fingerprints. Families of
repeated blocks are written by these functions instead of by hand (as Keras Applications' stack
functions name `conv2_block1_1_conv`), and the Caffe networks are translated from their published
deploy prototxts by the zoo-caffemodel plugin. tests/test_specs.py checks the files equal the builders'
output, so the two cannot drift.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
RESNET50_BLOCKS = (3, 4, 6, 3)

IMAGENET_TORCH = {"channel_order": "RGB", "value_range": [0, 1], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                  "resize": 256}
CAFFE_BGR = {"channel_order": "BGR", "value_range": [0, 255], "std": [1.0, 1.0, 1.0], "resize": 256}
KERAS_CAFFE_MEAN = [103.939, 116.779, 123.68]  # keras.applications.imagenet_utils, mode "caffe" (BGR)


def _input(size: int, preprocessing: dict, **extra) -> dict:
    return {"size": [size, size], "channels": 3} | preprocessing | extra


# Layer names of a ResNet-50 in each framework: {s}/{b} count stages and blocks from the framework's own start
TORCHVISION_NAMES = {"stem": ("conv1", "bn1", "relu", "maxpool"), "block": "layer{s1}.{b0}", "conv": "{p}.conv{i}",
                     "bn": "{p}.bn{i}", "relu": "{p}.relu{i}", "shortcut": ("{p}.downsample.0", "{p}.downsample.1"),
                     "add": "{p}.add", "out": "{p}.relu3", "head": ("avgpool", "fc")}
KERAS_NAMES = {"stem": ("conv1_conv", "conv1_bn", "conv1_relu", "pool1_pool"), "block": "conv{s2}_block{b1}", "conv": "{p}_{i}_conv",
               "bn": "{p}_{i}_bn", "relu": "{p}_{i}_relu", "shortcut": ("{p}_0_conv", "{p}_0_bn"), "add": "{p}_add", "out": "{p}_out",
               "head": ("avg_pool", "predictions")}


def resnet50(names: dict, *, stride_in_3x3: bool, bias: bool, epsilon: float, momentum: float = 0.99, width: int = 64,
             shortcut_first: bool = False, pad_3x3: int | str = 1) -> list[dict]:
    """ResNet-50's bottleneck stacks (3, 4, 6, 3) under a framework's `names`. V1 (Keras, Caffe) strides in a
    block's first 1x1 conv, V1.5 (torchvision) in its 3x3; the order of layers and of the add's inputs is the
    framework's own (Keras builds the shortcut first)."""
    def conv_bn(conv, bn, filters, kernel, stride=1, pad=0, src=None):
        layer = {"name": conv, "kind": "conv", "filters": filters, "kernel": kernel, "stride": stride, "pad": pad, "bias": bias}
        return [layer | ({"inputs": [src]} if src else {}), {"name": bn, "kind": "batchnorm", "epsilon": epsilon, "momentum": momentum}]

    conv1, bn1, relu, pool = names["stem"]
    layers = conv_bn(conv1, bn1, width, 7, 2, 3) + [{"name": relu, "kind": "relu"},
                                                    {"name": pool, "kind": "maxpool", "size": 3, "stride": 2, "pad": 1}]
    x = pool
    for stage, blocks in enumerate(RESNET50_BLOCKS):
        filters = width * 2 ** stage
        for b in range(blocks):
            p = names["block"].format(s1=stage + 1, s2=stage + 2, b0=b, b1=b + 1)
            n = {k: tuple(t.format(p=p, i="{i}") for t in v) if isinstance(v, tuple) else v.format(p=p, i="{i}")
                 for k, v in names.items() if k in ("conv", "bn", "relu", "shortcut", "add", "out")}
            stride = 2 if stage and not b else 1
            main = conv_bn(n["conv"].format(i=1), n["bn"].format(i=1), filters, 1, 1 if stride_in_3x3 else stride, src=x)
            main += [{"name": n["relu"].format(i=1), "kind": "relu"}]
            main += conv_bn(n["conv"].format(i=2), n["bn"].format(i=2), filters, 3, stride if stride_in_3x3 else 1, pad_3x3)
            main += [{"name": n["relu"].format(i=2), "kind": "relu"}] + conv_bn(n["conv"].format(i=3), n["bn"].format(i=3), filters * 4, 1)
            shortcut = conv_bn(*n["shortcut"], filters * 4, 1, stride, src=x) if b == 0 else []
            layers += shortcut + main if shortcut_first else main + shortcut
            inputs = [shortcut[-1]["name"] if shortcut else x, main[-1]["name"]]
            layers += [{"name": n["add"], "kind": "add", "inputs": inputs if shortcut_first else inputs[::-1]}, {"name": n["out"], "kind": "relu"}]
            x = n["out"]
    return layers + [{"name": names["head"][0], "kind": "global_avgpool"}, {"name": names["head"][1], "kind": "dense", "units": 1000}]


def resnet50_torchvision(width: int = 64) -> list[dict]:
    """torchvision's ResNet-50 (V1.5), bias-free convs, PyTorch's batch-norm epsilon and momentum (its 0.1 is Keras' 0.9)."""
    return resnet50(TORCHVISION_NAMES, stride_in_3x3=True, bias=False, epsilon=1e-5, momentum=0.9, width=width)


def resnet50_keras(width: int = 64) -> list[dict]:
    """keras.applications.ResNet50 (V1), convs with bias, BN epsilon 1.001e-5. Keras' ZeroPadding2D layers are
    the convs' and pool's own padding here (the pool's input is non-negative: zero and -inf padding agree)."""
    return resnet50(KERAS_NAMES, stride_in_3x3=False, bias=True, epsilon=1.001e-5, width=width, shortcut_first=True, pad_3x3="same")


def vgg16_torchvision() -> list[dict]:
    """torchvision's vgg16 under its module names (features.N, classifier.N)."""
    layers, i = [], 0
    for filters, convs in zip((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)):
        for _ in range(convs):
            layers += [{"name": f"features.{i}", "kind": "conv", "filters": filters, "kernel": 3, "pad": 1},
                       {"name": f"features.{i + 1}", "kind": "relu"}]
            i += 2
        layers.append({"name": f"features.{i}", "kind": "maxpool", "size": 2, "stride": 2})
        i += 1
    return layers + [
        {"name": "avgpool", "kind": "adaptive_avgpool", "output": 7}, {"name": "flatten", "kind": "flatten"},
        {"name": "classifier.0", "kind": "dense", "units": 4096}, {"name": "classifier.1", "kind": "relu"},
        {"name": "classifier.2", "kind": "dropout", "rate": 0.5},
        {"name": "classifier.3", "kind": "dense", "units": 4096}, {"name": "classifier.4", "kind": "relu"},
        {"name": "classifier.5", "kind": "dropout", "rate": 0.5},
        {"name": "classifier.6", "kind": "dense", "units": 1000}]


def caffe_layers(prototxt: Path) -> list[dict]:
    from zoo_caffemodel.to_spec import spec_layers

    return spec_layers(prototxt.read_text(), prototxt)[0]


TORCHVISION = "https://github.com/pytorch/vision (torchvision.models)"
TORCH_HUB = "https://download.pytorch.org/models/"  # torchvision.models' weights URLs
KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"  # keras.src.applications' weights URLs
BVLC = "http://dl.caffe.berkeleyvision.org/"  # BVLC model zoo readmes (models/*/readme.md), which also give the sha1s
BVLC_LICENSE = "unrestricted use (BVLC model zoo)"


HASHES = ("sha256", "sha256_prefix", "sha1", "md5")


def published(url: str, source: str, license: str, **fields: str) -> dict:
    """{file name: entry} for a file as its publisher serves it: `fields` holds the hashes the publisher gives (HASHES;
    sha256_prefix: torch hub's names carry the sha256's first hex digits; "hash": "unknown" is written when there is
    none) and e.g. the release's name; then the URL, the weight source that reads it and the licence. `zoo fetch`
    takes a spec's first file with a URL."""
    unknown = {} if set(fields) & set(HASHES) else {"hash": "unknown"}
    return {url.rsplit("/", 1)[1]: fields | unknown | {"url": url, "source": source, "license": license}}


def torch_hub(name: str, **extra: str) -> dict:
    return published(TORCH_HUB + name, "torch", "BSD-3-Clause (torchvision)", sha256_prefix=name.rsplit("-", 1)[1][:-4], **extra)


def specs(prototxts: Path) -> dict[str, dict]:
    """{file name: spec} for every generated spec; `prototxts` holds the published deploy prototxts."""
    def spec(family, version, description, size, preprocessing, layers, provenance):
        return {"family": family, "version": version, "default": False, "description": description,
                "input": _input(size, preprocessing), "layers": layers, "head": layers[-1]["name"], "num_classes": 1000,
                "categories": "imagenet-1k", "provenance": provenance}

    resnet = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016."
    vgg = "Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition. ICLR 2015."
    out = {
        "caffenet_bvlc.json": spec(
            "caffenet", "bvlc", "BVLC Reference CaffeNet (models/bvlc_reference_caffenet): AlexNet with pooling before LRN.",
            227, CAFFE_BGR | {"mean": [104.007, 116.669, 122.679]}, caffe_layers(prototxts / "bvlc_reference_caffenet_deploy.prototxt"),
            {"paper": "Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep Convolutional Neural Networks. NIPS 2012 "
                      "(CaffeNet: BVLC's reproduction with pooling and LRN swapped).",
             "origin": "https://github.com/BVLC/caffe/tree/master/models/bvlc_reference_caffenet",
             "reference_files": published(BVLC + "bvlc_reference_caffenet.caffemodel", "caffemodel", BVLC_LICENSE,
                                         sha1="4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46"),
             "metrics": {"imagenet-1k": {"top1": 57.4, "top5": 80.4, "protocol": "center crop, Caffe model zoo readme"}},
             "license": BVLC_LICENSE}),
        "googlenet_bvlc.json": spec(
            "googlenet", "bvlc", "BVLC GoogLeNet (models/bvlc_googlenet): Inception v1, deploy net without the auxiliary heads.",
            224, CAFFE_BGR | {"mean": [104.0, 117.0, 123.0]}, caffe_layers(prototxts / "bvlc_googlenet_deploy.prototxt"),
            {"paper": "Szegedy et al. Going Deeper with Convolutions. CVPR 2015.",
             "origin": "https://github.com/BVLC/caffe/tree/master/models/bvlc_googlenet",
             "reference_files": published(BVLC + "bvlc_googlenet.caffemodel", "caffemodel", BVLC_LICENSE,
                                         sha1="405fc5acd08a3bb12de8ee5e23a96bec22f08204"),
             "metrics": {"imagenet-1k": {"top1": 68.7, "top5": 88.9, "protocol": "center crop, Caffe model zoo readme"}},
             "license": BVLC_LICENSE}),
        "vgg16_caffe.json": spec(
            "vgg16", "caffe", "VGG_ILSVRC_16_layers as released in Caffe by the Oxford VGG group; Keras Applications' vgg16 h5 "
            "holds the same network and preprocessing (convert it with --spec vgg16@caffe).",
            224, CAFFE_BGR | {"mean": KERAS_CAFFE_MEAN}, caffe_layers(prototxts / "vgg16_deploy.prototxt"),
            {"paper": vgg, "origin": "https://www.robots.ox.ac.uk/~vgg/research/very_deep/",
             "reference_files": published(KERAS_APPLICATIONS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5", "h5", "CC BY 4.0 (VGG)",
                                         md5="64373286793e3c8b2b4e3219cbf3544b")
             | published("http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/VGG_ILSVRC_16_layers.caffemodel", "caffemodel",
                         "CC BY 4.0 (VGG)"),
             "license": "CC BY 4.0 (VGG)"}),
        "vgg16_torchvision.json": spec(
            "vgg16", "torchvision", "torchvision.models.vgg16 (no batch norm).", 224, IMAGENET_TORCH, vgg16_torchvision(),
            {"paper": vgg, "origin": TORCHVISION, "reference_files": torch_hub("vgg16-397923af.pth", release="IMAGENET1K_V1"),
             "metrics": {"imagenet-1k": {"top1": 71.592, "top5": 90.382, "protocol": "torchvision IMAGENET1K_V1 meta"}},
             "license": "BSD-3-Clause (torchvision)"}),
        "resnet50_torchvision.json": spec(
            "resnet50", "torchvision", "torchvision.models.resnet50: ResNet-50 V1.5 (stride 2 in a block's 3x3 conv).",
            224, IMAGENET_TORCH, resnet50_torchvision(),
            {"paper": resnet, "origin": TORCHVISION,
             "reference_files": torch_hub("resnet50-0676ba61.pth", release="IMAGENET1K_V1")
             | torch_hub("resnet50-11ad3fa6.pth", release="IMAGENET1K_V2"),
             "metrics": {"imagenet-1k": {"top1": 76.13, "top5": 92.862, "protocol": "torchvision IMAGENET1K_V1 meta "
                                         "(IMAGENET1K_V2, resnet50-11ad3fa6.pth: 80.858 / 95.434 evaluated at resize 232)"}},
             "license": "BSD-3-Clause (torchvision)"}),
        "resnet50_keras.json": spec(
            "resnet50", "keras", "keras.applications.ResNet50: ResNet-50 V1 (stride 2 in a block's first 1x1), convs with "
            "bias; 'caffe' preprocessing.", 224, CAFFE_BGR | {"mean": KERAS_CAFFE_MEAN}, resnet50_keras(),
            {"paper": resnet, "origin": "https://github.com/keras-team/keras (keras.applications.resnet)",
             "reference_files": published(KERAS_APPLICATIONS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5", "h5",
                                         "MIT (Keras Applications weights)", md5="2cb95161c43110f7111970584f804107"),
             "metrics": {"imagenet-1k": {"top1": 74.9, "top5": 92.1, "protocol": "Keras Applications table"}},
             "license": "MIT (Keras Applications weights)"}),
        "resnet50_caffe.json": spec(
            "resnet50", "caffe", "He et al.'s ResNet-50 deploy net (Caffe): BatchNorm + Scale, bias-free convs, ceil pooling.",
            224, CAFFE_BGR | {"mean": [103.062623801, 115.902882574, 123.151630838]}, caffe_layers(prototxts / "resnet50_deploy.prototxt"),
            {"paper": resnet, "origin": "https://github.com/KaimingHe/deep-residual-networks",
             "reference_files": {"ResNet-50-model.caffemodel": {"hash": "unknown", "source": "caffemodel",  # no URL: a OneDrive share
                                                       "license": "MIT (deep-residual-networks)"}},
             "metrics": {"imagenet-1k": {"top1": 75.3, "top5": 92.2, "protocol": "deep-residual-networks README (10-crop error 24.7 / 7.8)"}},
             "license": "MIT (deep-residual-networks)"}),
    }
    out["googlenet_bvlc.json"]["extra_layers"] = ["loss1_*", "loss2_*"]  # the auxiliary classifiers of the published file
    out["resnet50_torchvision.json"]["default"] = True
    out["vgg16_torchvision.json"]["default"] = True
    out["googlenet_bvlc.json"]["default"] = True
    out["caffenet_bvlc.json"]["default"] = True
    return out


def dumps(spec: dict) -> str:
    """One layer per line: diffs of a spec read like diffs of a network."""
    head = json.dumps({k: v for k, v in spec.items() if k != "layers"}, indent=2)
    layers = ",\n".join(f"    {json.dumps(layer)}" for layer in spec["layers"])
    return head[:-2] + f',\n  "layers": [\n{layers}\n  ]\n}}\n'


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/caffe/published")
    for name, spec in specs(folder).items():
        (HERE / name).write_text(dumps(spec))
        print(f"wrote {HERE / name}")
