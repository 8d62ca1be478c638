"""The full-size Caffe networks against real BVLC Caffe: the recorded run behind docs/performance.md.

The test suite checks narrow variants of each Caffe net (tests/data/caffe); this script checks the published
networks at full width, on caffemodels that real Caffe wrote with seeded weights and on its outputs for
four photos, made by tests/references/caffe_reference.py (see tests/references/README.md) into
FOLDER/<net>/<net>.caffemodel and <net>_outputs.npz. For each net and path (the .caffemodel through the
zoo-caffemodel plugin; caffe-tensorflow's .npy, made from the caffemodel's blobs as caffe-tensorflow
writes it) it converts with `zoo convert`, then compares zoo's Keras model and zoo's ONNX in ONNX Runtime
with Caffe's logits.

    python benchmarks/full_size_parity.py /work/refs/caffe-full [--nets alexnet,caffenet,vgg16,resnet50,googlenet]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SPECS = {"alexnet": "alexnet@bvlc", "caffenet": "caffenet@bvlc", "vgg16": "vgg16@caffe", "resnet50": "resnet50@caffe",
         "googlenet": "googlenet@bvlc"}


def npy_from_caffemodel(caffemodel: Path, shapes: dict, prototxt: Path, out: Path) -> Path:
    """caffe-tensorflow's layout of the caffemodel's blobs (tests/test_family_parity.py's rule, at full size)."""
    from test_family_parity import caffe_tensorflow_blobs

    np.save(out, caffe_tensorflow_blobs(caffemodel, prototxt, shapes))
    return out


def relative(got, want) -> tuple[float, bool]:
    err = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    top5 = np.array_equal(np.argsort(-got, 1)[:, :5], np.argsort(-want, 1)[:, :5])
    return err, top5


def check(name: str, folder: Path, work: Path) -> list[dict]:
    import keras

    import zoo
    from zoo.backends.onnx import onnx_graph, write_onnx
    from zoo.export import open_source

    ref = np.load(folder / f"{name}_outputs.npz")
    x, want = np.ascontiguousarray(ref["data"].transpose(0, 2, 3, 1)), ref["logits"]
    shapes = json.loads((folder / f"{name}_shapes.json").read_text())
    prototxt = ROOT / "tests" / "data" / "caffe" / "published" / PUBLISHED[name]
    rows = []
    for path in ("caffemodel", "npy"):
        source = folder / f"{name}.caffemodel"
        if path == "npy":
            source = npy_from_caffemodel(source, shapes, prototxt, work / f"{name}.npy")
        t = time.perf_counter()
        result = zoo.convert(source, source="caffemodel" if path == "caffemodel" else "caffe", output=work / "w.safetensors",
                             spec=SPECS[name])
        seconds = time.perf_counter() - t
        model = zoo.create_model(None, weights=result.output)
        keras_err, keras_top5 = relative(model.predict(x, verbose=0), want)
        del model
        keras.backend.clear_session()
        import onnxruntime as ort

        src = open_source(result.output)
        graph, inits = onnx_graph(src.spec, src.weights.tensors, src.classes)
        write_onnx(work / "m.onnx", graph, inits)
        session = ort.InferenceSession(str(work / "m.onnx"), providers=["CPUExecutionProvider"])
        onnx_err, onnx_top5 = relative(session.run(["logits"], {"image": x})[0], want)
        del session, src
        rows.append({"net": name, "spec": SPECS[name], "path": path, "convert_s": round(seconds, 2), "keras_rel_err": keras_err,
                     "keras_top5": keras_top5, "onnx_rel_err": onnx_err, "onnx_top5": onnx_top5})
        print(json.dumps(rows[-1]), flush=True)
        if path == "npy":
            source.unlink()
        (work / "m.onnx").unlink()
        (work / "w.safetensors").unlink()
    return rows


PUBLISHED = {"alexnet": "bvlc_alexnet_deploy.prototxt", "caffenet": "bvlc_reference_caffenet_deploy.prototxt",
             "vgg16": "vgg16_deploy.prototxt", "resnet50": "resnet50_deploy.prototxt", "googlenet": "bvlc_googlenet_deploy.prototxt"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--nets", default=",".join(SPECS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            rows += check(name, args.folder / name, Path(tmp))
    print("\n| spec | source | convert s | Keras max rel. error | top-5 | ONNX Runtime max rel. error | top-5 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['path']} | {r['convert_s']} | {r['keras_rel_err']:.1e} | {'same' if r['keras_top5'] else 'DIFFERENT'} "
              f"| {r['onnx_rel_err']:.1e} | {'same' if r['onnx_top5'] else 'DIFFERENT'} |")
    return 0 if all(r["keras_rel_err"] <= 1e-4 and r["onnx_rel_err"] <= 1e-4 and r["keras_top5"] and r["onnx_top5"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
