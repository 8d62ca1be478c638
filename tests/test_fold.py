"""zoo.fold: batch norms and Scale layers folded into the convs before them compute what the unfolded graph
computes, and only where that is possible (no activation between, one consumer, not an output)."""

import numpy as np
import pytest

from zoo.features import select
from zoo.fold import fold
from zoo.spec import ModelSpec

INPUT = {"size": [12, 12], "channels": 3, "channel_order": "RGB", "value_range": [0, 1], "mean": [0.5] * 3, "std": [0.25] * 3}
LAYERS = [
    {"name": "c1", "kind": "conv", "filters": 6, "kernel": 3, "pad": 1, "bias": False},
    {"name": "bn1", "kind": "batchnorm", "epsilon": 1e-5, "scale": False, "center": False},
    {"name": "s1", "kind": "scale"},  # Caffe's pair: both go into c1
    {"name": "r1", "kind": "relu"},
    {"name": "c2", "kind": "conv", "filters": 6, "kernel": 1, "activation": "relu"},
    {"name": "bn2", "kind": "batchnorm"},  # after c2's ReLU: stays
    {"name": "c3", "kind": "conv", "filters": 6, "kernel": 1, "inputs": "r1"},
    {"name": "bn3", "kind": "batchnorm"},  # c3 also feeds the add: stays
    {"name": "add", "kind": "add", "inputs": ["bn2", "bn3", "c3"]},
    {"name": "r2", "kind": "relu"},
    {"name": "bn4", "kind": "batchnorm", "scale": False},  # after a ReLU: stays, and takes the Scale after it
    {"name": "s4", "kind": "scale", "bias": False},
    {"name": "pool", "kind": "global_avgpool"},
    {"name": "fc", "kind": "dense", "units": 5},
]
SPEC = ModelSpec.from_dict({"family": "folding", "version": "test", "input": INPUT, "layers": LAYERS, "head": "fc", "num_classes": 5},
                           origin="test")


def tensors(spec, seed):
    """Random weights with batch-norm statistics and scales well away from 0 and 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.tensors.values():
        positive = t.param in ("moving_variance", "gamma")
        a = rng.uniform(0.3, 2.0, t.shape) if positive else rng.standard_normal(t.shape) * (0.5 if t.param != "kernel" else 1)
        out[t.name] = a.astype(np.float32)
    return out


def forward(part, weights, x):
    from zoo.backends.keras import build_model

    return build_model(part.spec, weights, part=part).predict(x, verbose=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_folded_graph_computes_the_same_and_folds_only_where_it_may(seed):
    part, weights = select(SPEC), tensors(SPEC, seed)
    folded, folded_weights = fold(part, weights)
    assert [n.name for n in folded.nodes] == ["c1", "r1", "c2", "bn2", "c3", "bn3", "add", "r2", "bn4", "pool", "fc"]
    assert folded.nodes[0].config["bias"] and set(folded_weights) == {t.name for n in folded.nodes for t in n.tensors}
    bn4 = next(n for n in folded.nodes if n.name == "bn4")
    assert (bn4.config["scale"], bn4.config["center"]) == (True, True)
    x = np.random.default_rng(seed + 10).standard_normal((3, 12, 12, 3)).astype(np.float32)
    want, got = forward(part, weights, x), forward(folded, folded_weights, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_outputs_and_missing_weights_are_not_folded():
    weights = tensors(SPEC, 2)
    part = select(SPEC, outputs=["bn1"])
    assert [n.name for n in fold(part, weights)[0].nodes] == ["c1", "bn1"]  # an output keeps its layer
    del weights["s1.gamma"]
    names = [n.name for n in fold(select(SPEC), weights)[0].nodes]
    assert names[:3] == ["c1", "s1", "r1"]  # bn1 went into c1; s1 has no weights to fold


def test_create_model_folded_has_no_batch_norms_and_the_same_logits(tmp_path):
    import zoo
    from zoo.backends.keras import create_model
    from zoo.bench import seeded_tensors
    from zoo.weights import save_weights

    spec = zoo.get_spec("resnet50@torchvision")
    weights = seeded_tensors(spec)
    rng = np.random.default_rng(4)
    for name in weights:  # statistics off 0/1, so that a wrong fold shows
        if name.endswith(("moving_mean", "beta")):
            weights[name] = (rng.standard_normal(weights[name].shape) * 0.1).astype(np.float32)
        if name.endswith(("moving_variance", "gamma")):
            weights[name] = rng.uniform(0.5, 1.5, weights[name].shape).astype(np.float32)
    path = save_weights(tmp_path / "w.safetensors", spec, weights)
    plain = create_model("resnet50@torchvision", weights=path, input_size=(64, 64))
    folded = create_model("resnet50@torchvision", weights=path, input_size=(64, 64), folded=True)
    assert not [la for la in folded.layers if "bn" in la.name or "downsample.1" in la.name]
    assert len(folded.layers) < len(plain.layers) - 50
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    want, got = plain.predict(x, verbose=0), folded.predict(x, verbose=0)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (np.argsort(-want)[:, :5] == np.argsort(-got)[:, :5]).all()
