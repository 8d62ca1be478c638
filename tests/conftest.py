import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
DATA = TESTS / "data"
sys.path.insert(0, str(TESTS))  # test helpers (caffe_reference, py2pickle) import by name

from caffe_reference import caffe_tensorflow_layout, caffe_weights  # noqa: E402

from zoo.cli import main  # noqa: E402
from zoo.plugins import reset_plugins  # noqa: E402

# Full-size VGG16 files are 553 MB each. Tests that write them run one after another on one xdist worker
# (`--dist loadgroup`, Makefile), so two modules never hold theirs at once: together they filled CI's disk.
VGG16_FILES = (pytest.mark.slow, pytest.mark.xdist_group("vgg16-files"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Under --dist loadgroup, xdist gives a grouped test's id its group (`...@vgg16-files`). A pytest with which it
    cannot (9.2 with pytest-xdist 3.8: pytest-xdist#1386) spreads the group over the workers silently: fail first."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail("--dist loadgroup does not group with this pytest and pytest-xdist (pytest-xdist#1386)", pytrace=False)


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Each test sees plugins loaded afresh (tests register extra ones)."""
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def cli(capsys):
    """Run the zoo CLI in-process: returns (exit code, stdout, stderr)."""

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory):
    """mktemp for module-scoped fixtures; what it made is removed when the module ends, as pytest's
    retention policy does for tmp_path: full-size weights left for the session filled CI's disk."""
    made = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def seeded_layers():
    """The Caffe reference AlexNet's weights in caffe-tensorflow's layout: {layer: (W, b)}."""
    return caffe_tensorflow_layout(caffe_weights())


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The file `name`, written by `make(path)` in the first xdist worker to ask; the others wait for it and
    read the same file: one copy on disk, not one a worker (the full-size AlexNet files are 244 MB each)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    folder.mkdir(exist_ok=True)
    path = folder / name
    with FileLock(folder / f"{name}.lock"):
        if not path.exists():
            part = folder / f"part-{name}"  # renamed when whole: a failed `make` leaves no file to share
            make(part)
            part.replace(path)
    return path


@pytest.fixture(scope="session")
def seeded_npy(tmp_path_factory, seeded_layers):
    """A full-size bvlc_alexnet.npy as newer caffe-tensorflow writes it (np.save of a dict of dicts)."""
    def write(path):
        with open(path, "wb") as f:
            np.save(f, {k: {"weights": w, "biases": b} for k, (w, b) in seeded_layers.items()})

    return made_once(tmp_path_factory, "bvlc_alexnet.npy", write)


@pytest.fixture(scope="session")
def seeded_safetensors(tmp_path_factory, seeded_npy):
    from zoo.conversion import convert

    return made_once(tmp_path_factory, "bvlc_alexnet.safetensors",
                     lambda path: convert(seeded_npy, output=path, source="caffe", sha256=True))


def small_layers(rng=None):
    """A tiny caffe-tensorflow-style dict that fits the registered `tiny@test` spec (see test plugins)."""
    rng = rng or np.random.default_rng(0)
    return {
        "conv1": [rng.normal(size=(3, 3, 3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
        "fc2": [rng.normal(size=(4 * 4 * 4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)],
    }


TINY_SPEC = {
    "family": "tiny",
    "version": "test",
    "default": True,
    "input": {"size": [9, 9], "channels": 3, "channel_order": "RGB", "value_range": [0, 1],
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "layers": [
        {"name": "conv1", "kind": "conv", "filters": 4, "kernel": 3, "stride": 1, "pad": 0, "activation": "relu"},
        {"name": "pool1", "kind": "maxpool", "size": 2, "stride": 1},
        {"name": "pool2", "kind": "maxpool", "size": 3, "stride": 1},
        {"name": "flatten", "kind": "flatten"},
        {"name": "fc2", "kind": "dense", "units": 3},
    ],
    "head": "fc2",
    "num_classes": 3,
}


class TinySpecPlugin:
    """A third-party-style plugin contributing one small spec through the public hook."""

    from zoo.hookspecs import hookimpl

    @hookimpl
    def zoo_model_specs(self):
        return [TINY_SPEC]


@pytest.fixture
def tiny_spec():
    from zoo.plugins import get_plugins
    from zoo.registry import get_spec

    get_plugins().register(TinySpecPlugin(), name="tiny-specs")
    return get_spec("tiny@test")


NARROW_SPEC = {
    "family": "narrow",
    "version": "test",
    "default": True,
    "description": "An AlexNet-shaped test network: LRN, a grouped conv, dropout, fc6-fc8; small enough for CPU tests.",
    "input": {"size": [32, 32], "channels": 3, "channel_order": "BGR", "value_range": [0, 255],
              "mean": [104.0, 117.0, 123.0], "std": [64.0, 64.0, 64.0], "resize": 36},
    "layers": [
        {"name": "conv1", "kind": "conv", "filters": 8, "kernel": 5, "stride": 2, "pad": 0, "groups": 1, "activation": "relu"},
        {"name": "norm1", "kind": "lrn", "size": 5, "alpha": 0.0001, "beta": 0.75, "k": 1.0},
        {"name": "pool1", "kind": "maxpool", "size": 2, "stride": 2},
        {"name": "conv2", "kind": "conv", "filters": 16, "kernel": 3, "stride": 1, "pad": 1, "groups": 2, "activation": "relu"},
        {"name": "pool2", "kind": "maxpool", "size": 3, "stride": 2},
        {"name": "flatten", "kind": "flatten"},
        {"name": "fc6", "kind": "dense", "units": 32, "activation": "relu"},
        {"name": "drop6", "kind": "dropout", "rate": 0.5},
        {"name": "fc7", "kind": "dense", "units": 32, "activation": "relu"},
        {"name": "drop7", "kind": "dropout", "rate": 0.5},
        {"name": "fc8", "kind": "dense", "units": 10},
    ],
    "head": "fc8",
    "num_classes": 10,
}


# dropout draws different masks on each replica of a distributed run: this version compares the arithmetic
NARROW_NO_DROPOUT = dict(NARROW_SPEC, version="nodropout", default=False,
                         layers=[layer for layer in NARROW_SPEC["layers"] if layer["kind"] != "dropout"])


class NarrowSpecPlugin:
    from zoo.hookspecs import hookimpl

    @hookimpl
    def zoo_model_specs(self):
        return [NARROW_SPEC, NARROW_NO_DROPOUT]


@pytest.fixture
def narrow_spec():
    from zoo.plugins import get_plugins
    from zoo.registry import get_spec

    get_plugins().register(NarrowSpecPlugin(), name="narrow-specs")
    return get_spec("narrow@test")


@pytest.fixture(scope="session")
def example_data(tmp_path_factory):
    from zoo.example import make_example

    return make_example(tmp_path_factory.mktemp("example"), per_class=40, size=48)


def mutations(data: bytes, n: int, seed: int):
    """`n` damaged copies of `data`: flipped bytes, truncations, duplicated slices, 0x7fffffff length fields."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 1:
            del b[rng.randrange(len(b)):]
        elif kind == 2:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 64)]
        else:
            i = rng.randrange(len(b))
            b[i:i + 4] = b"\xff\xff\xff\x7f"
        yield bytes(b)


def fuzz_convert(folder, valid: bytes, suffix: str, source: str, n: int, seed: int) -> int:
    """Convert `n` mutations of a valid file: each must give a result or a ZooError. Returns the errors."""
    from zoo.conversion import convert
    from zoo.errors import ZooError

    errors = 0
    path = folder / f"mutated{suffix}"
    for data in mutations(valid, n, seed):
        path.write_bytes(data)
        try:
            convert(path, source=source, output=folder / "mutated.safetensors")
        except ZooError:
            errors += 1
    return errors


def scale_error(got, want) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="session")
def narrow_run(tmp_path_factory, example_data):
    """A narrow model fine-tuned on the example images (run folder), made once for the export tests."""
    from zoo.finetune import finetune
    from zoo.plugins import get_plugins

    get_plugins().register(NarrowSpecPlugin(), name="narrow-specs")
    out = tmp_path_factory.mktemp("run") / "run"
    finetune(model="narrow", data=str(example_data), epochs=2, batch_size=32, lr=0.003, optimizer="adam", out=str(out))
    return out
