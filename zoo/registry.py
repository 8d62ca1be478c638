"""The model registry: every spec contributed through the `zoo_model_specs` hook, by `family@version`."""

from __future__ import annotations

from pathlib import Path

from zoo.errors import ZooError
from zoo.plugins import get_plugins
from zoo.spec import ModelSpec


def _as_spec(item, origin: str) -> ModelSpec:
    if isinstance(item, ModelSpec):
        return item
    if isinstance(item, dict):
        return ModelSpec.from_dict(item, origin)
    if isinstance(item, (str, Path)):
        return ModelSpec.from_json(item, origin)
    raise ZooError(f"plugin {origin!r} returned a {type(item).__name__} as a model spec")


def all_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    plugins = get_plugins()
    for info, item in plugins.collect("zoo_model_specs"):
        try:
            spec = _as_spec(item, info.name)
        except ZooError as e:
            info.error = str(e)
            continue
        if spec.id in specs:
            info.error = f"model spec {spec.id} is already registered by plugin {specs[spec.id].origin!r}"
            continue
        specs[spec.id] = spec
    return specs


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
