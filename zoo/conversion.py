"""`zoo convert`: pick a weight source, read the foreign file, write verified safetensors."""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoo.errors import ZooError
from zoo.layouts import Deferred
from zoo.plugins import PluginFailure, PluginInfo, call, get_plugins, warn
from zoo.progress import bar
from zoo.registry import get_spec
from zoo.sources import Imported, WeightSource
from zoo.spec import ModelSpec
from zoo.weights import check_output_location, file_digest, save_weights


@dataclass
class ConvertResult:
    output: Path
    spec: str
    fingerprint: str
    source: str
    source_sha256: str | None  # None when not computed (see wants_sha256)
    num_params: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def weight_sources() -> dict[str, tuple[PluginInfo, WeightSource]]:
    return get_plugins().provided("zoo_weight_sources")


def pick_source(path: Path, name: str | None) -> tuple[PluginInfo, WeightSource]:
    sources = weight_sources()
    if name:
        if name not in sources:
            raise ZooError(f"unknown weight source {name!r}; known: {', '.join(sorted(sources))}")
        return sources[name]
    with open(path, "rb") as f:
        head = f.read(4096)
    found, failed = [], []
    for info, source in sources.values():
        try:  # one plugin's broken sniff must not stop the others recognising the file
            if call(info, f"weight source {source.name!r} recognising the file", lambda s=source: bool(s.sniff(path, head))):
                found.append((info, source))
        except PluginFailure as e:
            failed.append(e)
    if len(found) != 1:
        what = "no weight source recognises it" if not found else "several sources claim it: " + ", ".join(s.name for _, s in found)
        broken = f" ({'; '.join(e.args[0] for e in failed)})" if failed else ""
        raise ZooError(f"{what}{broken}; name one: zoo convert {{{','.join(sorted(sources))}}} {path}", path)
    for e in failed:
        warn(e)
    return found[0]


def default_output(path: Path) -> Path:
    return path.with_name(path.name.split(".")[0] + ".safetensors")


def wants_sha256(filename: str) -> bool:
    """Whether the source's sha256 can tell the user something: torch hub's hash prefix in the name, or the
    name of a spec's published reference file. Hashing 244 MB costs ~0.35 s of a core, more than the rest
    of a conversion, so other files are hashed only on request (--sha256)."""
    from zoo.registry import all_specs

    return bool(_HASH_IN_NAME.search(filename)) or any(
        filename in s.provenance.get("reference_files", {}) for s in all_specs().values())


def convert(path, source: str | None = None, output=None, spec: str | ModelSpec | None = None,
            options: dict | None = None, sha256: bool | None = None) -> ConvertResult:
    """Convert `path` to verified safetensors at `output`; `sha256` records the source's hash (default: wants_sha256)."""
    path = Path(path)
    if not path.is_file():
        raise ZooError("no such file" if not path.exists() else "not a regular file", path)
    output = Path(output) if output else default_output(path)
    if output.resolve() == path.resolve():
        raise ZooError("output would overwrite the input", output)
    check_output_location(output)  # before reading: a folder there was found only after writing 244 MB
    requested = get_spec(spec) if spec else None
    info, reader = pick_source(path, source)
    unknown = sorted(set(options or {}) - {"map"} - set(getattr(reader, "options", {})))
    if unknown:
        takes = ", ".join(f"--{k}" for k in getattr(reader, "options", {})) or "none"
        raise ZooError(f"source {reader.name!r} does not take {', '.join('--' + k for k in unknown)} (its options: {takes})")
    if requested and reader.produces and requested.id not in reader.produces:
        raise ZooError(f"source {reader.name!r} produces {', '.join(reader.produces)}, not {requested.id}", path)
    # hash the source on the other core while it is parsed and written (hashlib releases the GIL)
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(file_digest, path) if (wants_sha256(path.name) if sha256 is None else sha256) else None
        try:
            imported = call(info, f"weight source {reader.name!r} reading the file", reader.read, path, requested,
                            dict(options or {}), expected=(ZooError, OSError), returns=Imported, path=path)
        except OSError as e:
            raise ZooError(f"cannot read: {e.strerror or e}", path) from None
        result = _write(path, output, requested, imported, info, reader, digest)
    return result


def _write(path, output, requested, imported, info, reader, digest) -> ConvertResult:
    target = imported.spec if isinstance(imported.spec, ModelSpec) else get_spec(imported.spec)
    if requested and requested.id != target.id:
        raise ZooError(f"the file holds {target.id}, not {requested.id}", path)
    tensors, cast = {}, {}
    for name, arr in imported.tensors.items():
        want = np.dtype(target.tensors[name].dtype) if name in target.tensors else arr.dtype
        if arr.dtype != want and np.issubdtype(arr.dtype, np.floating):
            cast.setdefault(f"{arr.dtype} to {want}", []).append(name)
            # a Deferred transform casts as it writes
            arr = dataclasses.replace(arr, dtype=want) if isinstance(arr, Deferred) else arr.astype(want)
        tensors[name] = arr
    imported.notes += [f"converted {how}: {', '.join(names)}" for how, names in cast.items()]
    metadata = imported.metadata | {
        "source_format": imported.source_format or reader.format,
        "source_file": path.name,
        "plugin": info.name,
        "plugin_package": info.package,
        "plugin_version": info.version,
        "weight_source": reader.name,
        "notes": json.dumps(imported.notes),
    }
    total = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors.values())
    with bar(total, f"converting {path.name}", "B") as progress:  # the source: a store's output has a temporary name
        save_weights(output, target, tensors, metadata, pending_digests={"source_sha256": digest} if digest else {},
                     on_written=progress.update, release=imported.release)
    sha256 = digest.result() if digest else None
    notes = imported.notes + (provenance_notes(target, path.name, sha256) if sha256 else [])
    return ConvertResult(output, target.id, target.fingerprint, reader.name, sha256, target.num_params, notes)


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torch hub: alexnet-owt-7be5be79.pth


def provenance_notes(spec: ModelSpec, filename: str, sha256: str) -> list[str]:
    """Is this the published file? Compares the hash with the spec's reference files and the file's name."""
    notes = []
    for ref, hashes in spec.provenance.get("reference_files", {}).items():
        full, prefix = hashes.get("sha256"), hashes.get("sha256_prefix")
        if (full and sha256 == full) or (prefix and sha256.startswith(prefix)):
            notes.append(f"genuine: sha256 {sha256[:16]}... is that of the published {ref} ({spec.provenance.get('origin', '')})")
        elif ref == filename and (full or prefix):
            notes.append(f"WARNING: named {ref} but its sha256 ({sha256[:16]}...) is not the published file's")
    named = _HASH_IN_NAME.search(filename)
    if named and not notes:
        if sha256.startswith(named.group(1)):
            notes.append(f"sha256 starts with {named.group(1)}, as the file's name says")
        else:
            notes.append(f"WARNING: the name says sha256 {named.group(1)}..., the file's is {sha256[:len(named.group(1))]}...: "
                         "not the file published under this name (renamed, re-saved or corrupted)")
    return notes
