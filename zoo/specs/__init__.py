"""Built-in plugin: the model specs shipped with zoo, one JSON file per family version."""

from pathlib import Path

from zoo.hookspecs import hookimpl


@hookimpl
def zoo_model_specs():
    return sorted(Path(__file__).parent.glob("*.json"))
