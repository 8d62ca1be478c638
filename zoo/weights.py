"""Verified safetensors: the one weights format zoo writes and reads (docs/formats.md).

Every file names its spec and the spec's fingerprint in `__metadata__`; a file is only written after
its tensors match the spec exactly, is written to a temporary name, read back, compared, and only then
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.spec import ModelSpec

FORMAT_VERSION = "1"
LAYOUT = "zoo-canonical-1"  # HWIO convs, (in, out) dense with H,W,C flatten order: docs/formats.md


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_tensors(spec: ModelSpec, tensors: dict[str, np.ndarray], path=None) -> None:
    """Raise one ZooError listing every problem: missing, extra, wrong shape or dtype, non-finite."""
    problems = []
    expected = spec.tensors
    missing = [n for n in expected if n not in tensors]
    extra = sorted(n for n in tensors if n not in expected)
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    for name, t in expected.items():
        arr = tensors.get(name)
        if arr is None:
            continue
        if tuple(arr.shape) != t.shape:
            problems.append(f"{name} has shape {tuple(arr.shape)}, spec says {t.shape}")
        elif arr.dtype != np.dtype(t.dtype):
            problems.append(f"{name} is {arr.dtype}, spec says {t.dtype}")
        elif not np.isfinite(arr).all():
            problems.append(f"{name} holds NaN or infinite values")
    if problems:
        raise ZooError(f"weights do not match {spec.id} (fingerprint {spec.fingerprint}): " + "; ".join(problems), path)


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    return {
        "format": "zoo-weights",
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "spec": spec.id,
        "family": spec.family,
        "version": spec.version,
        "fingerprint": spec.fingerprint,
        "num_classes": str(spec.num_classes),
    }


def atomic_output(path: Path):
    """A temporary file beside `path`, for write-then-rename. Returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_weights(path, spec: ModelSpec, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Check `tensors` against `spec`, write them atomically as safetensors, read back and compare."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = Path(path)
    check_tensors(spec, tensors, path)
    meta = {k: str(v) for k, v in (metadata or {}).items()} | spec_metadata(spec)
    # spec order, contiguous and little-endian as safetensors requires (no copy when already so)
    ordered = {n: np.ascontiguousarray(tensors[n], dtype=np.dtype(t.dtype).newbyteorder("<")) for n, t in spec.tensors.items()}
    if not path.parent.is_dir():
        raise ZooError("output folder does not exist", path.parent)
    tmp = atomic_output(path)
    try:
        save_file(ordered, tmp, metadata=meta)
        with safe_open(tmp, framework="numpy") as f:
            if f.metadata() != meta or set(f.keys()) != set(ordered):
                raise ZooError("read-back check failed: header differs from what was written", path)
            for name, arr in ordered.items():
                if not np.array_equal(f.get_tensor(name), arr):
                    raise ZooError(f"read-back check failed: {name} differs from what was written", path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class Weights:
    path: Path
    spec: ModelSpec
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]

    @property
    def classes(self) -> list[str] | None:
        raw = self.metadata.get("classes")
        return json.loads(raw) if raw else None


def read_header(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise ZooError("no such file", path) from None
    except Exception as e:  # safetensors raises its own SafetensorError for any corrupt header
        raise ZooError(f"not a valid safetensors file ({e})", path) from None


def spec_of(path, metadata: dict[str, str]) -> ModelSpec:
    """The spec a weights file was made for, checked against the fingerprint it records."""
    from zoo.registry import get_spec

    if metadata.get("format") != "zoo-weights" or "spec" not in metadata:
        raise ZooError("safetensors file without zoo metadata (convert it with `zoo convert`)", path)
    try:
        num_classes = int(metadata["num_classes"])
    except (KeyError, ValueError):
        raise ZooError("metadata num_classes is missing or not a number", path) from None
    spec = get_spec(metadata["spec"]).with_num_classes(num_classes)
    if metadata.get("fingerprint") != spec.fingerprint:
        raise ZooError(
            f"made for a different {spec.id} (fingerprint {metadata.get('fingerprint')}, the registered spec has "
            f"{spec.fingerprint}): the spec changed without a new version, or the file is from another zoo",
            path,
        )
    return spec


def load_weights(path) -> Weights:
    """Read and fully verify a zoo weights file."""
    from safetensors import safe_open

    path = Path(path)
    metadata = read_header(path)
    spec = spec_of(path, metadata)
    try:
        with safe_open(path, framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise ZooError(f"cannot read tensors ({e})", path) from None
    check_tensors(spec, tensors, path)
    return Weights(path, spec, tensors, metadata)
