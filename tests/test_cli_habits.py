"""What users expect of a command-line tool: versions, examples in --help, shell completion, progress on
long work (stderr, never stdout), and the example weights the demo fine-tunes from."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from zoo import progress
from zoo.cli import build_parser


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_version_names_zoo_its_libraries_and_plugins(cli):
    code, out, _ = cli("--version")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names[:8] == ["zoo", "python", "tensorflow", "keras", "onnx", "onnxruntime", "numpy", "safetensors"]
    assert "not installed" not in out and "plugin caffemodel: zoo-caffemodel" in out  # the external plugin of this repo


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_help_has_an_example(name):
    text = _subcommands()[name].format_help()
    example = text.split("example: ", 1)[1]
    assert example.startswith("zoo ") or example.startswith('eval "$(zoo '), text


def _complete(line: str) -> list[str]:
    """What bash would get from argcomplete for `line` (the hook writes to file descriptor 8)."""
    env = dict(os.environ, COMP_LINE=line, COMP_POINT=str(len(line)), _ARGCOMPLETE="1", _ARGCOMPLETE_IFS="\n")
    p = subprocess.run(["bash", "-c", f"{sys.executable} -m zoo 8>&1 9>/dev/null"], env=env, capture_output=True, text=True, timeout=120)
    return [c.strip() for c in p.stdout.split("\n")]


def test_completion_scripts_and_completions_of_commands_and_model_names():
    for shell in ("bash", "zsh", "fish"):
        p = subprocess.run([sys.executable, "-m", "zoo", "completion", shell], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "zoo" in p.stdout and len(p.stdout) > 200, shell
    assert "finetune" in _complete("zoo fin")
    assert set(_complete("zoo info resnet50@")) == {"resnet50@caffe", "resnet50@keras", "resnet50@torchvision"}
    assert "googlenet@bvlc" in _complete("zoo finetune goo")
    assert "caffemodel" in _complete("zoo convert caffe")


def test_progress_is_quiet_for_short_work_and_plain_lines_off_a_terminal(capsys, monkeypatch):
    with progress.bar(10, "quick", "img") as b:
        b.update(10)
    assert capsys.readouterr() == ("", "")  # under a second's work: nothing, not even tqdm's import
    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    with progress.bar(6, "slow", "img") as b:
        for _ in range(6):
            time.sleep(0.03)
            b.update()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and "\r" not in err and len(lines) >= 2  # one line per redraw, never on stdout
    assert lines[-1].startswith("slow: 100%") and "6/6" in lines[-1]


def test_finetune_json_is_the_whole_stdout(cli, tmp_path, narrow_spec, example_data, monkeypatch):
    import json

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a plain progress line from the first update: the frozen-feature pass's
    code, out, err = cli("finetune", narrow_spec.id, "--weights", "random", "--data", example_data, "--head", "2", "--train", "fc8",
                         "--epochs", "1", "--batch-size", "8", "--no-augment", "--out", tmp_path / "run", "--json")
    assert code == 0, err
    assert json.loads(out)["trained_layers"] == ["fc8"]  # progress and messages went to stderr
    assert "epoch 1/1" in err and "zoo: fine-tuning" in err
    for images, n in (("training", 64), ("validation", 16)):  # the frozen conv1..fc7 pass, run once before training
        assert f"frozen layers, {images} images: 100%" in err and f" {n}/{n} " in err, err
    code, out, _ = cli("verify", tmp_path / "run" / "weights.safetensors")
    assert code == 0 and out.rstrip().endswith(f"fine-tuned from {narrow_spec.id} for circle, square")
    code, out, _ = cli("verify", tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert code == 0 and "for circle, square (epoch 1, validation accuracy" in out


def test_example_weights_keep_every_layer_at_unit_scale(narrow_spec, example_data):
    """LSUV on the example images: each weighted layer's output before its ReLU is centred per channel with
    unit spread on the images it was scaled on (plain seeded weights of the same kind shrink ~0.7x a layer)."""
    import keras

    from zoo.backends.keras import build_model
    from zoo.example import example_weights
    from zoo.preprocess import np_eval_image

    files = sorted(p for p in example_data.rglob("*") if p.suffix in (".png", ".jpg"))
    model = build_model(narrow_spec, example_weights(narrow_spec, example_data, images=len(files)))
    x = np.stack([np_eval_image(f, narrow_spec.input) for f in files])
    for node in narrow_spec.weighted_nodes:
        layer = model.get_layer(node.name)
        activation, layer.activation = layer.activation, keras.activations.linear
        y = np.asarray(keras.Model(model.input, layer.output)(x, training=False)).reshape(-1, layer.bias.shape[0])
        layer.activation = activation
        assert abs(y.std() - 1) < 1e-3 and np.abs(y.mean(0)).max() < 1e-3, (node.name, y.std(), np.abs(y.mean(0)).max())
