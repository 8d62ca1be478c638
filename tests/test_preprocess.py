"""TensorFlow's preprocessing (training, serving) and the numpy/Pillow one (ONNX predict) agree, per spec."""

import numpy as np
import pytest
from PIL import Image

from zoo.preprocess import np_eval_image, np_normalize, tf_decode, tf_eval_image, tf_pixels, tf_scale
from zoo.registry import get_spec


@pytest.fixture(params=["alexnet@bvlc", "alexnet@torchvision"])  # BGR + mean pixel; RGB/255 + mean/std
def spec(request):
    return get_spec(request.param)


def _image(path, size, mode="RGB"):
    rng = np.random.default_rng(size[0])
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def test_at_resize_size_both_paths_crop_the_same_pixels(tmp_path, spec):
    resize = spec.input.get("resize")
    for i, mode in enumerate(("RGB", "L")):
        path = _image(tmp_path / f"a{i}.png", (resize + 37 * i, resize), mode)  # shorter side == resize: no resampling
        want = np_eval_image(path, spec.input)
        np.testing.assert_allclose(tf_eval_image(path.read_bytes(), spec).numpy(), want, rtol=0, atol=1e-5)
        rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
        top, left = (rgb.shape[0] - want.shape[0]) // 2, (rgb.shape[1] - want.shape[1]) // 2
        np.testing.assert_allclose(np_normalize(rgb[top:top + want.shape[0], left:left + want.shape[1]], spec.input), want, atol=1e-5)


def test_resized_images_agree_within_the_resamplers_difference(tmp_path, spec):
    path = _image(tmp_path / "big.jpg", (500, 375))
    got, want = tf_eval_image(path.read_bytes(), spec).numpy(), np_eval_image(path, spec.input)
    assert got.shape == want.shape == (*spec.input["size"], 3)
    pixel = 1 / 255 * (spec.input["value_range"][1] - spec.input["value_range"][0]) / np.min(spec.input["std"])
    assert np.mean(np.abs(got - want)) < 6 * pixel  # TF's antialiased bilinear vs Pillow's: a few levels of noise


def test_random_crops_are_flipped_windows_and_batches_scale_like_images(tmp_path, spec):
    import tensorflow as tf

    h, w = spec.input["size"]
    y, x = np.mgrid[: spec.input["resize"], :300]
    rgb = np.stack([x % 256, y, x // 256], axis=-1).astype(np.uint8)  # each pixel names its position
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = tf_decode((tmp_path / "c.png").read_bytes())
    full = rgb[..., ::-1] if spec.input["channel_order"] == "BGR" else rgb
    crops = [tf_pixels(image, spec, tf.constant([7, s], tf.int64)).numpy() for s in range(8)]
    assert len({c.tobytes() for c in crops}) > 1
    flips = []
    for crop in crops:
        assert crop.shape == (h, w, 3) and crop.dtype == np.uint8
        top = int(crop[0, 0, 1])  # G is the row in either channel order
        corner = crop[0, 0] if spec.input["channel_order"] == "RGB" else crop[0, 0, ::-1]
        column = int(corner[0]) + 256 * int(corner[2])  # the window's left edge, or its right one when mirrored
        window = full[top:top + h, column:column + w]
        mirrored = full[top:top + h, max(0, column - w + 1):column + 1][:, ::-1]
        found = [c.shape == crop.shape and (c == crop).all() for c in (window, mirrored)]
        assert any(found), "not a window of the image"
        flips.append(found[1])
    assert 0 < sum(flips) < len(flips)
    batch = tf_scale(np.stack(crops), spec).numpy()
    np.testing.assert_array_equal(batch[2], tf_scale(crops[2], spec).numpy())


def test_16_bit_pngs_give_both_paths_the_same_pixels(tmp_path, spec):
    """TensorFlow keeps a 16-bit sample's high byte; Pillow's own convert("RGB") clips grayscale at 255."""
    import tensorflow as tf

    resize = spec.input.get("resize")
    rng = np.random.default_rng(16)
    gray = tmp_path / "gray16.png"
    Image.fromarray(rng.integers(0, 65536, (resize, resize + 11), dtype=np.uint16)).save(gray)  # mode I;16
    rgb = tmp_path / "rgb16.png"
    rgb.write_bytes(tf.io.encode_png(tf.constant(rng.integers(0, 65536, (resize, resize + 11, 3), dtype=np.uint16))).numpy())
    for path in (gray, rgb):
        np.testing.assert_allclose(np_eval_image(path, spec.input), tf_eval_image(path.read_bytes(), spec).numpy(), rtol=0, atol=1e-5)


def test_an_image_whose_header_declares_too_many_pixels_is_refused_before_decoding(tmp_path):
    """Pillow's decompression-bomb limit, checked on the header by every path that decodes (training's check,
    predict, features): a few bytes declaring 180 megapixels never reach a decoder."""
    import struct
    import zlib

    from zoo.data import check_images
    from zoo.errors import ZooError
    from zoo.preprocess import oversized

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"  # the start of a bomb: the header and a little image data
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 18000, 10000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
    assert "over the 89,478,485-pixel limit" in oversized(path)  # 180 megapixels: Pillow's own refusal, by the header
    with pytest.raises(ZooError, match="pixel limit"):
        check_images([str(path)], ["bomb"])
    small = _image(tmp_path / "ok.png", (40, 30))
    assert oversized(small) is None
    big = tmp_path / "big.png"  # over the limit but under Pillow's own refusal at twice it: zoo's check
    Image.new("L", (10, 10)).save(big)
    import PIL.Image

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50)
        assert oversized(big).startswith("10x10 pixels, over the 50-pixel limit")
