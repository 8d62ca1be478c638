"""The plugin manager: built-in plugins first, then the `zoo.plugins` entry points, loaded the same way.

Every call into a plugin's code goes through `call`, which turns what the plugin did wrong into a
`PluginFailure` naming it; the others keep working. A plugin is taken whole or not at all: before anything
it provides is used, its hooks are called once and their answers checked (types, spec files, names
unique across plugins; docs/plugins.md, "When a plugin fails"). ZOO_PLUGINS, when set, is a
comma-separated allow-list of external plugin names (entry-point names); set it empty to load no external
plugin at all.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from zoo import hookspecs
from zoo.errors import ZooError
from zoo.sources import WeightSource
from zoo.spec import ModelSpec

ENTRY_POINT_GROUP = "zoo.plugins"
ALLOW_ENV = "ZOO_PLUGINS"
# Modules written exactly like third-party plugins; only where they are listed differs.
BUILTIN_PLUGINS = {
    "specs": "zoo.specs",
    "caffe": "zoo.converters.caffe_npy",
    "torch": "zoo.converters.torch_pth",
    "h5": "zoo.converters.keras_h5",
}
log = logging.getLogger(__name__)


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    module: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # why nothing of the plugin is used


class PluginFailure(ZooError):
    """What a plugin's code did wrong (not the user's input), named after the plugin."""

    def __init__(self, info: PluginInfo, reason: str, path=None):
        self.info, self.reason = info, reason
        super().__init__(f"plugin {info.name!r} ({info.package} {info.version}): {reason}", path)


def call(info: PluginInfo, what: str, function: Callable, *args, expected=(), returns: type | None = None, path=None):
    """`function(*args)`, a plugin's code: the one place its failures are caught. Exceptions in `expected` pass as
    they are (a read's ZooError is about the user's file); any other, or a result that is not a `returns`, is a
    PluginFailure saying `what` failed. The plugin's exception stays chained: --debug shows its traceback."""
    try:
        result = function(*args)
    except expected:
        raise
    except Exception as e:
        raise PluginFailure(info, f"{what} failed: {_describe(e)}", path) from e
    if returns is not None and not isinstance(result, returns):
        raise PluginFailure(info, f"{what} returned {type(result).__name__}, not {returns.__name__}", path)
    return result


def _describe(e: Exception) -> str:
    text = str(e) if isinstance(e, ZooError) else f"{type(e).__name__}: {e}"
    return text.partition("\n")[0]  # errors are one line


def warn(failure: PluginFailure) -> None:
    """A failure zoo worked around: one line on stderr (the logging default; an application may route it)."""
    log.warning("zoo: warning: %s", failure)


# --- what each hook's items must be, and the name that makes one unique -------------------------------------


def _as_spec(item, origin: str) -> ModelSpec:
    if isinstance(item, ModelSpec):
        return item
    if isinstance(item, dict):
        return ModelSpec.from_dict(item, origin)
    if isinstance(item, (str, os.PathLike)):
        return ModelSpec.from_json(item, origin)
    raise ZooError(f"{type(item).__name__} is not a ModelSpec, a spec dict or a spec file's path")


def _as_source(item, origin: str) -> WeightSource:
    if not isinstance(item, WeightSource):
        raise ZooError(f"{type(item).__name__} is not a zoo.sources.WeightSource")
    if not (isinstance(item.name, str) and re.fullmatch(r"[\w.-]+", item.name)):  # typed on the command line
        raise ZooError(f"weight source {type(item).__name__} has no usable name ({item.name!r})")
    if not (isinstance(item.options, dict) and isinstance(item.produces, (tuple, list))):
        raise ZooError(f"weight source {item.name!r}: options must be a dict and produces a tuple")
    return item


@dataclass(frozen=True)
class Hook:
    item: str  # what an item is called in messages
    check: Callable  # (item, plugin name) -> the item as zoo uses it; raises on a bad one
    key: Callable  # the item's name, unique across plugins


HOOKS = {
    "zoo_model_specs": Hook("model spec", _as_spec, lambda spec: spec.id),
    "zoo_weight_sources": Hook("weight source", _as_source, lambda source: source.name),
}


class Plugins:
    def __init__(self, load_external: bool = True):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self._pending: list[PluginInfo] = []  # registered, hooks not yet called
        self._provided: dict[str, dict[str, tuple[PluginInfo, object]]] = {hook: {} for hook in HOOKS}
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
        self.infos.append(info)
        if self.manager.has_plugin(info.name):
            info.error = f"a plugin named {info.name!r} is already loaded"
            return
        try:
            self.manager.register(load(), name=info.name)
        except Exception as e:  # a plugin that cannot be imported or registered must not take the others down
            info.error = _describe(e)
            return
        info.hooks = sorted(caller.name for caller in self.manager.get_hookcallers(self.manager.get_plugin(info.name)))
        self._pending.append(info)

    def register(self, plugin, name: str):
        """Register an in-process plugin (tests, notebooks): same hooks, no entry point."""
        self._load(PluginInfo(name, "__main__", "0", getattr(plugin, "__name__", repr(plugin)), builtin=False), lambda: plugin)

    @property
    def failures(self) -> list[PluginInfo]:
        return [i for i in self.infos if i.error]

    def provided(self, hook_name: str) -> dict[str, tuple[PluginInfo, object]]:
        """{name: (plugin, item)} of what the accepted plugins provide through a hook, in the order they registered.
        Plugins registered since the last call are taken first, whole or not at all, so nothing once provided
        goes away: a later plugin cannot displace an earlier one's item."""
        while self._pending:
            self._accept(self._pending.pop(0))  # popped first: a hook that looks up specs must not re-enter it
        return dict(self._provided[hook_name])

    def _accept(self, info: PluginInfo):
        try:
            answers = {hook: self._answer(info, hook) for hook in HOOKS if hook in info.hooks}
        except PluginFailure as e:
            info.error = e.reason
            return
        for hook, items in answers.items():
            self._provided[hook].update((key, (info, item)) for key, item in items.items())

    def _answer(self, info: PluginInfo, hook_name: str) -> dict[str, object]:
        """The plugin's checked items for one hook, by name: a PluginFailure for any that is wrong or taken."""
        hook, taken = HOOKS[hook_name], self._provided[hook_name]
        impl = next(i for i in getattr(self.manager.hook, hook_name).get_hookimpls() if i.plugin_name == info.name)
        answer = call(info, f"hook {hook_name}", impl.function)
        if answer is None:  # pluggy's "nothing to add"
            return {}
        if not isinstance(answer, (list, tuple)):
            raise PluginFailure(info, f"hook {hook_name} returned {type(answer).__name__}, not a list")
        items = {}
        for item in answer:
            item = call(info, f"hook {hook_name}", hook.check, item, info.name)
            key = hook.key(item)
            if key in items or key in taken:
                owner = "itself" if key in items else f"plugin {taken[key][0].name!r}"
                raise PluginFailure(info, f"{hook.item} {key!r} is already provided by {owner}")
            items[key] = item
        return items


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
