"""The local weights store: verified safetensors kept by spec, fingerprint and source file, found by name.

Layout under `home()` (ZOO_HOME, default $XDG_CACHE_HOME/zoo or ~/.cache/zoo):

    weights/<family>@<version>/<fingerprint>/<source file stem>.safetensors
    downloads/                  what `zoo fetch` is downloading (zoo.fetch)

An entry's name is `<family>@<version>/<stem>` (`resnet50@torchvision/resnet50-0676ba61`). A conversion is
written beside its final place and renamed into it, so a reader never sees a partial file and concurrent
writers of one entry leave one of their complete files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ZooError
from zoo.registry import get_spec
from zoo.spec import ModelSpec
from zoo.weights import atomic_output, read_header

RANDOM, STORED = "random", "stored"  # the weights values that name no file


def home() -> Path:
    if os.environ.get("ZOO_HOME"):
        return Path(os.environ["ZOO_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo"


@dataclass
class Entry:
    name: str  # family@version/stem
    path: Path
    metadata: dict[str, str]

    @property
    def spec_id(self) -> str:
        return self.name.split("/")[0]

    @property
    def current(self) -> bool:
        """Whether the registered spec still has this entry's fingerprint (a file of an older zoo may not)."""
        try:
            return get_spec(self.spec_id).with_num_classes(int(self.metadata["num_classes"])).fingerprint == self.metadata["fingerprint"]
        except (ZooError, KeyError, ValueError):
            return False

    def to_dict(self) -> dict:
        keys = ("fingerprint", "num_classes", "source_file", "source_format", "source_sha256")
        return {"name": self.name, "path": str(self.path), "size": self.path.stat().st_size, "current": self.current} | \
            {k: self.metadata.get(k) for k in keys}


def entries() -> list[Entry]:
    """Every stored file, by name; temporary files of writes in progress are not entries."""
    found = []
    for path in sorted((home() / "weights").glob("*@*/*/[!.]*.safetensors")):
        try:
            metadata = read_header(path)
        except ZooError:
            continue  # removed since the glob, or not ours: never an entry
        found.append(Entry(f"{path.parent.parent.name}/{path.stem}", path, metadata))
    return found


def find(name: str) -> list[Entry]:
    """The entries `name` names: `family@version/stem` one, `family@version` or `family` (its default version) all of it."""
    spec_part, _, stem = name.partition("/")
    spec_id = get_spec(spec_part).id if "@" not in spec_part else spec_part
    return [e for e in entries() if e.spec_id == spec_id and (not stem or e.path.stem == stem)]


def one(name: str) -> Entry:
    found = find(name)
    if len(found) != 1:
        what = f"names {len(found)} stored files ({', '.join(e.name for e in found)}); name one" if found else \
            "nothing stored under this name (zoo weights lists what is)"
        raise ZooError(what, name)
    return found[0]


def preferred(spec: ModelSpec) -> Entry:
    """The stored weights to use for `spec`: those converted from its first published file that is stored,
    else the only stored file; several others, or none, is an error saying what to do."""
    found = [e for e in find(spec.id) if e.current and e.metadata.get("num_classes") == str(spec.num_classes)]
    published = list(spec.provenance.get("reference_files", {}))
    ranked = sorted((published.index(e.metadata.get("source_file")), e.name, e) for e in found if e.metadata.get("source_file") in published)
    if ranked:
        return ranked[0][2]
    if len(found) == 1:
        return found[0]
    if found:
        raise ZooError(f"several stored weights for {spec.id}: {', '.join(e.name for e in found)}; pass --weights NAME")
    raise ZooError(f"no stored weights for {spec.id}: `zoo fetch {spec.id}` downloads the published ones, "
                   f"`zoo convert FILE --store` stores yours; or pass --weights FILE, or --weights random")


def resolve(weights, model) -> object:
    """What `weights` means to build `model`: None (random initialisation) for None or "random"; an existing file
    as it is; the preferred stored file of `model`'s spec for "stored", of a spec for its name (`alexnet@bvlc`);
    the stored entry `family@version/stem`."""
    if weights is None or weights == RANDOM:
        return None
    if not isinstance(weights, (str, os.PathLike)) or Path(weights).exists():
        return weights  # a Weights object, or a file
    name = str(weights)
    if name == STORED:
        if model is None:
            raise ZooError('weights="stored" needs the model\'s name')
        return preferred(get_spec(model)).path
    try:  # a stored name starts with a model's: family[@version][/stem]
        spec = get_spec(name.split("/")[0])
    except ZooError:
        raise ZooError("no such file, nor stored weights of that name (zoo weights lists them)", weights) from None
    return one(name).path if "/" in name else preferred(spec).path


def take(weights, model, doing: str) -> object:
    """resolve(), for a command that takes weights (zoo finetune, zoo features): when a name (or "stored") stood
    for a stored file, it says which one on stderr, `zoo: <doing> the stored weights <file>`."""
    path = resolve(weights, model)
    if path is not None and str(path) != str(weights):
        print(f"zoo: {doing} the stored weights {path}", file=sys.stderr, flush=True)
    return path


def incoming() -> Path:
    """Where conversions into the store are written: the entry's place is known once they found the spec."""
    return home() / "weights" / ".incoming"


def add(source_path, **convert_options) -> tuple[object, Entry]:
    """Convert a foreign file (zoo.conversion.convert's options) into the store, the source's sha256 recorded:
    (ConvertResult, Entry)."""
    from zoo.conversion import convert

    incoming().mkdir(parents=True, exist_ok=True)
    temp = atomic_output(incoming() / Path(source_path).name).with_suffix(".safetensors")
    try:
        result = convert(source_path, output=temp, **(convert_options | {"sha256": True}))  # a stored file names its source's hash
        metadata = read_header(temp)
        stem = Path(source_path).name.split(".")[0]
        path = home() / "weights" / metadata["spec"] / metadata["fingerprint"] / f"{stem}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, path)  # the same file system: atomic, and the last of concurrent writers wins whole
    finally:
        temp.unlink(missing_ok=True)
    result.output = path
    return result, Entry(f"{metadata['spec']}/{stem}", path, metadata)


def remove(name: str) -> Entry:
    entry = one(name)
    entry.path.unlink()
    for folder in (entry.path.parent, entry.path.parent.parent):  # leave no empty folders behind
        try:
            folder.rmdir()
        except OSError:
            break
    return entry
