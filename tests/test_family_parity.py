"""zoo against the real frameworks, on weights those frameworks wrote, for each family.

A) BVLC Caffe 1.0: narrow variants of AlexNet, CaffeNet, VGG16, ResNet-50 and GoogLeNet
   (tests/data/caffe, see tests/references/README.md). The .caffemodel written by Caffe goes through
   the zoo-caffemodel plugin; the same blobs in caffe-tensorflow's .npy layout go through zoo's `caffe`
   source (every net without BatchNorm). Both are checked in Keras and in ONNX Runtime against Caffe's
   logits on Caffe's own `data` blob.
B) torchvision: full-size resnet50, vgg16 and alexnet state dicts (tests/seeded.py rebuilds them exactly,
   see tests/references/README_torchvision.md), saved with torch.save, converted without --spec, checked in
   Keras and ONNX Runtime against torchvision's logits; and zoo's eval preprocessing against torchvision's
   transforms on the same photos.

C) Readers of zoo's ONNX that are not zoo's own: OpenCV's DNN module and OpenVINO (CPU, f32 inference:
   its default on AVX-512 machines is bfloat16, 6e-3 off) run the same ONNX files for every family (the
   narrow Caffe nets from their .caffemodel, torchvision's resnet50 and alexnet at full size) against the
   same references.

Bound everywhere: max |zoo - reference| <= 1e-4 of the reference logits' largest magnitude, and the same
top-5 classes in the same order for every image. Each weights file is converted once per module.
"""

import contextlib
import gc
import io
import json
from collections import OrderedDict

import numpy as np
import pytest
from conftest import DATA, VGG16_FILES
from narrow import CAFFE_NETS, register_narrow_specs
from seeded import torchvision_state

CAFFE = DATA / "caffe"
TORCHVISION = DATA / "torchvision"
PHOTOS = DATA / "photos"

TORCH_NETS = ("resnet50", "vgg16", "alexnet")
RUNTIMES = ("keras", "onnx")
READERS = ("opencv", "openvino")  # other programs' ONNX readers
BOUND = 1e-4


def _marks(name):
    return [pytest.mark.slow] if name == "vgg16" else []


# --- helpers ----------------------------------------------------------------------------------------


def assert_parity(got, want, what, bound=BOUND):
    """max |got - want| <= bound * max |want| and the same top-5, in order, per image; returns the relative error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: logits of shape {got.shape}, reference {want.shape}"
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    err = diff / scale
    problems = []
    if not np.isfinite(got).all():
        problems.append(f"{int((~np.isfinite(got)).sum())} non-finite logits")
    if not err <= bound:
        problems.append(f"max |diff| {diff:.3e} is {err:.2e} of the reference's max |logit| {scale:.4f} (bound {bound:.0e})")
    top_got = np.argsort(-got, axis=1, kind="stable")[:, :5]
    top_want = np.argsort(-want, axis=1, kind="stable")[:, :5]
    for i in np.flatnonzero((top_got != top_want).any(axis=1)):
        ref = want[i, top_want[i]]
        closest = float(np.abs(np.diff(ref)).min()) / scale
        problems.append(f"image {i}: top-5 {top_got[i].tolist()}, reference {top_want[i].tolist()} (reference logits "
                        f"{np.round(ref, 6).tolist()}, closest adjacent pair {closest:.1e} of the scale; "
                        f"zoo's logits for the reference classes {np.round(got[i, top_want[i]], 6).tolist()})")
    print(f"\nparity {what}: max relative error {err:.2e} (max |diff| {diff:.2e}, scale {scale:.3f}), "
          f"top-5 {'identical' if not problems else 'DIFFERENT'}")
    assert not problems, f"{what}: " + "; ".join(problems)
    return err


def run_cli(*argv):
    """zoo's CLI in-process, usable from module-scoped fixtures (conftest's `cli` is per test): (code, out, err)."""
    from zoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def convert(source, path, out, *options):
    code, stdout, err = run_cli("convert", source, path, "-o", out, *options, "--json")
    assert code == 0, f"zoo convert {source} {path.name} {' '.join(options)} failed ({code}): {err}"
    return json.loads(stdout)


def keras_logits(weights, x):
    import keras

    import zoo

    model = zoo.create_model(None, weights=weights)
    try:
        return np.asarray(model.predict(x, batch_size=len(x), verbose=0))
    finally:
        del model
        keras.backend.clear_session()
        gc.collect()


def onnx_logits(weights, x, folder, runtime="onnx"):
    """Logits of zoo's ONNX for `weights` on `x` (NHWC, preprocessed) in ONNX Runtime, OpenCV or OpenVINO."""
    import onnx

    from zoo.backends.onnx import onnx_graph, write_onnx
    from zoo.export import open_source

    path = folder / "model.onnx"
    src = open_source(weights)
    model, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)
    write_onnx(path, model, inits)
    del src, model, inits
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return ONNX_READERS[runtime](str(path), x)
    finally:
        path.unlink(missing_ok=True)
        gc.collect()


def _onnxruntime(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    assert name == "image", f"ONNX input is {name!r}"
    return session.run(["logits"], {"image": x})[0]


def _opencv(path, x):
    import cv2

    net = cv2.dnn.readNetFromONNX(path)  # raises naming the node it cannot import
    net.setInput(x, "image")
    return net.forward("logits")


def _openvino(path, x):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.output("logits")]


ONNX_READERS = {"onnx": _onnxruntime, "opencv": _opencv, "openvino": _openvino}


def logits_in(runtime, weights, x, folder):
    return keras_logits(weights, x) if runtime == "keras" else onnx_logits(weights, x, folder, runtime)


# --- A) BVLC Caffe, narrow variants -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _narrow_specs():
    """After conftest's per-test plugin reset: the weights files name their spec, so it must be registered."""
    register_narrow_specs()


def caffe_tensorflow_npy(name, path, lists: bool = False):
    """The narrow net's .caffemodel as caffe-tensorflow's .npy (np.save of caffe_tensorflow_blobs); `lists`:
    as caffe-tensorflow wrote it before May 2016 (bvlc_alexnet.npy's form: [weights, biases] per layer, no
    batch norm support yet)."""
    shapes = json.loads((CAFFE / f"{name}_narrow_shapes.json").read_text())  # every blob's shape, as Caffe computed it
    blobs = caffe_tensorflow_blobs(CAFFE / f"{name}_narrow.caffemodel", CAFFE / f"{name}_narrow.prototxt", shapes)
    np.save(path, {k: [v["weights"], v["biases"]] for k, v in blobs.items()} if lists else blobs)
    return path


def caffe_tensorflow_blobs(caffemodel, prototxt, shapes: dict) -> dict:
    """The .caffemodel's blobs as caffe-tensorflow writes them (kaffe/transformers.py): '/' -> '_' in names,
    {"weights", "biases"} with HWIO convs, (in, out) fc and the rows of an fc on a spatial map in H,W,C order
    (Caffe's `shapes` of each blob, not zoo's); a BatchNorm as {"mean", "variance"} divided by its scale
    factor, with the Scale layer after it folded in as "scale" and "offset"."""
    from zoo_caffemodel.caffemodel import read_layers
    from zoo_caffemodel.prototxt import parse

    entries = {e.name: e for e in parse(prototxt.read_text()).layer}
    _, layers, _ = read_layers(memoryview(caffemodel.read_bytes()))
    out, batchnorm_of = {}, {}  # the BatchNorm whose output blob a Scale layer reads
    for layer in layers:
        if not layer.blobs:
            continue
        kind, entry = entries[layer.name].type, entries[layer.name]
        blobs = [np.array(blob, np.float32) for blob in layer.blobs]
        if kind == "BatchNorm":
            mean, variance, factor = blobs
            f = 0.0 if factor[0] == 0 else 1.0 / factor[0]
            out[layer.name] = {"mean": mean * f, "variance": variance * f}
            batchnorm_of[entry.top[0]] = layer.name
            continue
        if kind == "Scale":
            out[batchnorm_of[entry.bottom[0]]] |= {"scale": blobs[0], "offset": blobs[1]}
            continue
        w = blobs[0]
        if kind == "Convolution":
            w = w.transpose(2, 3, 1, 0)
        elif kind == "InnerProduct":
            bottom = shapes[entry.bottom[0]]
            if len(bottom) == 4:  # implicit flatten of an N,C,H,W map: rows C,H,W -> H,W,C
                _, c, h, wd = bottom
                w = w.reshape(-1, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, -1)
            else:
                w = w.T
        else:
            raise AssertionError(f"{caffemodel}: unexpected weighted layer {layer.name} ({kind})")
        out[layer.name.replace("/", "_")] = {"weights": np.ascontiguousarray(w)} | ({"biases": blobs[1]} if len(blobs) > 1 else {})
    return out


@pytest.fixture(scope="module")
def caffe_converted(module_folder):
    """(net, path) -> the converted weights, each converted once: path "caffemodel" (zoo-caffemodel plugin)
    or "npy" (caffe-tensorflow's layout, zoo's `caffe` source)."""
    done = {}

    def get(name, path):
        if (name, path) not in done:
            register_narrow_specs()
            folder = module_folder(f"caffe-{name}-{path}")
            spec = f"{name}-narrow@test"
            if path.startswith("caffemodel"):  # caffemodel-v1: the same blobs as old Caffe wrote them (tests/references/caffe_v1.py)
                file = f"{name}_narrow{path.removeprefix('caffemodel').replace('-', '_')}.caffemodel"
                result = convert("caffemodel", CAFFE / file, folder / "w.safetensors", "--spec", spec)
            else:
                npy = caffe_tensorflow_npy(name, folder / f"{name}_narrow.npy", lists=path == "npy-lists")
                result = convert("caffe", npy, folder / "w.safetensors", "--spec", spec)
                npy.unlink()
            assert result["spec"] == spec, result
            done[name, path] = folder / "w.safetensors"
        return done[name, path]

    return get


CAFFE_CASES = [pytest.param(name, path, runtime, id=f"{name}-{path}-{runtime}", marks=_marks(name))
               for name in CAFFE_NETS for path in ("caffemodel", "npy") + (("npy-lists",) if name != "resnet50" else ())
               + (("caffemodel-v1",) if name == "alexnet" else ()) for runtime in RUNTIMES]
CAFFE_CASES += [pytest.param(name, "caffemodel", reader, id=f"{name}-caffemodel-{reader}", marks=_marks(name))
                for name in CAFFE_NETS for reader in READERS]


@pytest.mark.parametrize("name, path, runtime", CAFFE_CASES)
def test_caffe_narrow_parity(name, path, runtime, caffe_converted, tmp_path):
    want = np.load(CAFFE / f"{name}_narrow{'_v1' if path == 'caffemodel-v1' else ''}_outputs.npz")["logits"]  # Caffe's own run
    size = 227 if name in ("alexnet", "caffenet") else 224
    x = np.ascontiguousarray(np.load(CAFFE / f"photos{size}.npy").transpose(0, 2, 3, 1))
    got = logits_in(runtime, caffe_converted(name, path), x, tmp_path)
    assert_parity(got, want, f"caffe {name}_narrow {path} {runtime}")


# --- B) torchvision, full size ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_converted(module_folder):
    """name -> (spec id zoo found, converted weights); the .pth is written by torch.save and removed after."""
    import torch

    done = {}

    def get(name):
        if name not in done:
            folder = module_folder(f"torch-{name}")
            pth = folder / f"{name}.pth"
            state = torchvision_state(name)
            torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()), pth)
            del state
            gc.collect()
            result = convert("torch", pth, folder / "w.safetensors")
            pth.unlink()
            for _, old in done.values():  # one full-size model on disk at a time
                old.unlink(missing_ok=True)
            done.clear()
            done[name] = result["spec"], folder / "w.safetensors"
        return done[name]

    return get


TORCH_CASES = [pytest.param(name, runtime, id=f"{name}-{runtime}", marks=VGG16_FILES if name == "vgg16" else ())
               for name in TORCH_NETS for runtime in RUNTIMES]
TORCH_CASES += [pytest.param(name, reader, id=f"{name}-{reader}") for name in ("resnet50", "alexnet") for reader in READERS]


@pytest.mark.parametrize("name, runtime", TORCH_CASES)
def test_torchvision_parity(name, runtime, torch_converted, tmp_path):
    spec, weights = torch_converted(name)
    assert spec == f"{name}@torchvision", f"the {name} state dict was matched to {spec}"
    want = np.load(TORCHVISION / f"{name}.npz")["logits"]
    x = np.ascontiguousarray(np.load(TORCHVISION / "input224.npy").transpose(0, 2, 3, 1))
    assert_parity(logits_in(runtime, weights, x, tmp_path), want, f"torchvision {name} {runtime}")


PHOTO_NAMES = sorted(p.stem for p in PHOTOS.glob("*.jpg"))


def test_photos_are_the_reference_batch():
    assert PHOTO_NAMES == ["astronaut", "chelsea", "coffee", "rocket"]  # input224.npy's order


@pytest.mark.parametrize("index, photo", list(enumerate(PHOTO_NAMES)))
@pytest.mark.parametrize("spec", [f"{name}@torchvision" for name in TORCH_NETS])
def test_eval_preprocessing_matches_torchvision(spec, index, photo):
    import zoo
    from zoo.preprocess import np_eval_image

    want = np.load(TORCHVISION / "input224.npy")[index].transpose(1, 2, 0)
    got = np_eval_image(PHOTOS / f"{photo}.jpg", zoo.get_spec(spec).input)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    print(f"\npreprocess {spec} {photo}: max |diff| {diff:.2e}")
    assert diff <= 1e-5, f"{photo}: zoo's eval preprocessing differs from torchvision's by up to {diff:.3e} (bound 1e-5)"
