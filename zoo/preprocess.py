"""Image preprocessing as a spec states it, in TensorFlow (training, serving) and numpy (ONNX predict).

Both paths: decode to RGB uint8, resize the shorter side to `input.resize`, center crop (training:
random crop and flip) to `input.size`, then scale to `value_range`, reorder channels, subtract
`mean` and divide by `std` (mean/std are given in the spec's channel order).
"""

from __future__ import annotations

import numpy as np

from zoo.spec import ModelSpec


def _constants(spec: ModelSpec | dict):
    cfg = spec if isinstance(spec, dict) else spec.input
    lo, hi = cfg["value_range"]
    return (hi - lo) / 255.0, lo, np.array(cfg["mean"], np.float32), np.array(cfg["std"], np.float32)


# --- TensorFlow ------------------------------------------------------------------------------------


def tf_decode(data):
    """Encoded JPEG/PNG/GIF/BMP bytes -> RGB uint8 (grayscale expanded, alpha dropped)."""
    import tensorflow as tf

    return tf.io.decode_image(data, channels=3, expand_animations=False)


def tf_resize_shorter(image, size: int):
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(size, tf.float32) / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    # already at size (as Pillow's path, which returns such an image unchanged): the antialiased
    # resize would cost as much as decoding the image, for an identity
    return tf.cond(tf.reduce_min(shape) == size, lambda: tf.cast(image, tf.float32),
                   lambda: tf.image.resize(image, tf.maximum(new, size), method="bilinear", antialias=True))


def tf_center_crop(image, height: int, width: int):
    import tensorflow as tf

    shape = tf.shape(image)
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    return image[top:top + height, left:left + width, :]


def tf_normalize(images, spec: ModelSpec):
    """RGB in 0..255 (any float or uint8 tensor, ...xHxWx3) -> the spec's input layout."""
    import tensorflow as tf

    scale, lo, mean, std = _constants(spec)
    x = tf.cast(images, tf.float32) * scale + lo
    if spec.input["channel_order"] == "BGR":
        x = x[..., ::-1]
    return (x - mean) / std


def tf_eval_image(encoded, spec: ModelSpec):
    """Encoded bytes -> one preprocessed HxWx3 input (resize, center crop, normalize)."""
    h, w = spec.input["size"]
    image = tf_resize_shorter(tf_decode(encoded), spec.input.get("resize", max(h, w)))
    return tf_normalize(tf_center_crop(image, h, w), spec)


def tf_train_image(encoded, spec: ModelSpec, seed):
    """Encoded bytes -> a random crop of the resized image, randomly flipped; stateless, from `seed`."""
    import tensorflow as tf

    h, w = spec.input["size"]
    image = tf_resize_shorter(tf_decode(encoded), spec.input.get("resize", max(h, w)))
    image = tf.image.stateless_random_crop(image, (h, w, 3), seed=seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return tf_normalize(image, spec)


# --- numpy / Pillow (no TensorFlow: ONNX Runtime prediction) ----------------------------------------


def np_eval_image(path, input_cfg: dict) -> np.ndarray:
    """The same as tf_eval_image with Pillow and numpy; `input_cfg` is a spec's `input` dict."""
    from PIL import Image

    h, w = input_cfg["size"]
    size = input_cfg.get("resize", max(h, w))
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))), Image.BILINEAR)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        return np_normalize(np.asarray(im.crop((left, top, left + w, top + h)), np.float32), input_cfg)


def np_normalize(rgb: np.ndarray, input_cfg: dict) -> np.ndarray:
    """RGB in 0..255 (...xHxWx3) -> the layout a spec's `input` dict describes (as tf_normalize)."""
    scale, lo, mean, std = _constants(input_cfg)
    x = rgb * scale + lo
    if input_cfg["channel_order"] == "BGR":
        x = x[..., ::-1]
    return ((x - mean) / std).astype(np.float32)
