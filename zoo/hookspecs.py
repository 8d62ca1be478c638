"""The hooks a zoo plugin can implement (pluggy). Built-in plugins use exactly these."""

import pluggy

PROJECT = "zoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def zoo_model_specs():
    """Return model specs to register: `ModelSpec` objects, spec dicts, or paths of spec JSON files."""


@hookspec
def zoo_weight_sources():
    """Return weight sources (`zoo.sources.WeightSource` objects) that `zoo convert` can read."""
