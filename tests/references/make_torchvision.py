"""Make the torchvision reference outputs in tests/data/torchvision/ (run in a venv with torchvision).

For resnet50, vgg16 and alexnet (weights=None, 1000 classes): fill the state dict with
tests/seeded.py's seeded_state(shapes, seed), calibrate LSUV-style (each conv/linear, in
forward order, scaled so its output std on the photo batch is 1.0, the last one 3.0; the
last one's bias first set to centre the logits over the batch, see calibrate), regenerate
with seeded_state(shapes, seed, scales, fixed), check the model reproduces the calibrated
logits bit-for-bit (also through torch.save/torch.load into a fresh model), and save the
logits, seed, scales, the fixed classifier bias, keys and shapes. The preprocessed photo batch
(tests/data/photos, ImageNet eval transforms) is saved once as input224.npy.

See README_torchvision.md for the venv and the torchvision import stub.
"""

import io
import json
import sys
import time
import types
from pathlib import Path

# torchvision 0.28.0 from the registry is a CUDA build; beside CPU torch its meta
# registrations fail ("operator torchvision::nms does not exist"). Models and transforms
# do not need them.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from seeded import seeded_state  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
MODELS = {"resnet50": 301, "vgg16": 302, "alexnet": 303}
OUT = TESTS / "data" / "torchvision"


def photo_batch():
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return torch.stack([tf(Image.open(TESTS / "data" / "photos" / f"{n}.jpg").convert("RGB")) for n in PHOTOS])


def load(model, state):
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


class _Stop(Exception):
    pass


def forward_order(model, x):
    """Names of the Conv2d/Linear modules in the order the forward pass calls them."""
    order, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(order) == len(set(order)), "a module is called twice"
    return order


def _stop_at(model, module, x, pre: bool, take):
    """take(module's input or output) on x; the forward pass stops there."""
    got = []

    def hook(m, *args):
        got.append(take(args[0][0] if pre else args[1]))
        raise _Stop

    h = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


def output_std(model, module, x):
    """Std of `module`'s output on x."""
    return _stop_at(model, module, x, False, lambda o: o.double().std().item())


def mean_input(model, module, x):
    """Batch mean of `module`'s input on x."""
    return _stop_at(model, module, x, True, lambda i: i.mean(0))


def calibrate(model, x):
    """LSUV-style: scale each conv/linear (weight and bias alike) so its output std is 1.0 (last: 3.0).

    The classifier (last linear) first gets the data-dependent bias -W @ mean(features over
    the batch) (weight normalization's data-dependent init, mean part): without it the
    logits of a random net are dominated by one image-independent vector (ReLU features
    are positive), and every photo gets the same top-1. Returns (scales, fixed, order):
    fixed maps the classifier bias name to its final value.
    """
    order = forward_order(model, x)
    modules = dict(model.named_modules())
    scales, fixed = {}, {}
    for j, name in enumerate(order):
        m = modules[name]
        last = j == len(order) - 1
        if last:
            assert isinstance(m, nn.Linear) and m.bias is not None, name
            with torch.no_grad():
                m.bias.copy_(-(m.weight @ mean_input(model, m, x)))
        s = np.float32((3.0 if last else 1.0) / output_std(model, m, x))
        with torch.no_grad():
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    getattr(m, p).mul_(torch.tensor(s))
                    if last and p == "bias":
                        fixed[f"{name}.{p}"] = m.bias.detach().numpy().copy()
                    else:
                        scales[f"{name}.{p}"] = float(s)
    return scales, fixed, order


def logits_of(model, x):
    with torch.no_grad():
        return model(x)


def make(name, seed, x):
    t0 = time.time()
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    sd = model.state_dict()
    keys = list(sd)
    shapes = {k: tuple(sd[k].shape) for k in keys}

    load(model, seeded_state(shapes, seed))
    scales, fixed, order = calibrate(model, x)
    calibrated = logits_of(model, x)

    # Regenerate from (seed, scales, fixed) alone: the same weights, the same logits.
    state = seeded_state(shapes, seed, scales, fixed)
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), state[k]), k
    fresh = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    load(fresh, state)
    logits = logits_of(fresh, x)
    assert torch.equal(logits, calibrated)

    # ... and through torch.save / torch.load into another fresh model.
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buf)
    buf.seek(0)
    other = getattr(torchvision.models, name)(weights=None, num_classes=1000).eval()
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert torch.equal(logits_of(other, x), calibrated)

    # Batch-norm running stats must be real (not the 0/1 defaults).
    for k, v in other.state_dict().items():
        if k.endswith("running_mean"):
            assert v.abs().max() > 0, k
        if k.endswith("running_var"):
            assert (v != 1).any(), k

    lg = logits.numpy()
    assert np.isfinite(lg).all()
    top1 = lg.argmax(1)
    print(f"{name}: seed {seed}, {len(keys)} keys, {len(order)} conv/linear calibrated, "
          f"logits std {lg.std():.4f}")
    for n, row in zip(PHOTOS, lg):
        top5 = np.argsort(-row)[:5]
        print(f"  {n:10s} std {row.std():.4f} top5 {top5.tolist()} {np.round(row[top5], 3).tolist()}")
    assert len(set(top1.tolist())) == len(PHOTOS), f"{name}: top-1 not distinct {top1}"

    skeys = np.array(list(scales))
    (fixed_key,) = fixed
    np.savez_compressed(
        OUT / f"{name}.npz",
        logits=lg.astype(np.float32), seed=np.array(seed, np.int64),
        scale_keys=skeys, scale_values=np.array([scales[k] for k in skeys], np.float32),
        fixed_key=np.array(fixed_key), fixed_value=fixed[fixed_key].astype(np.float32),
        keys=np.array(keys), shapes=np.array(json.dumps({k: list(shapes[k]) for k in keys})),
        torch_version=np.array(torch.__version__), torchvision_version=np.array(torchvision.__version__),
    )
    print(f"  done in {time.time() - t0:.1f} s")
    return keys


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    x = photo_batch().contiguous()
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    np.save(OUT / "input224.npy", x.numpy())
    for name, seed in MODELS.items():
        saved = torch.from_numpy(np.load(OUT / "input224.npy"))
        assert torch.equal(saved, x)
        make(name, seed, saved)


if __name__ == "__main__":
    main()
