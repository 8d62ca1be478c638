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
