"""The Python snippets of docs/guide.md run as written, and every shape a snippet's comment states is the
shape of the model it builds: the documented API is the real one."""

import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

GUIDE = Path(__file__).parents[1] / "docs" / "guide.md"
SHAPE = re.compile(r"\(None(?:, \d+)*\)")


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


@pytest.fixture(scope="module")
def guide_folder(module_folder, seeded_npy, seeded_safetensors):
    """A folder holding what the snippets name: bvlc_alexnet.safetensors, and a store (ZOO_HOME) with
    alexnet@bvlc/bvlc_alexnet, resnet50@torchvision and resnet50@keras, each from a file its framework wrote."""
    import keras
    import torch
    from seeded import torchvision_state

    from zoo import store

    folder = module_folder("guide")
    (folder / "bvlc_alexnet.safetensors").symlink_to(seeded_safetensors)
    old = os.environ.get("ZOO_HOME")
    os.environ["ZOO_HOME"] = str(folder / "store")
    store.add(seeded_npy)
    torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in torchvision_state("resnet50").items()), folder / "resnet50.pth")
    keras.utils.set_random_seed(0)
    keras.applications.ResNet50(weights=None).save_weights(folder / "resnet50.weights.h5")
    for path in (folder / "resnet50.pth", folder / "resnet50.weights.h5"):
        store.add(path)
        path.unlink()  # the store holds its converted copy
    yield folder
    os.environ.pop("ZOO_HOME") if old is None else os.environ.__setitem__("ZOO_HOME", old)


@pytest.mark.parametrize("index", range(len(snippets())))
def test_guide_snippet_runs_and_its_shapes_hold(index, guide_folder, monkeypatch):
    import keras

    import zoo

    code = snippets()[index]
    monkeypatch.chdir(guide_folder)
    names = {"zoo": zoo, "np": np}
    exec(compile(code, f"docs/guide.md python block {index + 1}", "exec"), names)
    for line in code.splitlines():
        assigned = re.match(r"(\w+) = zoo\.create_model", line)
        stated = [eval(s) for s in SHAPE.findall(line.partition("#")[2])]
        if assigned and stated:
            model = names[assigned.group(1)]
            shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
            assert [tuple(s) for s in shapes] == stated, line
    keras.backend.clear_session()
