"""The main job end to end on the built-in example, using the zoo CLI as a user would:
convert Caffe weights, verify them, check them against real Caffe, fine-tune a 2-class AlexNet,
export it to SavedModel and ONNX (both checked), predict.

No pretrained weights can be downloaded here, so the example writes a caffe-tensorflow
`bvlc_alexnet.npy` holding the *seeded random* weights for which tests/data has real BVLC Caffe
outputs. Replace the .npy with the real bvlc_alexnet.npy and the same commands fine-tune pretrained
AlexNet (the built-in example data are drawn shapes; pass --data for your own images).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from caffe_reference import caffe_input, caffe_tensorflow_layout, caffe_weights  # noqa: E402

OUT = ROOT / "example"


def zoo(*args):
    print("$ zoo", " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], check=True)


def main():
    OUT.mkdir(exist_ok=True)
    npy = OUT / "seeded_alexnet.npy"
    print(f"writing {npy} (seeded random weights in caffe-tensorflow's layout, NOT pretrained)")
    np.save(npy, {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
    zoo("list")
    zoo("convert", "caffe", npy, "-o", OUT / "seeded_alexnet.safetensors")
    zoo("verify", OUT / "seeded_alexnet.safetensors")

    import zoo as zoo_api

    model = zoo_api.create_model("alexnet", weights=OUT / "seeded_alexnet.safetensors")
    logits = model.predict(caffe_input(), verbose=0)
    ref = np.load(ROOT / "tests" / "data" / "caffe_alexnet_seed1234.npz")["fc8"]
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    same_top5 = (np.argsort(-logits, 1)[:, :5] == np.argsort(-ref, 1)[:, :5]).all()
    print(f"TensorFlow vs real BVLC Caffe fc8: max error {err:.2e} of the logits' scale, top-5 identical: {same_top5}")
    if err > 1e-4 or not same_top5:
        sys.exit("parity with Caffe FAILED")

    # the seed tutorial's setting: train fc7 and fc8, a new 2-class head; no augmentation, so the frozen
    # conv1..fc6 output is computed once and cached
    print("fine-tuning on top of the SEEDED RANDOM conv1..fc6: expect chance-level accuracy here; with the real\n"
          "bvlc_alexnet.npy the same command trains on pretrained features", flush=True)
    run = OUT / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    zoo("finetune", "alexnet", "--head", "2", "--weights", OUT / "seeded_alexnet.safetensors", "--train", "fc7,fc8",
        "--no-augment", "--epochs", "5", "--batch-size", "32", "--out", run)
    # export both formats (each checked against the Keras model), then predict with the ONNX file
    zoo("export", run, "--format", "savedmodel,onnx")
    examples = OUT / "zoo-example-data"
    zoo("predict", run / "exported" / "model.onnx", examples / "circle" / "circle_000.jpg", examples / "square" / "square_000.jpg",
        "--top", "2")


if __name__ == "__main__":
    main()
