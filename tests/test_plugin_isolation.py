"""A broken plugin leaves the rest working, and every error it causes names it (docs/plugins.md, "When a plugin fails")."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY_SPEC, small_layers

from zoo.conversion import convert, weight_sources
from zoo.errors import ZooError
from zoo.hookspecs import hookimpl
from zoo.plugins import PluginFailure, get_plugins
from zoo.registry import all_specs
from zoo.sources import WeightSource


class Source(WeightSource):
    format = "a test format"

    def __init__(self, name, sniff=lambda path, head: False, read=None):
        self.name, self._sniff, self._read = name, sniff, read

    def sniff(self, path, head):
        return self._sniff(path, head)

    def read(self, path, spec, options):
        return self._read()


def register(name, **hooks):
    """An in-process plugin answering each hook with the given function."""
    get_plugins().register(SimpleNamespace(**{hook: hookimpl(answer) for hook, answer in hooks.items()}), name=name)


def raises(error):
    def fail(*args):
        raise error
    return fail


@pytest.fixture
def npy(tmp_path, tiny_spec):
    """A caffe-tensorflow .npy of the tiny@test spec, which the built-in `caffe` source recognises."""
    path = tmp_path / "tiny.npy"
    np.save(path, small_layers())
    return path


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name + " "))


def good_spec():
    return [dict(TINY_SPEC, version="extra")]


def good_source():
    return [Source("extra")]


@pytest.mark.parametrize("hooks, reason", [
    ({"zoo_weight_sources": lambda: Source("x"), "zoo_model_specs": good_spec},
     "hook zoo_weight_sources returned Source, not a list"),
    ({"zoo_weight_sources": lambda: [object()], "zoo_model_specs": good_spec},
     "hook zoo_weight_sources failed: object is not a zoo.sources.WeightSource"),
    ({"zoo_weight_sources": lambda: [Source("two words")], "zoo_model_specs": good_spec},
     "hook zoo_weight_sources failed: weight source Source has no usable name ('two words')"),
    ({"zoo_model_specs": lambda: [42], "zoo_weight_sources": good_source},
     "hook zoo_model_specs failed: int is not a ModelSpec, a spec dict or a spec file's path"),
    ({"zoo_model_specs": lambda: [{"family": "half"}], "zoo_weight_sources": good_source},
     "hook zoo_model_specs failed: invalid model spec: missing or bad field 'version'"),
    ({"zoo_model_specs": raises(RuntimeError("boom")), "zoo_weight_sources": good_source},
     "hook zoo_model_specs failed: RuntimeError: boom"),
])
def test_a_hook_that_raises_or_answers_wrongly_fails_its_plugin_whole_and_only_it(hooks, reason, npy, tmp_path, cli):
    register("wrong", **hooks)
    code, out, err = cli("plugins")
    assert code == 0 and reason in row(out, "wrong") and "FAILED" in row(out, "wrong")
    assert f"zoo: warning: plugin 'wrong' (__main__ 0) not loaded: {reason}" in err
    assert "source caffe" in row(out, "caffe") and "spec tiny@test" in row(out, "tiny-specs")
    # nothing of the plugin is used, not even what its other hook answered well
    assert "extra" not in weight_sources() and "tiny@extra" not in all_specs()
    code, out, err = cli("convert", npy, "-o", tmp_path / "out.safetensors")
    assert code == 0 and "tiny@test" in out, err


@pytest.mark.parametrize("sniff, why", [(raises(ValueError("bad head")), "ValueError: bad head"),
                                        (lambda path, head: np.ones(2), "ValueError: The truth value")])
def test_a_broken_sniff_is_named_and_the_other_sources_still_recognise_files(sniff, why, npy, tmp_path, caplog):
    register("sniffy", zoo_weight_sources=lambda: [Source("sniffy", sniff=sniff)])
    assert convert(npy).spec == "tiny@test"
    assert "zoo: warning: plugin 'sniffy' (__main__ 0): weight source 'sniffy' recognising the file failed: " + why in caplog.text
    unknown = tmp_path / "unknown.bin"
    unknown.write_bytes(b"\0" * 64)
    with pytest.raises(ZooError, match=r"no weight source recognises it \(plugin 'sniffy' \(__main__ 0\): .*" + why):
        convert(unknown)


@pytest.mark.parametrize("read, reason", [
    (raises(KeyError("oops")), "weight source 'bad' reading the file failed: KeyError: 'oops'"),
    (lambda: {"spec": "tiny@test"}, "weight source 'bad' reading the file returned dict, not Imported"),
])
def test_a_read_that_fails_outside_the_contract_is_the_plugins_error_not_zoos(read, reason, npy, tmp_path, cli):
    register("bad", zoo_weight_sources=lambda: [Source("bad", read=read)])
    code, _, err = cli("convert", "bad", npy, "-o", tmp_path / "bad.safetensors")
    assert code == 1 and f"zoo: error: {npy}: plugin 'bad' (__main__ 0): {reason}" in err and "unexpected" not in err
    assert "warning" not in err  # the plugin stays loaded: its other sources, and later files, still work
    code, out, err = cli("convert", "caffe", npy, "-o", tmp_path / "good.safetensors")
    assert code == 0 and "tiny@test" in out, err


def test_a_read_failure_keeps_the_plugins_traceback_and_its_zoo_errors_pass_unchanged(npy):
    register("bad", zoo_weight_sources=lambda: [Source("bad", read=raises(KeyError("oops"))),
                                                Source("strict", read=raises(ZooError("not my format", npy)))])
    with pytest.raises(PluginFailure) as failure:
        convert(npy, source="bad")
    assert isinstance(failure.value.__cause__, KeyError) and failure.value.info.name == "bad"
    with pytest.raises(ZooError) as refused:
        convert(npy, source="strict")
    assert str(refused.value) == f"{npy}: not my format"


def test_duplicates_the_first_registered_plugin_keeps_the_name_the_later_one_is_not_loaded(tiny_spec, cli):
    register("first", zoo_model_specs=lambda: [dict(TINY_SPEC, version="one")], zoo_weight_sources=lambda: [Source("one")])
    assert "tiny@one" in all_specs() and "one" in weight_sources()  # in use before the clashing plugin comes
    register("second", zoo_model_specs=lambda: [dict(TINY_SPEC, version="two"), dict(TINY_SPEC, version="one")])
    register("third", zoo_weight_sources=lambda: [Source("three"), Source("caffe")])
    register("twice", zoo_weight_sources=lambda: [Source("same"), Source("same")])
    code, out, _ = cli("plugins")
    assert code == 0
    assert "FAILED: model spec 'tiny@one' is already provided by plugin 'first'" in row(out, "second")
    assert "FAILED: weight source 'caffe' is already provided by plugin 'caffe'" in row(out, "third")
    assert "FAILED: weight source 'same' is already provided by itself" in row(out, "twice")
    # the first keeps everything it had, the later ones bring nothing, built-ins are untouched
    assert row(out, "first").endswith("source one, spec tiny@one")
    assert all_specs()["tiny@one"].origin == "first" and "tiny@two" not in all_specs()
    sources = weight_sources()
    assert sources["caffe"][0].name == "caffe" and sources["one"][0].name == "first"
    assert not {"three", "same"} & set(sources)
