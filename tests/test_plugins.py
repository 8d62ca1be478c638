"""The plugin manager: built-ins, entry points loaded exactly like a third party's, failures, allow-list."""

import json
import textwrap

import pytest

from zoo.plugins import get_plugins, reset_plugins


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Put a distribution with `zoo.plugins` entry points on sys.path, as pip would install it."""

    def install(dist: str, modules: dict[str, str], entry_points: dict[str, str]):
        site = tmp_path / "site"
        (site / f"{dist}-1.2.3.dist-info").mkdir(parents=True)
        (site / f"{dist}-1.2.3.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        eps = "[zoo.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (site / f"{dist}-1.2.3.dist-info" / "entry_points.txt").write_text(eps)
        for name, source in modules.items():
            (site / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(site))
        reset_plugins()

    return install


GOOD = """
    from zoo.hookspecs import hookimpl
    from zoo.sources import WeightSource

    class Dummy(WeightSource):
        name = "dummy"
        format = "dummy test format"

    @hookimpl
    def zoo_weight_sources():
        return [Dummy()]
"""


def test_builtins_are_listed_with_package_and_version(cli):
    code, out, _ = cli("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["caffe"]["weight_sources"] == ["caffe"] and rows["caffe"]["builtin"]
    assert rows["caffe"]["package"] == "zoo" and rows["caffe"]["module"] == "zoo.converters.caffe_npy"
    assert {"alexnet@bvlc", "alexnet@torchvision", "resnet50@caffe", "googlenet@bvlc"} <= set(rows["specs"]["specs"])
    assert rows["caffe"]["hooks"] == ["zoo_weight_sources"]


def test_entry_point_plugins_load_and_a_broken_one_is_reported(installed, cli):
    installed("zoo-extras", {"good_plugin": GOOD, "broken_plugin": "import does_not_exist\n"},
              {"dummy": "good_plugin", "broken": "broken_plugin"})
    code, out, err = cli("plugins")
    assert code == 0
    assert "dummy" in out and "zoo-extras 1.2.3" in out and "source dummy" in out
    assert "broken" in out and "FAILED: ModuleNotFoundError: No module named 'does_not_exist'" in out
    warnings = [line for line in err.splitlines() if "broken" in line]
    assert len(warnings) == 1 and warnings[0].startswith("zoo: warning: plugin 'broken'")
    # the built-ins and the good plugin keep working
    code, out, _ = cli("list")
    assert code == 0 and "alexnet@bvlc" in out


def test_a_plugin_whose_hook_raises_is_isolated(installed, cli):
    installed("zoo-bad", {"raising": "from zoo.hookspecs import hookimpl\n@hookimpl\ndef zoo_model_specs():\n    raise RuntimeError('boom')\n"},
              {"raising": "raising"})
    code, out, err = cli("list")
    assert code == 0 and "alexnet@bvlc" in out
    assert "boom" in err


def test_allow_list_env_var_restricts_external_plugins(installed, monkeypatch):
    installed("zoo-extras", {"good_plugin": GOOD, "broken_plugin": "raise SystemError('never imported')\n"},
              {"dummy": "good_plugin", "broken": "broken_plugin"})
    monkeypatch.setenv("ZOO_PLUGINS", "dummy")
    names = {i.name for i in get_plugins().infos}
    assert "dummy" in names and "broken" not in names and "caffe" in names
    reset_plugins()
    monkeypatch.setenv("ZOO_PLUGINS", "")
    names = {i.name for i in get_plugins().infos}
    assert "dummy" not in names and {"specs", "caffe"} <= names


def test_name_clashes_are_reported_not_silently_replaced(installed, cli):
    clash = GOOD.replace('name = "dummy"', 'name = "caffe"')
    installed("zoo-clash", {"clash": clash}, {"clash": "clash"})
    code, out, _ = cli("plugins")
    assert "weight source 'caffe' is already provided by plugin 'caffe'" in out
