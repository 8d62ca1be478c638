"""Training data: a folder of class folders or the seed's list files, checked up front, as tf.data."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Samples:
    paths: list[str]
    labels: np.ndarray  # int32
    classes: list[str]

    def __len__(self):
        return len(self.paths)


def image_problem(path: str) -> str | None:
    """Why the image at `path` cannot be trained on, or None. Decoded fully: a header read passes truncated and
    bit-flipped files, which then stop tf.data mid-epoch. verify() first checks PNG chunk checksums, which
    load() skips and TensorFlow's decoder does not (on 900 mutated JPEGs and PNGs this agreed with
    tf.io.decode_image on all but one PNG whose damage was in the trailing IEND chunk)."""
    from PIL import Image, UnidentifiedImageError

    from zoo.preprocess import oversized

    try:
        if problem := oversized(path):
            return problem
        with Image.open(path) as im:
            if im.format not in ("JPEG", "PNG"):
                return f"{im.format} image; JPEG and PNG are supported"
            im.verify()
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return "no such image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow's decoders raise all of these
        return f"not a readable image ({e})"
    return None


def check_images(paths: list[str], wheres: list[str], skip_bad=None) -> list[bool]:
    """Decode every image up front, in threads (Pillow releases the GIL while decoding), and return which are
    good. Bad ones are a ZooError naming them, or, with `skip_bad`, passed to it as (where, path, problem)
    and dropped."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(image_problem, paths))
    bad = [(w, p, e) for w, p, e in zip(wheres, paths, problems) if e]
    if bad and skip_bad is None:
        raise ZooError(f"{len(bad)} image(s) cannot be decoded (--skip-bad-images drops them): {name_bad(bad)}")
    if bad:
        skip_bad(bad)
    return [e is None for e in problems]


def name_bad(bad: list[tuple], most: int = 3) -> str:
    """The first `most` of check_images' (where, path, problem), for one line."""
    named = "; ".join(f"{p} ({w}): {e}" for w, p, e in bad[:most])
    return named + (f"; and {len(bad) - most} more" if len(bad) > most else "")


def text_lines(path, what: str) -> list[str]:
    """A list file's lines: UTF-8, with or without the byte-order mark Windows editors write."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise ZooError(f"cannot read {what}: {e.strerror}", path) from None
    except UnicodeDecodeError as e:
        raise ZooError(f"{what} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}): save it as UTF-8", path) from None


def read_classes_file(path) -> list[str]:
    names = [line.strip() for line in text_lines(path, "classes file") if line.strip()]
    if len(set(names)) != len(names):
        raise ZooError("class names repeat", path)
    return names


def from_folder(root, val_fraction: float = 0.2, seed: int = 0, skip_bad=None) -> tuple[Samples, Samples]:
    """root/<class>/**/*.jpg; or root/train/<class>/ and root/val/<class>/ when both exist. `skip_bad`: check_images'."""
    root = Path(root)
    if not root.is_dir():
        raise ZooError("no such data folder", root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = _scan(root / "train", skip_bad=skip_bad)
        val = _scan(root / "val", train.classes, skip_bad)
        return train, val
    every = _scan(root, skip_bad=skip_bad)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in range(len(every.classes)):  # split each class, so every class is in both
        idx = np.flatnonzero(every.labels == label)
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction))
        if len(idx) - n_val < 1:
            raise ZooError(f"class {every.classes[label]!r} has {len(idx)} image(s): too few to split into train and validation", root)
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    pick = lambda ids: Samples([every.paths[i] for i in ids], every.labels[ids], every.classes)  # noqa: E731
    return pick(sorted(train_idx)), pick(sorted(val_idx))


def _scan(folder: Path, classes: list[str] | None = None, skip_bad=None) -> Samples:
    """Class folders' images, those in their sub-folders too (sorted, hidden files and folders skipped)."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if set(found) != set(classes):
        raise ZooError(f"class folders {found} differ from the training classes {classes}", folder)
    if len(classes) < 2:
        raise ZooError(f"found {len(classes)} class folder(s); fine-tuning needs at least 2", folder)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = [str(p) for p in _images_under(folder / name)]
        if not files:
            raise ZooError(f"class folder {name!r} holds no JPEG or PNG image", folder / name)
        paths += files
        labels += [label] * len(files)
    good = check_images(paths, [f"class {classes[y]}" for y in labels], skip_bad)
    paths, labels = [p for p, ok in zip(paths, good) if ok], np.array(labels, np.int32)[good]
    for label, name in enumerate(classes):
        if not (labels == label).any():
            raise ZooError(f"class folder {name!r} holds no image that decodes", folder / name)
    return Samples(paths, labels, classes)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def from_list(list_file, classes: list[str] | None = None, skip_bad=None) -> Samples:
    """The seed's format: one `path label` per line; relative paths are relative to the list file.
    `skip_bad`: check_images'."""
    list_file = Path(list_file)
    lines = text_lines(list_file, "list file")
    paths, labels, wheres = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{list_file}:{n}: {line.strip()!r}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ZooError(f"{where}: expected 'path label'")
        path = Path(parts[0])
        path = path if path.is_absolute() else list_file.parent / path
        label = int(parts[1])
        if label < 0 or (classes and label >= len(classes)):
            raise ZooError(f"{where}: label {label} out of range 0..{len(classes) - 1 if classes else '?'}")
        paths.append(str(path))
        labels.append(label)
        wheres.append(where)
    good = check_images(paths, wheres, skip_bad)
    paths, labels = [p for p, ok in zip(paths, good) if ok], np.array(labels, np.int32)[good]
    if not paths:
        raise ZooError("list file names no images", list_file)
    classes = classes or [str(i) for i in range(int(labels.max()) + 1)]
    return Samples(paths, labels, classes)


def epochs_dataset(samples: Samples, spec, batch_size: int, first_epoch: int, epochs: int, seed: int, augment: bool):
    """Batches for epochs [first_epoch, epochs): each epoch's order and augmentation are a function of
    (seed, epoch) alone, so a resumed run sees exactly the batches an uninterrupted one would."""
    import tensorflow as tf

    from zoo.preprocess import tf_decode, tf_pixels, tf_scale

    n = len(samples)
    order = np.stack([np.random.default_rng([seed, e]).permutation(n) for e in range(first_epoch, epochs)]).reshape(-1)
    position = np.arange(order.size, dtype=np.int64) + first_epoch * n  # unique per (epoch, slot)
    paths = tf.constant(samples.paths)
    labels = tf.constant(samples.labels)

    def load(i, pos):
        image = tf_decode(tf.io.read_file(paths[i]))
        return tf_pixels(image, spec, tf.stack([tf.cast(seed, tf.int64), pos]) if augment else None), labels[i]

    steps = math.ceil(n / batch_size)
    ds = tf.data.Dataset.from_tensor_slices((order, position)).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = batch_per_epoch(ds, n, batch_size).map(lambda x, y: (tf_scale(x, spec), y))
    return ds.prefetch(tf.data.AUTOTUNE), steps


def batch_per_epoch(ds, epoch_size: int, batch_size: int):
    """Batches that never straddle two epochs of an (x, y) dataset holding several epochs back to back."""
    import tensorflow as tf

    if epoch_size % batch_size == 0:
        return ds.batch(batch_size)
    return ds.window(epoch_size).flat_map(lambda x, y: tf.data.Dataset.zip((x, y)).batch(batch_size))


def eval_dataset(samples: Samples, spec, batch_size: int):
    import tensorflow as tf

    from zoo.preprocess import tf_decode, tf_pixels, tf_scale

    ds = tf.data.Dataset.from_tensor_slices((samples.paths, samples.labels))
    ds = ds.map(lambda p, y: (tf_pixels(tf_decode(tf.io.read_file(p)), spec), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).map(lambda x, y: (tf_scale(x, spec), y)).prefetch(tf.data.AUTOTUNE)


def untuned(ds):
    """An in-memory `ds` without tf.data's autotuning thread: at the end of fit, tearing down the cached
    features' iterator waited for a tf.data thread for ~18 s in most runs here (a native stack dump showed
    it), and with autotuning off it did not; such a pipeline has nothing to tune."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
