"""The model registry: every spec contributed through the `zoo_model_specs` hook, by `family@version`."""

from __future__ import annotations

from zoo import weights
from zoo.errors import ZooError
from zoo.plugins import get_plugins
from zoo.spec import ModelSpec, fingerprint_v1
from zoo.weights import Weights


def all_specs() -> dict[str, ModelSpec]:
    """Every registered spec by id. Each plugin's specs are parsed once, when it is accepted (zoo.plugins: parsing
    and inferring a graph takes 30 ms for the built-in nine, more than the rest of a small conversion)."""
    return {spec_id: spec for spec_id, (_, spec) in get_plugins().provided("zoo_model_specs").items()}


def families() -> dict[str, list[ModelSpec]]:
    out: dict[str, list[ModelSpec]] = {}
    for spec in all_specs().values():
        out.setdefault(spec.family, []).append(spec)
    for versions in out.values():
        versions.sort(key=lambda s: (not s.default, s.version))  # default first
    return out


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """`alexnet` (the family's default version) or `alexnet@torchvision`."""
    if isinstance(name, ModelSpec):
        return name
    family, _, version = name.partition("@")
    versions = families().get(family)
    if not versions:
        raise ZooError(f"unknown model {name!r}; known: {', '.join(sorted(families())) or 'none'}")
    if not version:
        return versions[0]
    for spec in versions:
        if spec.version == version:
            return spec
    raise ZooError(f"unknown version {name!r}; versions of {family}: {', '.join(s.id for s in versions)}")


# --- weights files name their spec: the registry finds it ---------------------------------------------


def load_weights(path, mapped: bool = False) -> Weights:
    """Read and fully verify a zoo weights file against the registered spec it names (zoo.weights)."""
    return weights.load_weights(path, lambda metadata: spec_of(path, metadata), mapped)


def spec_of(path, metadata: dict[str, str]) -> ModelSpec:
    """The spec a weights file was made for, checked against the fingerprint it records."""
    if metadata.get("format") != "zoo-weights" or "spec" not in metadata:
        raise ZooError("safetensors file without zoo metadata (convert it with `zoo convert`)", path)
    try:
        num_classes = int(metadata["num_classes"])
    except (KeyError, ValueError):
        raise ZooError("metadata num_classes is missing or not a number", path) from None
    spec = get_spec(metadata["spec"]).with_num_classes(num_classes)
    if metadata.get("fingerprint") not in (spec.fingerprint, fingerprint_v1(spec)):
        raise ZooError(
            f"made for a different {spec.id} (fingerprint {metadata.get('fingerprint')}, the registered spec has "
            f"{spec.fingerprint}): the spec changed without a new version, or the file is from another zoo",
            path,
        )
    return spec


def resolve_spec(name, weights: Weights | None) -> ModelSpec:
    """The spec to build: `name`'s, checked against the weights' own when there are weights.

    "alexnet" with weights for alexnet@torchvision is that version; "alexnet@bvlc" with them is an error."""
    if weights is None:
        return get_spec(name)
    if name is None:
        return weights.spec
    family, _, version = (name.id if isinstance(name, ModelSpec) else name).partition("@")
    if family != weights.spec.family or (version and version != weights.spec.version):
        raise ZooError(f"weights are for {weights.spec.id}, not {name}", weights.path)
    return weights.spec
