"""The narrow Caffe nets of tests/data/caffe (every Convolution / 8, hidden InnerProducts / 16; see
tests/references/README.md) as registered specs: `<name>-narrow@test`, translated from their prototxts."""

from conftest import DATA

CAFFE = DATA / "caffe"
# narrow net -> the built-in spec whose input settings it shares
CAFFE_NETS = {"alexnet": "alexnet@bvlc", "caffenet": "caffenet@bvlc", "vgg16": "vgg16@caffe",
              "resnet50": "resnet50@caffe", "googlenet": "googlenet@bvlc"}


def narrow_spec(name):
    from zoo_caffemodel.to_spec import spec_layers

    import zoo

    layers, size = spec_layers((CAFFE / f"{name}_narrow.prototxt").read_text())
    return {"family": f"{name}-narrow", "version": "test", "input": dict(zoo.get_spec(CAFFE_NETS[name]).input, size=size),
            "layers": layers, "head": layers[-1]["name"], "num_classes": 1000}


class NarrowCaffeSpecs:
    """The five narrow Caffe nets as specs, through the public hook (as conftest's tiny@test)."""

    from zoo.hookspecs import hookimpl

    specs = None  # built once, before the first registration (get_spec inside the hook would recurse)

    @hookimpl
    def zoo_model_specs(self):
        return NarrowCaffeSpecs.specs


def register_narrow_specs():
    from zoo.plugins import get_plugins

    if NarrowCaffeSpecs.specs is None:
        NarrowCaffeSpecs.specs = [narrow_spec(name) for name in CAFFE_NETS]
    plugins = get_plugins()
    if not plugins.manager.has_plugin("narrow-caffe-specs"):
        plugins.register(NarrowCaffeSpecs(), name="narrow-caffe-specs")
