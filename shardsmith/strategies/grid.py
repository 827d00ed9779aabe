"""`grid`: a 2D grid of tiles over dims 0 and 1, row-major over the ranks."""

from __future__ import annotations

from ..errors import LayoutError, PlanError
from ..hookspecs import hookimpl
from .base import Option, TensorMapStrategy, require_ndim


class Grid(TensorMapStrategy):
    name = "grid"
    description = "Dim 0 in a blocks and dim 1 in b blocks; rank r holds tile (i, j) with r % (a*b) = i*b + j."
    options = {"grid": Option("int_list", "[a, b]: blocks along dim 0 and dim 1", minimum=1)}

    def __init__(self, **values):
        super().__init__(**values)
        if len(self.values["grid"]) != 2:
            raise PlanError(f"option 'grid' must be two integers [a, b], got {self.values['grid']!r}")

    def device_map(self, ndim, world_size, name):
        require_ndim(self, ndim, 2, name)
        a, b = self.values["grid"]
        if world_size % (a * b):
            raise LayoutError(
                f"grid [{a}, {b}] has {a * b} tiles, which does not divide world size {world_size}", param=name
            )
        return [world_size // (a * b), a, b], [1, 0] + [-1] * (ndim - 2)


@hookimpl
def register_strategies(register):
    register(Grid)
