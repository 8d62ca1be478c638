"""Built-in plugin `h5`: Keras weights in HDF5, and Keras 3's `.keras` archive.

- Keras 3 `model.save_weights("x.weights.h5")`: `layers/<class name, numbered>/vars/0..n`; the layer's real
  name is the `name` attribute of `vars` (written since a Keras 3 release; earlier files lack it).
- Keras 3 `model.save("x.keras")`: a zip of `metadata.json`, `config.json` and `model.weights.h5` (the layout
  above), stored uncompressed. The h5 is read where it lies in the mapped archive. `config.json` is only parsed
  as JSON (nothing in it is deserialized or run): it gives the layers' order and, where `vars` has no `name`,
  their names.
- legacy h5, as Keras 1 and 2 `save_weights` and `model.save` (also Keras 3's) write it: `[model_weights/]<layer>`
  groups, the root's `layer_names` attribute listing the model's layers in order, each group's `weight_names`
  its datasets by path (`conv1/kernel:0` nested under the group since Keras 2; `block1_conv1_W_1:0` in Keras 1).

Keras' layout is zoo's canonical one, so tensors are taken as they are. A layer's variables are taken by
position, as Keras itself loads these files (the names inside differ across Keras versions). Layers are matched
to the spec by name, else by order and shape (printed), or by `--map`. Keras loads a legacy file by order: the
file's layers with weights against the model's, in `model.layers` order. That order is the spec's own for a
chain, not for a graph with branches, so for files that list the writer's layers in its model order (legacy h5,
`.keras`) the spec's weighted layers are also tried in the order Keras lists that graph (`keras_order`).

A dataset stored contiguously (h5py's default, and what Keras writes) is taken as a zero-copy view of
the memory-mapped file, which the core writes out from there and lets go behind it (Imported.release):
no copy of the model in memory (ResNet-50: peak 1.7x the file's size before, 100 MB read through
HDF5 into fresh memory and then copied again). Other layouts (chunked, compressed, compact) are read
through h5py. As Keras' own loader does, links to other files and datasets stored outside the file are
refused: HDF5 would follow them to any file on disk. The datasets to read are found first and their declared
sizes checked against what the file can hold (DeclaredBytes) before any is read.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.mapped import INFLATE_RATIO, MappedZip
from zoo.sources import Imported, Params, WeightSource, fit_params, map_file, mapping_notes, release_pages
from zoo.spec import ModelSpec

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_WEIGHTS, _CONFIG = "model.weights.h5", "config.json"  # a .keras archive's members (keras.src.saving.saving_lib)


def _natural(name: str):
    """conv2d, conv2d_1, conv2d_2, ..., conv2d_10: Keras' creation order of auto-named layers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _names(node, attr: str) -> list[str]:
    """A list-of-names attribute as Keras' savers write it: whole, or split into attr0, attr1, ... when it
    would pass HDF5's 64 KB object header limit (legacy_h5_format.load_attributes_from_hdf5_group)."""
    if attr in node.attrs:
        return [_text(n) for n in node.attrs[attr]]
    names, chunk = [], 0
    while f"{attr}{chunk}" in node.attrs:
        names += [_text(n) for n in node.attrs[f"{attr}{chunk}"]]
        chunk += 1
    return names


def _snake(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: how Keras 3's saver names a layer's h5 group after its class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


class Stored(NamedTuple):
    """A dataset as its header declares it, read once through h5py's low-level API (h5py's Dataset objects
    read their creation properties again on every open: 4x the time of the whole read for ResNet-50's 320)."""

    id: object  # h5py.h5d.DatasetID
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    contiguous: bool
    filtered: bool
    elsewhere: bool  # external storage or a virtual dataset: HDF5 would read other files
    stored: int  # bytes of storage written
    offset: int | None  # of contiguous storage in the file
    ieee: bool  # stored in the IEEE format numpy reads as it is

    @property
    def declared(self) -> int:
        """The bytes its shape and type declare."""
        return math.prod(self.shape) * self.dtype.itemsize


def _stored(dataset_id) -> Stored:
    import h5py

    plist, dtype = dataset_id.get_create_plist(), dataset_id.dtype
    layout = plist.get_layout()
    return Stored(dataset_id, _name(dataset_id), tuple(dataset_id.shape), dtype, layout == h5py.h5d.CONTIGUOUS,
                  plist.get_nfilters() > 0, bool(plist.get_external_count()) or layout == h5py.h5d.VIRTUAL,
                  dataset_id.get_storage_size(), dataset_id.get_offset(), dataset_id.get_type() == _native_type(dtype))


@functools.cache
def _native_type(dtype: np.dtype):
    """HDF5's type for values numpy reads as they are (made once per dtype: 10 us a call)."""
    import h5py

    return h5py.h5t.py_create(dtype)


def _name(obj) -> str:
    """An h5py object's or low-level id's path in the file."""
    import h5py

    return obj.name if hasattr(obj, "name") else _text(h5py.h5i.get_name(obj) or b"?")


class DeclaredBytes:
    """Bounds on what the datasets to be read declare, checked before any is read. HDF5 gives a chunk never
    written the fill value and gzip inflates zeros a thousandfold, so a 100 KB file can declare gigabytes in
    tensors each within a spec's size:

    - a dataset with no storage (never written), or uncompressed and only partly stored, is refused;
    - the uncompressed ones together declare no more than the h5's `size`: their bytes are in it;
    - the compressed (filtered) ones together no more than INFLATE_RATIO times it, as zip members (float
      weights deflate by ~10%);
    - all together no more than `most`, the largest candidate spec's tensors at 8 bytes a value (None: no
      such bound)."""

    def __init__(self, path, size: int, most: int | None):
        self.path, self.size, self.most = path, size, most

    def check(self, datasets: Iterable[Stored]) -> None:
        plain = packed = 0
        for d in datasets:
            if d.declared and not d.stored:
                raise ZooError(f"{d.name} was never written (no storage: HDF5 would make up its {d.declared:,} bytes "
                               "from the fill value); not read", self.path)
            if not d.filtered and d.stored < d.declared:
                raise ZooError(f"{d.name} is only partly written ({d.stored:,} of {d.declared:,} bytes stored); not read", self.path)
            packed, plain = (packed + d.declared, plain) if d.filtered else (packed, plain + d.declared)
        if plain > self.size:
            raise ZooError(f"its uncompressed datasets declare {plain:,} bytes, more than the file's {self.size:,} (corrupt)", self.path)
        if packed > INFLATE_RATIO * self.size:
            raise ZooError(f"its compressed datasets declare {packed:,} bytes, over {INFLATE_RATIO}x the file's {self.size:,} "
                           "(weights deflate by far less); not read", self.path)
        if self.most is not None and plain + packed > self.most:
            raise ZooError(f"its datasets declare {plain + packed:,} bytes, more than all the tensors of the spec(s) it "
                           f"could be for ({self.most:,})", self.path)


_MAX_WALKED = 1 << 16  # links recorded by one walk: Keras' ResNet-50 has 676


class _Reader:
    def __init__(self, path, max_bytes: int, data=b""):
        self.path, self.max_bytes, self.data = path, max_bytes, data  # data: the mapped file (map_file) or archive member
        self.links: dict[str, int] = {}  # path in the file -> link type (walk)
        self.children: dict[str, list[str]] = {}  # path of a group the walk went through -> its links' names

    def dataset(self, node) -> Stored:
        """`node`, checked as a tensor to read (declarations only: nothing is read): a float dataset stored in this
        file, within the largest tensor of a registered spec."""
        import h5py

        if not isinstance(node, h5py.h5d.DatasetID):
            raise ZooError(f"{_name(node)} is not a dataset", self.path)
        d = _stored(node)
        if d.elsewhere:
            raise ZooError(f"{d.name} is stored in other files; not read", self.path)
        if not np.issubdtype(d.dtype, np.floating):
            raise ZooError(f"{d.name} is {d.dtype}, not float", self.path)
        if d.declared > self.max_bytes:  # a corrupt header must not allocate gigabytes
            raise ZooError(f"{d.name} claims {d.declared:,} bytes, more than any tensor of a registered spec", self.path)
        return d

    def array(self, d: Stored) -> np.ndarray:
        """The values of a dataset checked by `dataset` and DeclaredBytes: the bytes as they lie in the file when
        stored contiguously in the IEEE format numpy reads (not a custom float HDF5 would convert), else read by h5py."""
        import h5py

        count = math.prod(d.shape)
        if d.contiguous and d.ieee and d.offset is not None and count and d.offset + count * d.dtype.itemsize <= len(self.data):
            return np.frombuffer(self.data, d.dtype, count, d.offset).reshape(d.shape)
        return h5py.Dataset(d.id)[()]

    def walk(self, root) -> None:
        """Record every link under `root` with its type, in one walk of the file (H5Lvisit, 3 ms for ResNet-50's
        676, where looking each path's links up in turn took 30 ms). It does not descend through soft links: paths
        it did not meet are looked up link by link. A file of more links than any Keras model has is not walked."""
        links = {}

        def record(name: bytes, info):
            links[name.decode("utf8", "surrogateescape")] = info.type
            return True if len(links) > _MAX_WALKED else None  # anything but None stops the walk

        root.id.links.visit(record, info=True)
        self.links = links if len(links) <= _MAX_WALKED else {}
        for path in self.links:
            parent, _, name = path.rpartition("/")
            self.children.setdefault(parent, []).append(name)

    def names_in(self, group, at: str | None = None) -> list[str]:
        """The names linked from `group` (at `at` in the file, if known), as the walk met them (no HDF5 call), else as
        h5py lists them (a group the walk did not go through: one reached through a soft link, or one it found empty)."""
        met = self.children.get((group.name if at is None else at).lstrip("/"))
        return met if met is not None else list(group)

    def member(self, group, path: str, at: str | None = None):
        """group[path], a path the file names, resolved as Keras' safe_get_h5_group/dataset do: each part must be
        there, and a link to another file is refused. The links are looked at before any is followed, and the
        object is then opened in one lookup: a Group, or a dataset's low-level id (for `dataset`). `at`: the group's
        path in the file, where the caller knows it (h5py asks HDF5 for it each time)."""
        import h5py

        kind = self.links.get(f"{group.name if at is None else at}/{path}".lstrip("/"))
        walked = kind == h5py.h5l.TYPE_HARD  # met by the walk, hard links all the way: they stay in this file
        if kind is None:  # not met by the walk: a path through a soft link, or none
            kind = self._link_by_link(group, path)
        if kind == h5py.h5l.TYPE_EXTERNAL:
            raise self._elsewhere(group, path)
        found = h5py.h5o.open(group.id, path.encode())
        if not walked and found.fileno != group.id.fileno:  # a soft link to an external one: nothing is read from it
            raise self._elsewhere(group, path)
        return h5py.Group(found) if isinstance(found, h5py.h5g.GroupID) else found

    def _elsewhere(self, group, path: str) -> ZooError:
        return ZooError(f"{group.name.rstrip('/')}/{path} links to another file; not read", self.path)

    def _link_by_link(self, group, path: str) -> int:
        """The type of the last link of group/path, each link on the way looked at before it is followed
        (H5Lget_info does not follow the last link of its path); links to other files are refused."""
        import h5py

        parts, link = path.split("/"), None
        for i in range(len(parts)):
            try:
                link = group.id.links.get_info("/".join(parts[:i + 1]).encode()) if parts[i] else None
            except (KeyError, RuntimeError):  # h5py's "name doesn't exist"
                link = None
            if link is None:
                raise ZooError(f"{group.name.rstrip('/')}/{path} is named in the file but not in it", self.path)
            if link.type == h5py.h5l.TYPE_EXTERNAL:
                raise self._elsewhere(group, path)
        return link.type

    def config_layers(self, config) -> dict[str, tuple[str, dict]]:
        """{h5 group: (layer name, layer config)} of a Functional or Sequential config, in model.layers order. Keras 3's
        saver names each group after the layer's class, numbered on repeats (saving_lib._save_container_state)."""
        out, used = {}, {}
        try:  # a subclassed model's config has no layers: its groups keep their order and names
            for layer in (config or {}).get("config", {}).get("layers", ()):
                key = _snake(layer["class_name"])
                used[key] = used.get(key, -1) + 1
                out[f"{key}_{used[key]}" if used[key] else key] = (str(layer["config"]["name"]), layer)
        except (AttributeError, KeyError, TypeError):
            raise ZooError(f"{_CONFIG} is not a Keras model's config", self.path) from None
        return out

    def keras3(self, group, prefix="", config=None) -> dict:
        import h5py

        named, at = self.config_layers(config), group.name
        present = set(self.names_in(group, at))
        layers = {}
        for key in [k for k in named if k in present] + sorted(present - set(named), key=_natural):
            sub, sub_at = self.member(group, key, at), f"{at}/{key}"
            if not isinstance(sub, h5py.Group):  # a dataset beside the layers' groups is no layer
                continue
            members = set(self.names_in(sub, sub_at))
            variables = self.member(sub, "vars", sub_at) if "vars" in members else None
            n = len(self.names_in(variables, f"{sub_at}/vars")) if variables is not None else 0
            name, inner = named.get(key, (key, None))
            if n or "layers" in members:  # the name is used (an attribute read costs as much as opening a dataset)
                name = name if variables is None else _text(variables.attrs.get("name", name))
            name = prefix + name
            if n:
                layers[name] = {str(i): self.dataset(self.member(variables, str(i), f"{sub_at}/vars")) for i in range(n)}
            if "layers" in members:  # a nested model
                layers.update(self.keras3(self.member(sub, "layers", sub_at), name + "/", inner))
        return layers

    def legacy(self, root) -> dict:
        import h5py

        if _text(root.attrs.get("backend", "")) == "theano":  # Keras 2 flipped them on loading; Keras 3 does not
            raise ZooError("written with Keras' Theano backend, whose convolution kernels are flipped; not read", self.path)
        layers = {}
        for name in _names(root, "layer_names"):
            group = self.member(root, name)
            if not isinstance(group, h5py.Group):
                raise ZooError(f"{_name(group)} is listed as a layer but is not a group", self.path)
            weight_names = _names(group, "weight_names")
            if weight_names:  # Keras' loader skips layers without weights and pairs the rest with the model's in order
                layers[name] = {str(i): self.dataset(self.member(group, wn)) for i, wn in enumerate(weight_names)}
        return layers


class _InPlace(io.RawIOBase):
    """A read-only file over a buffer, for h5py: the archive's h5 is read where it lies, not copied out."""

    def __init__(self, buffer):
        super().__init__()
        self.buffer, self.pos = memoryview(buffer), 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = offset + (0, self.pos, len(self.buffer))[whence]
        return self.pos

    def readinto(self, out):
        chunk = self.buffer[self.pos:self.pos + len(out)]
        out[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _keras_archive(path, data):
    """(model.weights.h5's bytes, config.json parsed) of a `.keras` zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {_WEIGHTS, _CONFIG} <= names:
                npz = " (its weights are model.weights.npz; zoo reads the h5 form)" if "model.weights.npz" in names else ""
                raise ZooError(f"a zip without {_WEIGHTS} and {_CONFIG}: not a Keras .keras archive{npz}", path)
            members = MappedZip(archive, data, path)
            return members.read(_WEIGHTS), json.loads(bytes(members.read(_CONFIG)))
    except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:  # deep JSON: RuntimeError
        raise ZooError(f"not a readable .keras archive ({type(e).__name__}: {e})", path) from None


def read_h5_params(path, max_bytes: int, data, max_total: int | None = None) -> tuple[Params, bool]:
    """({layer: {position: array}}, whether the layers are listed in the writer's model.layers order: legacy
    files and .keras archives, which Keras loads by that order). `data` is the file, mapped (map_file):
    contiguous datasets are views of it. Each tensor declares at most `max_bytes`; all at most `max_total`
    (DeclaredBytes), checked before any is read."""
    import h5py

    h5, config = _keras_archive(path, data) if data[:4] == _ZIP_MAGIC else (data, None)
    reader = _Reader(path, max_bytes, h5)
    try:
        with h5py.File(path if config is None else _InPlace(h5), "r") as f:
            reader.walk(f)
            if "layers" in f and "layer_names" not in f.attrs:
                datasets, ordered = reader.keras3(reader.member(f, "layers"), config=config), bool(reader.config_layers(config))
            else:
                root = reader.member(f, "model_weights") if "model_weights" in f else f
                if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
                    raise ZooError("an HDF5 file, but neither Keras 3 weights (layers/...) nor a legacy Keras h5 (layer_names)", path)
                datasets, ordered = reader.legacy(root), True
            DeclaredBytes(path, len(h5), max_total).check(d for layer in datasets.values() for d in layer.values())
            return {name: {i: reader.array(d) for i, d in layer.items()} for name, layer in datasets.items()}, ordered
    except ZooError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:  # h5py's errors for corrupt files
        raise ZooError(f"not a readable Keras HDF5 file ({type(e).__name__}: {e})", path) from None


def keras_order(spec: ModelSpec, swap_adds: bool = False) -> list[str]:
    """The spec's weighted layers in the order Keras lists a functional model's layers (model.layers, which its h5
    saver writes and its by-order loader follows; keras.src.ops.function.map_graph, as Keras 2's Network did): by
    decreasing depth (the longest path to the output), ties in the order a depth-first walk from the output first
    meets them, each layer's inputs in order. `swap_adds`: each add's inputs the other way round, the same network
    as another author wired it (Keras 2.2's and Keras 3's keras.applications ResNet50)."""
    inputs = {n.name: n.inputs[::-1] if swap_adds and n.kind == "add" else n.inputs for n in spec.nodes}
    depth = dict.fromkeys(inputs, 0)
    for name in reversed(inputs):  # listed inputs-first: a layer's depth is final before its inputs are reached
        for i in inputs[name]:
            if i in depth:
                depth[i] = max(depth[i], depth[name] + 1)
    met, stack = {}, [spec.nodes[-1].name]
    while stack:
        name = stack.pop()
        if name in inputs and name not in met:
            met[name] = len(met)
            stack += reversed(inputs[name])
    return sorted((n.name for n in spec.weighted_nodes), key=lambda n: (-depth[n], met[n]))


def _keras_orders(spec: ModelSpec) -> list[tuple[list[str], str]]:
    """fit_params' extra orders for a file listing the writer's layers in its model order: the spec's weighted layers
    as Keras lists its graph, with the adds' inputs either way round (Keras loads such a file in that order)."""
    said = f"the file lists its layers as Keras lists {spec.id}'s graph"
    return [(keras_order(spec), f"{said}, and Keras loads it in that order"),
            (keras_order(spec, swap_adds=True), f"{said}, its adds' inputs the other way round, and Keras loads it in that order")]


def _headless(layers: Params, candidates: list[ModelSpec], path, orders) -> list[str]:
    """The specs the file fits once given a stand-in classifier (zero-strided: no memory): what a Keras
    include_top=False file is of."""
    found = []
    for s in candidates:
        if s.head in layers:
            continue
        head = {str(i): np.broadcast_to(np.float32(0), t.shape) for i, t in enumerate(s.node(s.head).tensors)}
        try:
            fit_params(layers | {s.head: head}, "keras", s, path, orders=orders)
        except ZooError:
            continue
        found.append(f"{s.id} without its classifier {s.head}")
    return found


class KerasH5(WeightSource):
    name = "h5"
    format = "Keras HDF5 weights (.weights.h5, legacy Keras 1/2/3 .h5) and Keras 3 .keras archives"
    extensions = (".h5", ".hdf5", ".keras")

    def sniff(self, path, head):
        # a .keras zip starts with metadata.json ({"keras_version": ...}); the weights come after config.json
        return head.startswith(_HDF5_MAGIC) or (head.startswith(_ZIP_MAGIC) and (b"keras_version" in head or _WEIGHTS.encode() in head))

    def read(self, path, spec, options):
        from zoo.registry import all_specs

        candidates = [spec] if spec else list(all_specs().values())
        largest = max(t.size * np.dtype(np.float64).itemsize for s in candidates for t in s.tensors.values())
        most = max(sum(t.size for t in s.tensors.values()) for s in candidates) * np.dtype(np.float64).itemsize
        data = map_file(path)
        layers, ordered = read_h5_params(path, largest, data, most)
        if not layers:
            raise ZooError("holds no layer with weights", path)
        orders = _keras_orders if ordered else None
        try:
            fit = fit_params(layers, "keras", spec, path, mapping=options.get("map"), candidates=candidates, orders=orders)
        except ZooError:
            headless = [] if options.get("map") else _headless(layers, candidates, path, orders)
            if not headless:
                raise
            raise ZooError(f"the weights are {' or '.join(headless)} (a Keras include_top=False file, _notop); "
                           "no registered spec is headless", path) from None
        return Imported(fit.spec, fit.tensors, notes=mapping_notes(fit), source_format="keras-h5",
                        release=lambda arr: release_pages(data, arr))


@hookimpl
def zoo_weight_sources():
    return [KerasH5()]
