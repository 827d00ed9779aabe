"""Loading strategy plugins and keeping the registry of strategies by name.

The built-in strategies are default plugins: modules registered through the same
`register_strategies` hook as third-party packages, which are found through the `shardsmith`
entry-point group. A broken plugin (it fails to import, its hook raises, or it registers a name
that is taken) is reported and skipped, so one bad package never breaks the tool.

`SHARDSMITH_PLUGINS` selects the entry points to load: unset loads all installed plugins, an
empty value loads none (tests use this to run without stray installed plugins), and a
comma-separated list loads only those entry-point names.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Dict, List, Optional, Sequence, Type

import pluggy

from . import hookspecs
from .errors import PluginError
from .strategies.base import Strategy

logger = logging.getLogger(__name__)

DEFAULT_PLUGINS = (
    "shardsmith.strategies.replicate",
    "shardsmith.strategies.row",
    "shardsmith.strategies.grid",
    "shardsmith.strategies.tensor_map",
    "shardsmith.strategies.mirror",
)

ENTRY_POINT_GROUP = "shardsmith"
PLUGINS_ENV = "SHARDSMITH_PLUGINS"
BUILTIN_SOURCE = "shardsmith (built-in)"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that was skipped, with what is known about where it came from and why."""

    entry_point: str
    distribution: str
    cause: str

    def __str__(self) -> str:
        return f"plugin '{self.entry_point}' from {self.distribution} was skipped: {self.cause}"


@dataclass(frozen=True)
class RegisteredStrategy:
    cls: Type[Strategy]
    source: str  # "shardsmith (built-in)" or "<distribution> <version> (entry point '<name>')"


class StrategyRegistry:
    """Strategies keyed by their declared `name`; the object a plugin's hook registers into."""

    def __init__(self) -> None:
        self._strategies: Dict[str, RegisteredStrategy] = {}
        self.broken: List[BrokenPlugin] = []

    def add(self, cls: Type[Strategy], source: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise PluginError(f"{source} registered {cls!r}, which is not a subclass of shardsmith Strategy")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{source} registered {cls.__qualname__} without a 'name' attribute")
        if name in self._strategies:
            taken = self._strategies[name]
            raise PluginError(
                f"strategy name '{name}' is registered twice: by {taken.cls.__module__}.{taken.cls.__qualname__} "
                f"from {taken.source} and by {cls.__module__}.{cls.__qualname__} from {source}"
            )
        self._strategies[name] = RegisteredStrategy(cls, source)

    def get(self, name: str) -> Type[Strategy]:
        try:
            return self._strategies[name].cls
        except KeyError:
            installed = ", ".join(sorted(self._strategies))
            close = difflib.get_close_matches(name, list(self._strategies), n=1)
            guess = f"; did you mean '{close[0]}'?" if close else ""
            raise PluginError(
                f"unknown strategy '{name}' (installed: {installed}){guess}",
                hint="Install the plugin that provides it, or check SHARDSMITH_PLUGINS",
            ) from None

    def source(self, name: str) -> str:
        return self._strategies[name].source

    def names(self) -> List[str]:
        return list(self._strategies)

    def __contains__(self, name: str) -> bool:
        return name in self._strategies

    def items(self) -> List[RegisteredStrategy]:
        return list(self._strategies.values())


def _entry_points() -> Sequence[metadata.EntryPoint]:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, []))  # Python < 3.10


def _distribution(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _selected(ep_name: str) -> bool:
    value = os.environ.get(PLUGINS_ENV)
    if value is None:
        return True
    return ep_name in {part.strip() for part in value.split(",") if part.strip()}


def _register_from(pm: pluggy.PluginManager, plugin: object, registry: StrategyRegistry, source: str, name: str) -> Optional[str]:
    """Register `plugin` and run its hook; return the cause if it is broken, else None."""
    added: List[str] = []
    try:
        pm.register(plugin, name=name)
        for impl in pm.hook.register_strategies.get_hookimpls():
            if impl.plugin is plugin:

                def register(cls: Type[Strategy]) -> None:
                    registry.add(cls, source)
                    added.append(cls.name)

                impl.function(register=register)
    except Exception as exc:  # a plugin may raise anything; it is reported, not propagated
        for strategy_name in added:
            registry._strategies.pop(strategy_name, None)
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, PluginError) else exc.message
    return None


def load_registry(builtins: Sequence[str] = DEFAULT_PLUGINS, *, entry_points: bool = True) -> StrategyRegistry:
    """Build a registry from the built-in strategy modules and the installed plugins."""
    pm = pluggy.PluginManager("shardsmith")
    pm.add_hookspecs(hookspecs)
    registry = StrategyRegistry()
    for module_name in builtins:
        cause = _register_from(pm, importlib.import_module(module_name), registry, BUILTIN_SOURCE, module_name)
        if cause is not None:
            raise PluginError(f"built-in strategy module {module_name} is broken: {cause}")
    if not entry_points:
        return registry
    found = _entry_points()
    wanted = os.environ.get(PLUGINS_ENV)
    if wanted:
        known = {ep.name for ep in found}
        for name in (part.strip() for part in wanted.split(",")):
            if name and name not in known:
                logger.warning(
                    "%s names plugin '%s', which is not installed (installed: %s)",
                    PLUGINS_ENV, name, ", ".join(sorted(known)) or "none",
                )
    for ep in found:
        if not _selected(ep.name):
            continue
        dist = _distribution(ep)
        try:
            plugin = ep.load()
        except Exception as exc:  # an import error in a third-party package must not stop the tool
            registry.broken.append(BrokenPlugin(ep.name, dist, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        source = f"{dist} (entry point '{ep.name}')"
        before = len(registry.names())
        cause = _register_from(pm, plugin, registry, source, f"ep:{ep.name}")
        if cause is None:
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                cause = f"{exc}; the hook is named 'register_strategies'"
                pm.unregister(plugin)
        if cause is None and len(registry.names()) == before:
            cause = "registered no strategies (is register_strategies decorated with shardsmith.hookspecs.hookimpl?)"
            pm.unregister(plugin)
        if cause is not None:
            registry.broken.append(BrokenPlugin(ep.name, dist, cause))
    for broken in registry.broken:
        logger.warning("%s", broken)
    return registry


_registry: Optional[StrategyRegistry] = None


def get_registry() -> StrategyRegistry:
    """Return the process-wide registry, loading plugins on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry, so the next `get_registry()` scans the plugins again (tests)."""
    global _registry
    _registry = None
