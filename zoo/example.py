"""The built-in example data: two classes of drawn shapes (circles, squares), generated on demand.

Not photographs: zoo ships no images and downloads nothing. Shapes vary in size, position, colour and
background, with noise, JPEG and PNG, RGB, grayscale and RGBA files, so the whole input path is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square")


def make_example(folder, per_class: int = 60, size: int = 96, seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = tuple(int(v) for v in rng.integers(0, 256, 3))
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            r = rng.uniform(0.25, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            color = tuple(int((b + rng.integers(96, 160)) % 256) for b in background)  # contrasts with the background
            box = (cx - r, cy - r, cx + r, cy + r)
            (draw.ellipse if name == "circle" else draw.rectangle)(box, fill=color)
            noisy = np.asarray(image, np.float32) + rng.normal(0, 12, (size, size, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            if i % 7 == 3:
                image = image.convert("L")
            elif i % 7 == 5:
                image = image.convert("RGBA")
            suffix = ".png" if i % 2 or image.mode == "RGBA" else ".jpg"
            image.save(folder / name / f"{name}_{i:03d}{suffix}")
    return folder


# --- weights for the example: seeded, not trained ------------------------------------------------------------
# No pretrained weights ship with zoo. Seeded random filters give features that carry little about a shape
# (measured: a linear probe on AlexNet's fc6 separates circles from squares at 0.70-0.77), so the example's
# weights are seeded with structure instead: oriented Gabor filters in the first conv (what trained
# networks learn there), the second conv pooling each orientation's responses over a small window, seeded
# Gaussian weights above, every layer then scaled on example images so that its output is centred with unit
# variance (LSUV), which keeps activations and logits at sane scales. Probe on fc6 with these: 0.92-0.95.

ORIENTATIONS = 16


def gabor_bank(shape, seed: int) -> np.ndarray:
    """(k, k, channels, n) oriented Gabor filters, the same on every input channel, ORIENTATIONS angles."""
    k, _, channels, n = shape
    rng = np.random.default_rng(seed)
    r = np.arange(k) - k // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    out = np.empty(shape, np.float32)
    for i in range(n):
        theta = np.pi * (i % ORIENTATIONS) / ORIENTATIONS + rng.normal(0, 0.05)
        wavelength = rng.choice([6.0, 9.0, 12.0])
        along = xx * np.cos(theta) + yy * np.sin(theta)
        g = np.exp(-(xx ** 2 + yy ** 2) / (2 * (0.55 * wavelength) ** 2)) * np.cos(2 * np.pi * along / wavelength + rng.uniform(0, 2 * np.pi))
        out[..., i] = ((g - g.mean()) / np.sqrt(channels))[..., None]
    return out


def orientation_pooling(shape, groups: int, seed: int) -> np.ndarray:
    """(k, k, in/groups, n): output j sums, over a Gaussian window, its group's inputs of orientation j."""
    k, _, per_group, n = shape
    rng = np.random.default_rng(seed)
    r = np.arange(k) - k // 2
    window = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    out = np.zeros(shape, np.float32)
    for j in range(n):
        first_input = (j // (n // groups)) * per_group  # the global index of this output's group's first input
        for c in range(per_group):
            if (first_input + c) % ORIENTATIONS == j % ORIENTATIONS:
                out[:, :, c, j] = window * rng.uniform(0.5, 1.5)
    return out


def seeded_weights(spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical tensors: Gabor first conv, orientation pooling second, seeded Gaussian above, zero biases."""
    rng = np.random.default_rng(seed)
    convs = [n for n in spec.weighted_nodes if n.kind == "conv"]
    out = {}
    for node in spec.weighted_nodes:
        for t in node.tensors:
            if t.param == "bias":
                out[t.name] = np.zeros(t.shape, np.float32)
            elif node is convs[0]:
                out[t.name] = gabor_bank(t.shape, seed)
            elif node is convs[1]:
                out[t.name] = orientation_pooling(t.shape, node.config["groups"], seed + 1)
            else:
                out[t.name] = rng.normal(0, 1 / np.sqrt(np.prod(t.shape[:-1])), t.shape).astype(np.float32)
    return out


def example_weights(spec, folder, seed: int = 0, images: int = 48) -> dict[str, np.ndarray]:
    """seeded_weights scaled layer by layer (LSUV) on `images` example images from `folder`: each weighted
    layer's output (before its activation) centred per channel and scaled to unit variance."""
    import keras

    from zoo.backends.keras import build_model, model_tensors
    from zoo.preprocess import np_eval_image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".png", ".jpg"))
    pick = np.random.default_rng(seed).choice(len(files), min(images, len(files)), replace=False)
    x = np.stack([np_eval_image(files[i], spec.input) for i in sorted(pick)])
    model = build_model(spec, seeded_weights(spec, seed))
    for node in spec.weighted_nodes:
        layer = model.get_layer(node.name)
        activation, layer.activation = layer.activation, keras.activations.linear  # measure before the ReLU
        y = np.asarray(keras.Model(model.input, layer.output)(x, training=False)).reshape(-1, layer.bias.shape[0])
        mean, std = y.mean(0), (y - y.mean(0)).std()
        layer.kernel.assign(layer.kernel.numpy() / std)
        layer.bias.assign((layer.bias.numpy() - mean) / std)
        layer.activation = activation
    return model_tensors(model, spec)
