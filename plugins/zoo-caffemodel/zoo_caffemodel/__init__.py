"""zoo plugin `caffemodel`: BVLC Caffe .caffemodel files, read directly through zoo's public API.

The plugin parses the NetParameter binary (zoo_caffemodel.caffemodel) and hands zoo each layer's blobs
by position, in Caffe's layout ("caffe" convention: conv (out, in/groups, kh, kw), InnerProduct (out, in)
with C,H,W inputs, BatchNorm's three running-sum blobs, Scale's gamma and beta). zoo's matcher finds the
spec and each layer kind does its own transform. zoo writes and verifies the output.
"""

from __future__ import annotations

from functools import partial
from importlib.metadata import version
from pathlib import Path

from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.sources import Imported, WeightSource, fit_params, map_file, mapping_notes, release_pages
from zoo.weights import file_digest
from zoo.wire import WireError
from zoo_caffemodel.caffemodel import read_layers
from zoo_caffemodel.prototxt import layer_settings, read_prototxt
from zoo_caffemodel.to_spec import layer_name


def __getattr__(name: str):
    """`__version__` looked up when asked for: the lookup scans the installed distributions (2 ms), and zoo, which
    imports this module for every command, takes a plugin's version from its entry point."""
    if name == "__version__":
        return version("zoo-caffemodel")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def genuine_notes(spec, path: Path) -> list[str]:
    """Compare the file's sha1 with the spec's published reference files (Caffe's model zoo lists sha1)."""
    refs = {name: h["sha1"] for name, h in spec.provenance.get("reference_files", {}).items() if "sha1" in h}
    if not refs:
        return []
    digest = file_digest(path, "sha1")
    for name, sha1 in refs.items():
        if digest == sha1:
            return [f"genuine: sha1 {digest} is that of the published {name}"]
    return [f"sha1 {digest} is not that of the published {', '.join(refs)} (fine for other weights)"]


def prototxt_notes(spec, prototxt, layers) -> list[str]:
    settings = layer_settings(read_prototxt(prototxt))
    notes = []
    for node in spec.weighted_nodes:
        if node.name not in settings:
            notes.append(f"WARNING: prototxt {prototxt} has no layer {node.name!r}")
        elif node.kind == "conv" and settings[node.name]["group"] != node.config["groups"]:
            notes.append(f"WARNING: prototxt says {node.name} has group {settings[node.name]['group']}, "
                         f"{spec.id} has {node.config['groups']}")
    unknown = sorted({layer_name(layer.name) for layer in layers if layer.blobs} - set(settings))
    if unknown:
        notes.append(f"WARNING: layers with weights that the prototxt does not define: {', '.join(unknown)}")
    return notes or [f"prototxt {prototxt}: layer names and groups agree with {spec.id}"]


class CaffeModel(WeightSource):
    name = "caffemodel"
    format = "Caffe NetParameter binary (.caffemodel)"
    extensions = (".caffemodel",)
    options = {"prototxt": "deploy.prototxt to check the network's layer names and groups against the spec"}

    def sniff(self, path, head):
        return Path(path).suffix == ".caffemodel"

    def read(self, path, spec, options):
        data = map_file(path)
        try:
            net, layers, kind = read_layers(memoryview(data))
        except WireError as e:
            raise ZooError(f"not a valid .caffemodel: {e}", path) from None
        # "/" in Caffe's names is "_" in specs (zoo_caffemodel.to_spec.layer_name)
        weighted = {layer_name(layer.name): {str(i): blob for i, blob in enumerate(layer.blobs)} for layer in layers if layer.blobs}
        if not weighted:
            raise ZooError(f"net {net!r} holds no blobs (a deploy net without weights?)", path)
        release = partial(release_pages, data)
        fit = fit_params(weighted, "caffe", spec, path, mapping=options.get("map"), release=release)
        notes = [f"read net {net!r} ({kind}, {len(layers)} layers)"] + mapping_notes(fit) + genuine_notes(fit.spec, Path(path))
        if options.get("prototxt"):
            notes += prototxt_notes(fit.spec, options["prototxt"], layers)
        return Imported(fit.spec, fit.tensors, notes=notes, source_format="caffemodel", release=release)


@hookimpl
def zoo_weight_sources():
    return [CaffeModel()]
