"""The hooks a shardsmith plugin implements.

A plugin is a module (or object) with functions decorated by `hookimpl`, made known through the
`shardsmith` entry-point group. The built-in strategies are plugins of exactly this kind.
"""

from __future__ import annotations

from typing import Callable, Type

import pluggy

hookspec = pluggy.HookspecMarker("shardsmith")
hookimpl = pluggy.HookimplMarker("shardsmith")


@hookspec
def register_strategies(register: Callable[[Type], None]) -> None:
    """Register layout strategies by calling `register(StrategyClass)` once per class."""
