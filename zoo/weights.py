"""Verified safetensors: the one weights format zoo writes and reads (docs/formats.md).

Every file names its spec and the spec's fingerprint in `__metadata__`; a file is only written after
its tensors match the spec exactly, is written to a temporary name, read back, compared, and only then
renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.layouts import Deferred
from zoo.mapped import drop_pages, map_file, release_pages
from zoo.spec import ModelSpec

FORMAT_VERSION = "1"
LAYOUT = "zoo-canonical-1"  # HWIO convs, (in, out) dense with H,W,C flatten order: docs/formats.md


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a whole file (hashlib reads it into one reused buffer and releases the GIL while hashing)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


_CHUNK = 1 << 22  # elements/bytes per step when scanning big tensors: bounded temporaries


def all_finite(arr: np.ndarray, release=None) -> bool:
    """No NaN or inf, scanned a chunk at a time; `release(chunk)` follows each (a mapped array's pages go)."""
    flat = arr.reshape(-1)
    for i in range(0, flat.size, _CHUNK):
        chunk = flat[i:i + _CHUNK]
        finite = bool(np.isfinite(chunk).all())
        if release:
            release(chunk)
        if not finite:
            return False
    return True


def check_tensors(spec: ModelSpec, tensors: dict[str, np.ndarray], path=None, values: bool = True, release=None) -> None:
    """Raise one ZooError listing every problem: missing, extra, wrong shape or dtype, non-finite.

    `values=False` skips the scan for NaN/inf (save_weights does it on the file it wrote); `release`
    is all_finite's."""
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
        elif values and not all_finite(arr, release):
            problems.append(f"{name} holds NaN or infinite values")
    _raise_problems(spec, problems, path)


def _raise_problems(spec: ModelSpec, problems: list[str], path) -> None:
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


def atomic_output(path: Path) -> Path:
    """A fresh temporary name beside `path`, for write-then-rename; it names the writer's pid, so that the
    temporary files of writers killed before they could remove them are found and removed here first."""
    remove_stale_temps(path.parent)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def check_output_location(path, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: `path` (a file, or with `folder` a folder,
    made if missing) where something else is, or a place where no file can be made. Tried, not judged by
    permission bits: root passes those, and a read-only or virtual file system (/proc) does not show in them."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ZooError("exists and is not a folder", path)
    if not folder and path.is_dir():
        raise ZooError("is a folder: give a file name", path)
    if not folder and path.exists() and not path.is_file():
        raise ZooError("exists and is not a regular file", path)
    parent = path if folder else path.parent
    while folder and not parent.exists():  # it will be made: where it would be made must take it
        parent = parent.parent
    if not parent.is_dir():
        raise ZooError("output folder does not exist" if not parent.exists() else "is not a folder", parent)
    probe = atomic_output(parent / "probe")
    try:
        probe.touch(exist_ok=False)
    except OSError as e:
        raise ZooError(f"cannot write here: {e.strerror or e}", path) from None
    probe.unlink()
    return path


@contextmanager
def atomic_write(path):
    """A binary file to write that becomes `path` only once whole: on any failure nothing is left, and a
    refusal by the system (a full disk) is a ZooError naming `path`."""
    path = Path(path)
    tmp = atomic_output(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if os.fstat(f.fileno()).st_size != f.tell():  # numpy's tofile loses a failed write (a full disk) without a word
                raise OSError(errno.ENOSPC, "the file came out short (is the disk full?)")
        os.replace(tmp, path)
    except OSError as e:
        raise ZooError(f"cannot write: {e.strerror or e}", path) from None
    finally:
        tmp.unlink(missing_ok=True)


_TEMP = re.compile(r"\..+\.(\d+)\.[0-9a-f]{12}\.tmp")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove atomic_output's files in `folder` whose writer is no longer running (kill -9, power loss: they
    are full-size), and folders made under such a name (a multi-worker run's non-chief workers write their
    copy of the run there: zoo.finetune.distributed.writes_to); those of live processes stay. Returns what
    was removed."""
    stale = [p for p in folder.glob(".*.tmp") if (m := _TEMP.fullmatch(p.name)) and not _alive(int(m[1]))]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32", "uint8": "U8"}
_CODES = {np.dtype(name): (code, np.dtype(name).itemsize) for name, code in _DTYPES.items()}
_DIGEST_PLACEHOLDER = "0" * 64


def save_weights(path, spec: ModelSpec, tensors: dict[str, np.ndarray | Deferred], metadata: dict[str, str] | None = None,
                 pending_digests: dict | None = None, on_written=None, release=None) -> Path:
    """Check `tensors` against `spec`, write them atomically as safetensors, read back and verify.

    The file is sized up front; each array is written from where it lies and each Deferred computed
    straight into its place in the mapped file, so there is no serialised copy of the model
    (safetensors' save_file needs one) and a transform writes no intermediate array. Every value is
    scanned for NaN/inf as it is written, and the result is parsed by safetensors itself before it is
    renamed into place.

    `pending_digests` maps metadata keys to futures of sha256 hex digests still being computed (the
    source file's hash, on the other core): the header, reserved at a placeholder of the same width,
    is written last, once they are there. `on_written(nbytes)` is called as each tensor is in place;
    `release(chunk)` with each written part of an array (a mapped source's pages go: Imported.release).
    """
    path = Path(path)
    check_tensors(spec, tensors, path, values=False)  # names, shapes, dtypes; values as they are written
    pending = dict(pending_digests or {})
    meta = {k: str(v) for k, v in (metadata or {}).items()} | {k: _DIGEST_PLACEHOLDER for k in pending} | spec_metadata(spec)
    if not path.parent.is_dir():
        raise ZooError("output folder does not exist", path.parent)
    ordered = {n: tensors[n] for n in spec.tensors}
    header, offsets = _header(meta, ordered)
    tmp = atomic_output(path)
    try:
        with open(tmp, "w+b") as f:
            try:
                # reserve the blocks first: a full disk is then an error here, not a SIGBUS in the mapping
                os.posix_fallocate(f.fileno(), 0, len(header) + offsets[-1])
            except OSError as e:
                raise ZooError(f"cannot write: {e.strerror or e}", path) from None
            try:
                not_finite = _place(f, len(header), ordered, offsets, on_written or (lambda n: None), release)
            except OSError as e:  # pwrite's: the disk's I/O error
                raise ZooError(f"cannot write: {e.strerror or e}", path) from None
            _raise_problems(spec, [f"{name} holds NaN or infinite values" for name in sorted(not_finite)], path)
            for key, future in pending.items():
                meta[key] = _digest_value(key, future.result(), path)
            final, _ = _header(meta, ordered)
            assert len(final) == len(header)  # digests have the placeholder's width
            f.seek(0)
            f.write(final)
        _verify_written(tmp, spec, ordered, meta, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _header(meta: dict[str, str], tensors: dict) -> tuple[bytes, list[int]]:
    """The safetensors header (8-byte length + JSON, space-padded to 8 bytes) and the data offsets."""
    entries, offsets = {"__metadata__": meta}, [0]
    for name, t in tensors.items():
        code = _CODES.get(np.dtype(t.dtype).newbyteorder("<"))  # by dtype, not dtype.name: numpy 2's name is 20 us a call
        if code is None:
            raise ZooError(f"{name}: dtype {t.dtype} cannot be written")
        size = math.prod(t.shape) * code[1]
        entries[name] = {"dtype": code[0], "shape": list(t.shape), "data_offsets": [offsets[-1], offsets[-1] + size]}
        offsets.append(offsets[-1] + size)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


_POOLED = 1 << 25  # bytes of an array from which the pool writes it too (see _place)
_BUFFERED = 1 << 24  # a transform of at most this many bytes is computed into a reused buffer, then written


def _place(f, base: int, tensors: dict, offsets: list[int], on_written, release=None) -> list[str]:
    """Write each tensor into its place in the file, scanning it for NaN/inf while it is in cache; returns the
    names holding NaN/inf.

    Transforms (Deferred) and arrays of 32 MiB or more are placed on two threads, largest first (numpy's copies
    and pwrite release the GIL), the other arrays meanwhile in order by this thread. Two threads writing small
    arrays only contended for the file's lock (ResNet-50 from h5: 85-90 ms, 70 ms from one thread); a big one
    is a few long writes, and one thread's NaN scan runs while another writes (VGG16 from caffe-tensorflow's
    .npy: 0.23 s instead of 0.34, fresh processes, medians of 7)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    items = sorted(zip(tensors, tensors.values(), offsets, offsets[1:]), key=lambda item: item[3] - item[2], reverse=True)
    pooled, ours = [], []
    for item in items:
        (pooled if isinstance(item[1], Deferred) or item[3] - item[2] >= _POOLED else ours).append(item)
    not_finite = []

    def placed(item, bad):
        on_written(item[3] - item[2])  # here, not in the workers: progress is reported from one thread
        not_finite.extend([bad] if bad else [])

    with mmap.mmap(f.fileno(), base + offsets[-1]) as mapped, ThreadPoolExecutor(2) as pool:
        placer = _Placer(f.fileno(), base, mapped, release)
        pending = pool.map(placer.place, pooled)
        for item in ours:
            placed(item, placer.place(item))
        for item, bad in zip(pooled, pending):
            placed(item, bad)
    return not_finite


class _Placer:
    """Writes one tensor into the output file (`fd`, also `mapped`; data from `base`), from any thread.

    An array is written with pwrite from where it lies, a chunk at a time, `release(chunk)` after each (a mapped
    source's pages go). A transform of up to 16 MiB is computed into the thread's reused buffer and written with
    pwrite; a larger one straight into the mapped file, its pages let go behind it (they stay in the page cache),
    so the process never holds the whole model. A fresh page of a mapped file costs a fault and a zeroing pass
    that pwrite skips (ResNet-50 from torch, 53 kernels: 27,000 page faults and 0.15-0.18 s, 10,000 and 0.10-0.14
    s through the buffers)."""

    def __init__(self, fd: int, base: int, mapped, release=None):
        import threading

        self.fd, self.base, self.mapped, self.release = fd, base, mapped, release
        self.local = threading.local()

    def place(self, item) -> str | None:
        """(name, array or Deferred, start, end) -> the name if it holds NaN/inf, else None."""
        name, t, start, end = item
        if not isinstance(t, Deferred):
            return None if _write_array(self.fd, self.base + start, t, self.release) else name
        if end - start <= _BUFFERED:
            dst = self._buffer(t)
            t.fill(dst)
            return None if _write_array(self.fd, self.base + start, dst) else name
        dst = np.ndarray(t.shape, np.dtype(t.dtype).newbyteorder("<"), self.mapped, self.base + start)
        t.fill(dst)
        finite = all_finite(dst, lambda chunk: release_pages(self.mapped, chunk))
        del dst
        drop_pages(self.mapped, self.base + start, self.base + end)  # whole pages only: a neighbour's edge page stays
        return None if finite else name

    def _buffer(self, t: Deferred) -> np.ndarray:
        nbytes = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        if getattr(self.local, "buffer", None) is None or self.local.buffer.nbytes < nbytes:
            self.local.buffer = np.empty(nbytes, np.uint8)
        return self.local.buffer[:nbytes].view(np.dtype(t.dtype).newbyteorder("<")).reshape(t.shape)


_RELEASE_MIN = 1 << 21  # a smaller array's pages are left to its neighbours' releases


def _write_array(fd: int, offset: int, arr: np.ndarray, release=None) -> bool:
    """pwrite `arr`'s values, little-endian, at `offset`, a chunk at a time, each scanned for NaN/inf first and
    released after; whether all are finite. An array under 2 MiB is not released: a release drops the 2 MiB
    folios around it (zoo.mapped.release_pages), for a batch norm's vector mostly the pages of the kernels
    beside it, which the other threads were reading (faulted in again, with a TLB flush on both cores).
    The kernels' own releases drop those folios once they are written."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype != flat.dtype.newbyteorder("<"):  # big-endian values are written as safetensors stores them
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    finite = True
    for i in range(0, flat.size, _CHUNK):
        chunk = flat[i:i + _CHUNK]
        finite = finite and all_finite(chunk)
        view, at = memoryview(chunk).cast("B"), offset + i * flat.itemsize
        while view:
            written = os.pwrite(fd, view, at)
            view, at = view[written:], at + written
        if release and arr.nbytes >= _RELEASE_MIN:
            release(chunk)
    return finite


def _digest_value(key: str, value: str, path: Path) -> str:
    if len(value) != len(_DIGEST_PLACEHOLDER):
        raise ZooError(f"{key} is not a sha256 hex digest: {value!r}", path)
    return value


def _verify_written(tmp: Path, spec: ModelSpec, tensors: dict, meta: dict[str, str], path: Path) -> None:
    """safetensors itself must parse the file to the metadata, names, shapes and dtypes that were meant
    (the values were scanned for NaN/inf in the file's pages as they were written)."""
    from safetensors import safe_open

    with safe_open(tmp, framework="numpy") as f:
        if f.metadata() != meta or set(f.keys()) != set(tensors):
            raise ZooError("read-back check failed: header differs from what was written", path)
    check_tensors(spec, _views(map_file(tmp)), path, values=False)


@dataclass
class Weights:
    path: Path
    spec: ModelSpec
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]
    mapping: object = None  # the file's mmap when the tensors are views of it (load_weights(mapped=True))

    def release(self, view: np.ndarray) -> None:
        """Let the pages under `view` (of a mapped tensor) go once used; a no-op for tensors in memory."""
        release_pages(self.mapping, view)

    @property
    def classes(self) -> list[str] | None:
        return _classes(self.metadata, self.path)


def _classes(metadata: dict[str, str], path) -> list[str] | None:
    """The `classes` metadata: a JSON list of names, or absent."""
    raw = metadata.get("classes")
    try:
        classes = json.loads(raw) if raw else None
    except ValueError:
        classes = raw
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ZooError(f"its classes metadata is not a JSON list of names: {raw[:60]!r}", path)
    return classes


def read_header(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    if not Path(path).is_file():  # a folder, a FIFO (open would wait for a writer)
        raise ZooError("no such file" if not Path(path).exists() else "not a regular file", path)
    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError for any corrupt header
        raise ZooError(f"not a valid safetensors file ({e})", path) from None


def load_weights(path, spec_for, mapped: bool = False) -> Weights:
    """Read and fully verify a zoo weights file; `spec_for(metadata)` gives the spec it says it is for
    (zoo.registry.load_weights asks the registry).

    `mapped=True` gives read-only views of the memory-mapped file instead of copies: a reader that uses
    one tensor at a time and calls `Weights.release` never holds the whole model (export does this)."""
    from safetensors import safe_open

    path = Path(path)
    metadata = read_header(path)
    spec = spec_for(metadata)
    mapping = None
    try:
        if mapped:
            mapping = map_file(path)
            tensors = _views(mapping)
        else:
            with safe_open(path, framework="numpy") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise ZooError(f"cannot read tensors ({e})", path) from None
    check_tensors(spec, tensors, path, release=lambda chunk: release_pages(mapping, chunk))
    _classes(metadata, path)  # checked here: verify must not pass what export then fails on
    return Weights(path, spec, tensors, metadata, mapping)


def _views(mapping) -> dict[str, np.ndarray]:
    """Each tensor of a safetensors file (already parsed by safetensors itself) as a view of its mapping."""
    codes = {code: np.dtype(name).newbyteorder("<") for name, code in _DTYPES.items()}
    header_len = int.from_bytes(mapping[:8], "little")
    header = json.loads(mapping[8:8 + header_len])
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        dtype = codes[entry["dtype"]]
        start, end = entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        tensors[name] = np.frombuffer(mapping, dtype, count, 8 + header_len + start).reshape(entry["shape"])
    return tensors
