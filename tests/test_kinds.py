"""Every layer kind (zoo.layers.KINDS) on its edge cases, three ways: zoo's Keras model, zoo's ONNX graph in
ONNX Runtime, and an independent reference written here with torch (float64; numpy by hand where torch has
no such op). Plus each weighted kind's import from every foreign parameter convention (zoo.sources.fit_params).

Each case is a small body of layers on a seeded random input; the spec gets a flatten + dense head (a dense
head alone after a flat body), so ORT's logits see every value of the body's output, and the Keras model is
compared layer by layer. The shape inference (Node.output_shape) is checked against torch's shapes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from zoo.graph import infer  # noqa: E402
from zoo.layers import KINDS  # noqa: E402
from zoo.layouts import Deferred  # noqa: E402
from zoo.spec import ModelSpec  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6  # max |diff| <= RTOL * max |reference| + ATOL


class Case(NamedTuple):
    id: str
    input: tuple[int, int, int]  # H, W, C
    layers: list[dict]
    scale: float = 1.0  # of the random input (LRN needs large values for its normalisation to matter)


def L(kind, name=None, **cfg):
    return {"kind": kind, **({"name": name} if name else {}), **cfg}


def conv(**cfg):
    return L("conv", **cfg)


POOLS = [  # (id, input H, W, config): the same geometry for max and average pooling
    ("floor", (9, 11), dict(size=3, stride=2)),
    ("floor-pad1", (9, 11), dict(size=3, stride=2, pad=1)),
    ("ceil-nopad-partial", (10, 12), dict(size=3, stride=2, rounding="ceil")),  # ceil adds a window past the end
    ("ceil-pad1-partial", (6, 10), dict(size=3, stride=2, pad=1, rounding="ceil")),  # 6 -> 4 (floor 3): last window = last cell, pad, one past
    ("ceil-pad1-drop", (8, 9), dict(size=[3, 2], stride=[3, 2], pad=1, rounding="ceil")),  # torch's drop rule, both axes
    ("ceil-pad1-drop-h-partial-w", (11, 9), dict(size=3, stride=3, pad=1, rounding="ceil")),  # H: dropped, W: 4 (floor 3)
    ("ceil-stride>window", (7, 9), dict(size=2, stride=4, rounding="ceil")),  # H: window starting past the input dropped
    ("same-stride2-even", (10, 12), dict(size=3, stride=2, pad="same")),  # TF: pad (0, 1)
    ("same-stride1-size23", (9, 11), dict(size=[2, 3], stride=1, pad="same")),
    ("asym-pad", (9, 11), dict(size=3, stride=2, pad=[0, 1, 2, 1])),
]

CASES = [
    Case("conv-basic", (9, 11, 4), [conv(filters=8, kernel=3)]),
    Case("conv-groups2-pad-int", (9, 11, 4), [conv(filters=6, kernel=3, pad=1, groups=2)]),
    Case("conv-groups4-kernel35-pad-hw", (9, 11, 8), [conv(filters=8, kernel=[3, 5], pad=[1, 2], groups=4)]),
    Case("conv-nobias-stride2-pad1", (9, 11, 4), [conv(filters=5, kernel=3, stride=2, pad=1, bias=False)]),
    Case("conv-asym-pad-kernel35", (9, 11, 4), [conv(filters=6, kernel=[3, 5], pad=[0, 1, 2, 3])]),
    Case("conv-same-stride2-even", (10, 12, 4), [conv(filters=6, kernel=3, stride=2, pad="same")]),
    Case("conv-same-stride2-even-kernel35", (10, 12, 4), [conv(filters=6, kernel=[3, 5], stride=2, pad="same")]),
    Case("conv-same-stride1-kernel35", (9, 11, 4), [conv(filters=6, kernel=[3, 5], pad="same")]),
    Case("conv-relu-groups2-stride21", (9, 11, 4), [conv(filters=6, kernel=3, stride=[2, 1], groups=2, activation="relu")]),
    Case("conv-1x1-groups4-nobias-relu", (9, 11, 8), [conv(filters=4, kernel=1, groups=4, bias=False, activation="relu")]),
    *[Case(f"{kind}-{pid}", (*hw, 5), [L(kind, **cfg)]) for kind in ("maxpool", "avgpool") for pid, hw, cfg in POOLS],
    *[Case(f"batchnorm-scale{int(s)}-center{int(c)}", (9, 11, 6), [L("batchnorm", epsilon=1e-5, scale=s, center=c)])
      for s in (True, False) for c in (True, False)],
    Case("batchnorm-default-eps", (9, 11, 6), [L("batchnorm")]),
    Case("scale-bias", (9, 11, 6), [L("scale")]),
    Case("scale-nobias", (9, 11, 6), [L("scale", bias=False)]),
    Case("lrn-k1", (9, 11, 8), [L("lrn", size=5, alpha=1e-4, beta=0.75)], scale=100.0),
    Case("lrn-k2", (9, 11, 8), [L("lrn", size=5, alpha=1e-4, beta=0.75, k=2.0)], scale=100.0),
    Case("lrn-size3-few-channels", (9, 11, 4), [L("lrn", size=3, alpha=1e-2, beta=0.5)], scale=10.0),
    Case("relu", (9, 11, 4), [L("relu")]),
    Case("add-2", (9, 11, 4), [conv(name="a", filters=4, kernel=3, pad=1, inputs="input"), L("add", inputs=["input", "a"])]),
    Case("add-3", (9, 11, 4), [conv(name="a", filters=6, kernel=3, pad=1, inputs="input"), conv(name="b", filters=6, kernel=1, inputs="input"),
                               conv(name="c", filters=6, kernel=3, pad="same", inputs="input"), L("add", inputs=["a", "b", "c"])]),
    Case("concat-2", (9, 11, 4), [conv(name="a", filters=3, kernel=1, inputs="input"), L("concat", inputs=["input", "a"])]),
    Case("concat-3", (9, 11, 4), [conv(name="a", filters=2, kernel=1, inputs="input"), conv(name="b", filters=5, kernel=3, pad=1, inputs="input"),
                                  L("maxpool", name="p", size=3, stride=1, pad=1, inputs="input"), L("concat", inputs=["a", "b", "p"])]),
    Case("flatten-dropout-dense", (3, 4, 5), [L("flatten"), L("dropout", rate=0.5), L("dense", units=7, activation="relu")]),
    Case("dense-nobias", (9, 11, 4), [L("global_avgpool"), L("dense", units=6, bias=False)]),
    Case("dropout-spatial", (9, 11, 4), [L("dropout", rate=0.3)]),
    Case("global_avgpool", (9, 11, 6), [L("global_avgpool")]),
    *[Case(f"adaptive_avgpool-{o}-on-4x4", (4, 4, 5), [L("adaptive_avgpool", output=o)]) for o in (1, 2, 4)],
    Case("adaptive_avgpool-2-on-8x6", (8, 6, 5), [L("adaptive_avgpool", output=2)]),
    Case("softmax-flat", (3, 4, 5), [L("flatten"), L("dense", units=6), L("softmax")]),
    Case("softmax-spatial", (9, 11, 4), [L("softmax")]),
]


def make_spec(case: Case) -> ModelSpec:
    layers = [dict(layer, name=layer.get("name", f"{layer['kind']}{i}")) for i, layer in enumerate(case.layers)]
    flat = len(infer(layers, case.input, case.id)[-1].output_shape) == 1
    head = ([] if flat else [{"name": "flat_head", "kind": "flatten"}]) + [{"name": "head", "kind": "dense", "units": 3}]
    return ModelSpec.from_dict(_spec_dict(case.input, layers + head))


def _spec_dict(shape, layers):
    h, w, c = shape
    return {"family": "k", "version": "test", "input": {"size": [h, w], "channels": c, "channel_order": "RGB", "value_range": [0, 1],
                                                        "mean": [0] * c, "std": [1] * c}, "layers": layers, "head": "head", "num_classes": 3}


def random_weights(spec: ModelSpec, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.uniform(0.5, 2.0, t.shape) if t.param == "moving_variance" else rng.standard_normal(t.shape)).astype(np.float32)
            for k, t in spec.tensors.items()}


# --- the torch reference -------------------------------------------------------------------------------


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _pads(pad, k, s, hw):
    """(top, left, bottom, right), written from the docs (TF's "same": the odd pixel at the end)."""
    if pad == "same":
        total = [max((-(-n // st) - 1) * st + kk - n, 0) for n, st, kk in zip(hw, s, k)]
        return total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2
    if isinstance(pad, list) and len(pad) == 4:
        return tuple(pad)
    ph, pw = _pair(pad)
    return ph, pw, ph, pw


def _conv(c, x, p):
    k, s = _pair(c["kernel"]), _pair(c["stride"])
    t, left, b, r = _pads(c["pad"], k, s, x[0].shape[2:])
    y = F.conv2d(F.pad(x[0], (left, r, t, b)), p("kernel").permute(3, 2, 0, 1), p("bias"), stride=s, groups=c["groups"])  # HWIO -> OIHW
    return F.relu(y) if c["activation"] == "relu" else y


def _avg_excluding_padding(x, k, s, top_left):
    """By hand (numpy): TF's "same" average pooling divides by the window's cells inside the input; torch's
    count_include_pad=False would do it too, but only for symmetric padding of at most half the window."""
    x = x.numpy()
    n, ch, h, w = x.shape
    y = np.empty((n, ch, -(-h // s[0]), -(-w // s[1])))
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            r0, c0 = i * s[0] - top_left[0], j * s[1] - top_left[1]
            y[:, :, i, j] = x[:, :, max(r0, 0):min(r0 + k[0], h), max(c0, 0):min(c0 + k[1], w)].mean((2, 3))
    return torch.from_numpy(y)


def _pool(c, x, mode):
    x, k = x[0], _pair(c["size"])
    s = _pair(c["stride"] if c["stride"] is not None else c["size"])
    t, left, b, r = _pads(c["pad"], k, s, x.shape[2:])
    ceil = c["rounding"] == "ceil"
    if mode == "avg" and c["pad"] == "same":
        assert not ceil
        return _avg_excluding_padding(x, k, s, (t, left))
    if (t, left) == (b, r):  # torch's own padding: its ceil_mode (with the drop rule) and count_include_pad
        if mode == "max":
            return F.max_pool2d(x, k, s, (t, left), ceil_mode=ceil)
        return F.avg_pool2d(x, k, s, (t, left), ceil_mode=ceil, count_include_pad=True)
    assert not ceil, "asymmetric padding with ceil: torch would see the explicit padding as input"
    x = F.pad(x, (left, r, t, b), value=-math.inf if mode == "max" else 0.0)  # average: explicit padding counts
    return F.max_pool2d(x, k, s) if mode == "max" else F.avg_pool2d(x, k, s)


def _dense(c, x, p):
    y = F.linear(x[0], p("kernel").T, p("bias"))
    return F.relu(y) if c["activation"] == "relu" else y


def _scale(c, x, p):
    y = x[0] * p("gamma")[:, None, None]
    return y + p("beta")[:, None, None] if c["bias"] else y


REFERENCE = {  # kind -> f(config, [inputs: NCHW or (N, C) float64], param(name) -> tensor or None)
    "conv": _conv,
    "dense": _dense,
    "batchnorm": lambda c, x, p: F.batch_norm(x[0], p("moving_mean"), p("moving_variance"), p("gamma"), p("beta"), False, 0.0, c["epsilon"]),
    "scale": _scale,
    "relu": lambda c, x, p: F.relu(x[0]),
    "lrn": lambda c, x, p: F.local_response_norm(x[0], c["size"], c["alpha"], c["beta"], c["k"]),
    "maxpool": lambda c, x, p: _pool(c, x, "max"),
    "avgpool": lambda c, x, p: _pool(c, x, "avg"),
    "global_avgpool": lambda c, x, p: x[0].mean((2, 3)),
    "adaptive_avgpool": lambda c, x, p: F.adaptive_avg_pool2d(x[0], c["output"]),
    "add": lambda c, x, p: sum(x[1:], x[0]),
    "concat": lambda c, x, p: torch.cat(x, 1),
    "flatten": lambda c, x, p: x[0].permute(0, 2, 3, 1).flatten(1) if x[0].ndim == 4 else x[0],  # zoo flattens H,W,C
    "dropout": lambda c, x, p: x[0],
    "softmax": lambda c, x, p: F.softmax(x[0], 1),
}


def reference(spec: ModelSpec, weights: dict, image: np.ndarray) -> dict[str, torch.Tensor]:
    """Every layer's output (NCHW or (N, C), float64) for an NHWC `image`."""
    out = {"input": torch.from_numpy(image.astype(np.float64)).permute(0, 3, 1, 2)}
    for node in spec.nodes:
        def param(p, layer=node.name):
            return torch.from_numpy(weights[f"{layer}.{p}"].astype(np.float64)) if f"{layer}.{p}" in weights else None
        with torch.no_grad():
            out[node.name] = REFERENCE[node.kind](node.config, [out[i] for i in node.inputs], param)
    return out


def nhwc(t: torch.Tensor) -> np.ndarray:
    return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).numpy()


def _mismatch(what, got, want):
    err, bound = float(np.max(np.abs(got - want))), RTOL * float(np.max(np.abs(want))) + ATOL
    return [] if err <= bound else [f"{what}: max |diff| {err:.3g} > {bound:.3g} (max |ref| {np.max(np.abs(want)):.3g})"]


# --- the tests -------------------------------------------------------------------------------------------


def test_every_kind_has_a_case():
    covered = {layer["kind"] for case in CASES for layer in case.layers}
    assert not set(KINDS) - covered, f"kinds without a case in tests/test_kinds.py: {sorted(set(KINDS) - covered)}"
    assert set(REFERENCE) == set(KINDS), "every kind needs a torch reference"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kind_matches_torch_keras_and_onnxruntime(case, tmp_path):
    import keras
    import onnx
    import onnxruntime as ort

    from zoo.backends.keras import build_model
    from zoo.backends.onnx import onnx_graph, write_onnx

    spec = make_spec(case)
    weights = random_weights(spec)
    image = (case.scale * np.random.default_rng(1).standard_normal((2, *spec.input_shape))).astype(np.float32)
    ref = reference(spec, weights, image)
    problems = []

    for node in spec.nodes:  # shape inference against what torch computed
        t = ref[node.name].shape
        torch_shape = (t[2], t[3], t[1]) if len(t) == 4 else (t[1],)
        if node.output_shape != torch_shape:
            problems.append(f"{node.name}: spec output_shape {node.output_shape} != torch's {torch_shape}")

    model = build_model(spec, weights)
    every = keras.Model(model.input, [model.get_layer(n.name).output for n in spec.nodes])
    for node, y in zip(spec.nodes, every(image, training=False)):
        y, want = np.asarray(y), nhwc(ref[node.name])
        problems += [f"keras {node.name}: shape {y.shape} != {want.shape}"] if y.shape != want.shape else _mismatch(f"keras {node.name}", y, want)

    graph, inits = onnx_graph(spec, weights, classes=[str(i) for i in range(spec.num_classes)])
    write_onnx(tmp_path / "m.onnx", graph, inits)
    try:  # an invalid graph is one more problem of the case, reported beside Keras' results
        onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
        logits = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"image": image})[0]
        problems += _mismatch("onnxruntime logits", logits, nhwc(ref["head"]))
    except Exception as e:
        problems.append(f"onnx: {type(e).__name__}: {e}")

    assert not problems, f"{case.id}:\n" + "\n".join(problems)


def test_onnx_input_declares_the_specs_channels():
    from zoo.backends.onnx import onnx_graph

    spec = make_spec(CASES[0])
    graph, _ = onnx_graph(spec, random_weights(spec), classes=["0", "1", "2"])
    dims = [d.dim_value or d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", *spec.input_shape], f"ONNX input {dims} for a spec input of {spec.input_shape}"


# --- foreign parameter conventions -------------------------------------------------------------------------

TORCH_NAMES = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
CAFFE_TF_NAMES = {"kernel": "weights", "bias": "biases", "gamma": "scale", "beta": "offset", "moving_mean": "mean", "moving_variance": "variance"}
CAFFE_BN_FACTOR = np.float32(999.0)


def foreign_spec(affine: bool) -> ModelSpec:
    """Every weighted kind, the dense after a flatten of a 2x3x4 map (so its rows are reordered C,H,W -> H,W,C)."""
    return ModelSpec.from_dict(_spec_dict((4, 5, 2), [
        conv(name="c1", filters=4, kernel=3, groups=2), conv(name="c2", filters=4, kernel=1, bias=False),
        L("batchnorm", name="bn", epsilon=1e-5, scale=affine, center=affine), L("scale", name="sc"), L("relu", name="r"),
        L("flatten", name="flat"), L("dropout", name="drop", rate=0.5), L("dense", name="head", units=3)]))


def to_foreign(convention: str, node, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer's canonical arrays as `convention` stores them, written by hand from docs/formats.md."""
    def rows(param, a):  # torch and caffe: conv OIHW, dense (out, in) with a C,H,W-flattened input
        if node.kind == "conv" and param == "kernel":
            return a.transpose(3, 2, 0, 1)
        if node.kind == "dense" and param == "kernel":
            h, w, c = node.flattened_from
            return a.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(a.shape[1], -1)
        return a

    if convention == "keras":
        return {str(i): a for i, a in enumerate(arrays.values())}
    if convention == "caffe-tensorflow":
        return {CAFFE_TF_NAMES[p]: a for p, a in arrays.items()}
    if convention == "torch":
        out = {TORCH_NAMES[p]: rows(p, a) for p, a in arrays.items()}
        return out | ({"num_batches_tracked": np.array(7, np.int64)} if node.kind == "batchnorm" else {})
    if node.kind == "batchnorm":  # caffe: running sums and their factor
        return {"0": arrays["moving_mean"] * CAFFE_BN_FACTOR, "1": arrays["moving_variance"] * CAFFE_BN_FACTOR, "2": np.array([CAFFE_BN_FACTOR])}
    return {str(i): rows(p, a) for i, (p, a) in enumerate(arrays.items())}


@pytest.mark.parametrize("convention, affine", [("torch", True), ("torch", False), ("caffe", False), ("keras", True), ("keras", False),
                                                ("caffe-tensorflow", True), ("caffe-tensorflow", False)])
def test_foreign_params_import_to_canonical(convention, affine):
    from zoo.sources import fit_params

    spec = foreign_spec(affine)
    canonical = random_weights(spec, seed=3)
    assert spec.node("head").flattened_from == (2, 3, 4)
    params = {n.name: to_foreign(convention, n, {t.param: canonical[t.name] for t in n.tensors}) for n in spec.weighted_nodes}
    fit = fit_params(params, convention, requested=spec)
    assert fit.spec.fingerprint == spec.fingerprint and set(fit.tensors) == set(canonical)
    if convention == "torch":
        assert fit.dropped == {"num_batches_tracked": ["bn"]}
    for name, value in fit.tensors.items():
        if isinstance(value, Deferred):
            value, deferred = np.empty(value.shape, value.dtype), value
            deferred.fill(value)
        assert value.shape == canonical[name].shape and value.dtype == np.float32, name
        if convention == "caffe" and name.startswith("bn.moving_"):  # divided back by the factor: rounding
            np.testing.assert_allclose(value, canonical[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(value, canonical[name], err_msg=name)


def test_every_kind_names_the_keras_classes_of_its_own_that_saved_models_need():
    """A .keras export loads only with zoo's own layer classes registered (zoo.export.keras_layers asks each
    kind): every layer a kind builds is Keras' own or one its kind lists."""
    from zoo.layers import KINDS
    from zoo.registry import all_specs

    seen = set()
    for spec in all_specs().values():
        for node in spec.nodes:
            if node.kind in seen:
                continue
            seen.add(node.kind)
            layer = KINDS[node.kind].keras(node)
            assert type(layer).__module__.startswith("keras") or type(layer) in KINDS[node.kind].keras_classes(), node.kind
