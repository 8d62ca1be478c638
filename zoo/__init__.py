"""zoo: versioned model specs, verified weights from foreign formats, fine-tuning and checked exports.

Importing zoo is cheap; TensorFlow is imported only by the functions that build models.
"""

import os

__version__ = "0.1.0"
# keep TensorFlow's C++ start-up chatter off users' terminals (set before any zoo module imports TF)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from zoo.errors import ZooError  # noqa: E402
from zoo.registry import all_specs, get_spec  # noqa: E402

__all__ = ["ZooError", "all_specs", "convert", "create_model", "get_spec", "load_weights", "__version__"]


def create_model(name, weights=None, num_classes=None, **kwargs):
    """A keras.Model for spec `name` (e.g. "alexnet", "alexnet@torchvision"); see zoo.backends.keras."""
    from zoo.backends.keras import create_model as _create

    return _create(name, weights=weights, num_classes=num_classes, **kwargs)


def convert(path, source=None, output=None, spec=None, options=None):
    """Convert a foreign weights file to verified safetensors; see zoo.conversion."""
    from zoo.conversion import convert as _convert

    return _convert(path, source=source, output=output, spec=spec, options=options)


def load_weights(path):
    """Read and verify a zoo safetensors file; see zoo.weights."""
    from zoo.registry import load_weights as _load

    return _load(path)
