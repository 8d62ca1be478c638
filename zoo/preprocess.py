"""Image preprocessing as a spec states it, in TensorFlow (training, serving) and numpy (ONNX predict).

Both paths: decode to RGB uint8, resize the shorter side to `input.resize` (back to uint8, as Pillow and
torchvision do), center crop (training: random crop and flip) to `input.size`, reorder channels; then,
in float, scale to `value_range`, subtract `mean` and divide by `std` (given in the spec's channel order),
folded into one multiply-add per channel. TensorFlow datasets do the uint8 steps per image and the float
step per batch: per-image float ops cost 2-3 ms an image here, as much as decoding it.
"""

from __future__ import annotations

import numpy as np

from zoo.spec import ModelSpec


def _constants(spec: ModelSpec | dict):
    """(a, b) per channel, in the spec's order: input = pixel * a + b."""
    cfg = spec if isinstance(spec, dict) else spec.input
    lo, hi = cfg["value_range"]
    mean, std = np.array(cfg["mean"], np.float32), np.array(cfg["std"], np.float32)
    return ((hi - lo) / 255.0 / std).astype(np.float32), ((lo - mean) / std).astype(np.float32)


# --- TensorFlow ------------------------------------------------------------------------------------


def tf_decode(data):
    """Encoded JPEG/PNG/GIF/BMP bytes -> RGB uint8 (grayscale expanded, alpha dropped)."""
    import tensorflow as tf

    return tf.io.decode_image(data, channels=3, expand_animations=False)


def _resize_shorter(image, size: int):
    import tensorflow as tf

    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    new = tf.maximum(tf.cast(tf.floor(shape * (size / tf.reduce_min(shape))), tf.int32), size)  # torchvision's int()

    def resize():
        return tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, new, method="bilinear", antialias=True)), 0, 255), tf.uint8)

    # already at size (as Pillow's path, which returns such an image unchanged): the antialiased
    # resize would cost as much as decoding the image, for an identity
    return tf.cond(tf.reduce_min(shape) == size, lambda: image, resize)


def tf_pixels(image, spec: ModelSpec, seed=None):
    """An RGB uint8 image (HxWx3) -> the spec's input-size crop, uint8, in the spec's channel order: the
    center crop, or with a stateless `seed` a random crop, randomly flipped."""
    import tensorflow as tf

    h, w = spec.input["size"]
    image = _resize_shorter(image, spec.input.get("resize", max(h, w)))
    if seed is None:
        shape = tf.shape(image)
        # torchvision's center crop: int(round(margin / 2)), halves to even
        top, left = (tf.cast(tf.round(tf.cast(shape[i] - n, tf.float32) / 2), tf.int32) for i, n in ((0, h), (1, w)))
        image = image[top:top + h, left:left + w, :]
    else:
        image = tf.image.stateless_random_crop(image, (h, w, 3), seed=seed)
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return image[..., ::-1] if spec.input["channel_order"] == "BGR" else image


def tf_scale(pixels, spec: ModelSpec):
    """tf_pixels' output (one image or a batch) -> the model's float input."""
    import tensorflow as tf

    a, b = _constants(spec)
    return tf.cast(pixels, tf.float32) * a + b


def tf_eval_image(encoded, spec: ModelSpec):
    """Encoded bytes -> one preprocessed HxWx3 input (resize, center crop, normalize)."""
    return tf_scale(tf_pixels(tf_decode(encoded), spec), spec)


# --- numpy / Pillow (no TensorFlow: ONNX Runtime prediction) ----------------------------------------


def np_eval_image(path, input_cfg: dict) -> np.ndarray:
    """The same as tf_eval_image with Pillow and numpy; `input_cfg` is a spec's `input` dict."""
    from PIL import Image

    h, w = input_cfg["size"]
    size = input_cfg.get("resize", max(h, w))
    with Image.open(path) as im:
        im = _rgb8(im)
        scale = size / min(im.size)
        im = im.resize((max(size, int(im.size[0] * scale)), max(size, int(im.size[1] * scale))), Image.BILINEAR)
        left, top = round((im.size[0] - w) / 2), round((im.size[1] - h) / 2)
        return np_normalize(np.asarray(im.crop((left, top, left + w, top + h)), np.float32), input_cfg)


def oversized(path) -> str | None:
    """Why an image is too large to decode, from its header alone, or None. The bound is Pillow's
    decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS (89,478,485 pixels unless raised): a few-kB PNG can
    declare 180 megapixels, which TensorFlow's decoder would unpack to 540 MB without asking."""
    from PIL import Image

    limit = f"over the {Image.MAX_IMAGE_PIXELS or 0:,}-pixel limit (PIL.Image.MAX_IMAGE_PIXELS)"
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError as e:  # Pillow refuses twice its limit on its own
        return f"{limit}: {e}"
    except Exception:  # not an image Pillow knows: the decoder says why, later
        return None
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return f"{width}x{height} pixels, {limit}: decoded it would take {width * height * 3 / 2**20:,.0f} MB"
    return None


def _rgb8(im):
    """Pillow's image as 8-bit RGB the way TensorFlow's decoder makes it: 16-bit grayscale (Pillow's "I;16"
    and "I" modes, which its own convert clips at 255) keeps its high byte, as tf.io.decode_image does."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        return Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def np_normalize(rgb: np.ndarray, input_cfg: dict) -> np.ndarray:
    """RGB in 0..255 (...xHxWx3) -> the layout a spec's `input` dict describes (tf_pixels' order, then tf_scale)."""
    a, b = _constants(input_cfg)
    x = rgb[..., ::-1] if input_cfg["channel_order"] == "BGR" else rgb
    return (x.astype(np.float32) * a + b).astype(np.float32)
