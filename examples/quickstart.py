"""The main job end to end on the built-in example, through the zoo CLI as a user would run it:

1. convert Caffe weights (caffe-tensorflow's .npy), verify them and check them against real BVLC Caffe;
2. fine-tune AlexNet with a new 2-class head on the example images (circles and squares);
3. export to SavedModel and ONNX (both checked against the trained model) and predict images it never saw.

No pretrained weights can be downloaded here. Step 1 uses seeded random weights for which tests/data holds
real BVLC Caffe outputs. Step 2 starts from *seeded example weights* (zoo.example.example_weights:
structured seeded filters scaled on the example images), NOT from ImageNet training. With the real
bvlc_alexnet.npy, the same commands fine-tune pretrained AlexNet on your own --data.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from caffe_reference import caffe_input, caffe_tensorflow_layout, caffe_weights  # noqa: E402

OUT = ROOT / "example"
GOAL = 0.95  # validation accuracy the example's fine-tune must reach


def zoo(*args, capture=False):
    print("$ zoo", " ".join(map(str, args)), flush=True)
    done = subprocess.run([sys.executable, "-m", "zoo", *map(str, args)], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)  # progress and messages (stderr) still show
    return done.stdout


def check_against_caffe():
    """Step 1: the reference weights through convert and verify, then zoo's model against Caffe's logits."""
    npy = OUT / "seeded_alexnet.npy"
    print(f"writing {npy} (seeded random weights in caffe-tensorflow's layout, NOT pretrained)")
    np.save(npy, {k: [w, b] for k, (w, b) in caffe_tensorflow_layout(caffe_weights()).items()})
    zoo("convert", "caffe", npy, "-o", OUT / "seeded_alexnet.safetensors")
    zoo("verify", OUT / "seeded_alexnet.safetensors")

    import zoo as zoo_api

    logits = zoo_api.create_model("alexnet", weights=OUT / "seeded_alexnet.safetensors").predict(caffe_input(), verbose=0)
    ref = np.load(ROOT / "tests" / "data" / "caffe_alexnet_seed1234.npz")["fc8"]
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    same_top5 = bool((np.argsort(-logits, 1)[:, :5] == np.argsort(-ref, 1)[:, :5]).all())
    print(f"zoo's AlexNet vs real BVLC Caffe (fc8): max error {err:.2e} of the logits' scale, top-5 identical: {same_top5}")
    if err > 1e-4 or not same_top5:
        sys.exit("parity with Caffe FAILED")
    return err


def example_weights_file(data: Path) -> Path:
    """Step 2's starting point, written as caffe-tensorflow writes bvlc_alexnet.npy, then converted."""
    from zoo.example import example_weights
    from zoo.registry import get_spec

    spec = get_spec("alexnet@bvlc")
    print("making example weights: seeded filters scaled on the example images (zoo.example), NOT trained on ImageNet", flush=True)
    tensors = example_weights(spec, data)
    npy = OUT / "example_alexnet.npy"
    np.save(npy, {n.name: [tensors[f"{n.name}.kernel"], tensors[f"{n.name}.bias"]] for n in spec.weighted_nodes})
    zoo("convert", "caffe", npy, "--spec", "alexnet@bvlc", "-o", OUT / "example_alexnet.safetensors")
    return OUT / "example_alexnet.safetensors"


def main():
    start = time.perf_counter()
    from zoo.example import make_example

    for old in ("zoo-example-data", "held-out", "run"):
        shutil.rmtree(OUT / old, ignore_errors=True)
    data = make_example(OUT / "zoo-example-data", per_class=300)  # 480 for training, 120 for validation
    held_out = make_example(OUT / "held-out", per_class=50, seed=1)  # drawn with another seed: never trained on
    zoo("list")
    parity = check_against_caffe()
    weights = example_weights_file(data)

    # the seed tutorial's cut: fc7 and fc8 trained, a new 2-class head; no augmentation, so the frozen
    # conv1..fc6 output is computed once and cached, and 20 epochs take seconds
    run = OUT / "run"
    result = json.loads(zoo("finetune", "alexnet", "--head", "2", "--weights", weights, "--data", data, "--train", "fc7,fc8",
                            "--no-augment", "--optimizer", "adam", "--lr", "1e-4", "--epochs", "20", "--batch-size", "32",
                            "--out", run, "--json", capture=True))
    accuracy = result["best_val_accuracy"]
    print(f"fine-tuned: best validation accuracy {accuracy:.3f} (goal {GOAL})")
    zoo("export", run, "--format", "savedmodel,onnx")
    predictions = json.loads(zoo("predict", run / "exported" / "model.onnx", held_out, "--top", "1", "--json", capture=True))
    right = [Path(p["file"]).parent.name == p["top"][0][0] for p in predictions]
    for p in predictions[::25]:
        print(f"  {Path(p['file']).parent.name}/{Path(p['file']).name}: {p['top'][0][0]} {p['top'][0][1]:.3f}")
    held_out_accuracy = sum(right) / len(right)

    print(f"""
summary ({time.perf_counter() - start:.0f} s)
  converted and verified: {OUT / 'seeded_alexnet.safetensors'} (Caffe parity: max error {parity:.1e}),
                          {weights} (seeded example weights, NOT pretrained)
  trained:     fc7, fc8 and a new 2-class head on {data} (480 training, 120 validation images)
  validation:  best accuracy {accuracy:.3f} (goal {GOAL})
  held out:    {sum(right)}/{len(right)} right ({held_out_accuracy:.3f}) on {held_out}, images it never saw
  run folder:  {run}  (report: {result.get('report', run / 'report' / 'index.html')})
  exports:     {run / 'exported' / 'savedmodel'}, {run / 'exported' / 'model.onnx'}""")
    if accuracy < GOAL:
        sys.exit(f"the example's fine-tune reached {accuracy:.3f}, under its goal of {GOAL}")


if __name__ == "__main__":
    main()
