"""`row` and `column`: equal blocks along dim 0 or dim 1, model-parallel ranks adjacent."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Option, TensorMapStrategy, parts_or_world, require_ndim

_PARTS = Option("int", "number of blocks (default: world size); the other ranks hold copies", default=None, minimum=1)


class Row(TensorMapStrategy):
    name = "row"
    description = "Rank r holds block r % parts of equal blocks along dim 0."
    options = {"parts": _PARTS}

    def device_map(self, ndim, world_size, name):
        require_ndim(self, ndim, 1, name)
        parts = parts_or_world(self.values["parts"], world_size, name)
        return [world_size // parts, parts], [0] + [-1] * (ndim - 1)


class Column(TensorMapStrategy):
    name = "column"
    description = "Rank r holds block r % parts of equal blocks along dim 1."
    options = {"parts": _PARTS}

    def device_map(self, ndim, world_size, name):
        require_ndim(self, ndim, 2, name)
        parts = parts_or_world(self.values["parts"], world_size, name)
        return [world_size // parts, parts], [-1, 0] + [-1] * (ndim - 2)


@hookimpl
def register_strategies(register):
    register(Row)
    register(Column)
