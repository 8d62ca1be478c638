"""The plugin manager: built-in plugins first, then the `zoo.plugins` entry points, loaded the same way.

A plugin that fails to import or to answer a hook is recorded and reported in one line; the others
keep working. ZOO_PLUGINS, when set, is a comma-separated allow-list of external plugin names
(entry-point names); set it empty to load no external plugin at all.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from zoo import hookspecs

ENTRY_POINT_GROUP = "zoo.plugins"
ALLOW_ENV = "ZOO_PLUGINS"
# Modules written exactly like third-party plugins; only where they are listed differs.
BUILTIN_PLUGINS = {
    "specs": "zoo.specs",
    "caffe": "zoo.converters.caffe_npy",
    "torch": "zoo.converters.torch_pth",
    "h5": "zoo.converters.keras_h5",
}


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    module: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    error: str | None = None


class Plugins:
    def __init__(self, load_external: bool = True):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self.cache: dict = {}  # what is derived from the hooks' answers (zoo.registry's specs); emptied by a registration
        from zoo import __version__

        for name, module in BUILTIN_PLUGINS.items():
            self._load(PluginInfo(name, "zoo", __version__, module, builtin=True), lambda m=module: importlib.import_module(m))
        if load_external:
            self._load_entry_points()

    def _load_entry_points(self):
        allowed = os.environ.get(ALLOW_ENV)
        allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "?", ep.value, builtin=False)
            self._load(info, ep.load)

    def _load(self, info: PluginInfo, load):
        self.cache.clear()
        self.infos.append(info)
        if self.manager.has_plugin(info.name):
            info.error = f"a plugin named {info.name!r} is already loaded"
            return
        try:
            self.manager.register(load(), name=info.name)
        except Exception as e:  # a broken plugin must not take the others down
            info.error = f"{type(e).__name__}: {e}".splitlines()[0]
            return
        info.hooks = sorted(caller.name for caller in self.manager.get_hookcallers(self.manager.get_plugin(info.name)))

    def register(self, plugin, name: str):
        """Register an in-process plugin (tests, notebooks): same hooks, no entry point."""
        self._load(PluginInfo(name, "__main__", "0", getattr(plugin, "__name__", repr(plugin)), builtin=False), lambda: plugin)

    @property
    def failures(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.error]

    def collect(self, hook_name: str) -> list[tuple[PluginInfo, object]]:
        """Call one hook on each plugin separately, so one that raises is reported, not fatal."""
        results = []
        by_name = {i.name: i for i in self.infos}
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            info = by_name[impl.plugin_name]
            if info.error:
                continue
            try:
                items = impl.function() or ()
                results.extend((info, item) for item in items)
            except Exception as e:
                info.error = f"hook {hook_name} failed: {type(e).__name__}: {e}".splitlines()[0]
        return results


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    global _plugins
    if _plugins is None:
        _plugins = Plugins()
    return _plugins


def loaded_plugins() -> Plugins | None:
    """The plugins if something already loaded them, without loading them."""
    return _plugins


def reset_plugins():
    """Forget the loaded plugins (tests; after installing a plugin in-process)."""
    global _plugins
    _plugins = None
