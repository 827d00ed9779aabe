"""`replicate`: every rank holds the whole tensor."""

from __future__ import annotations

from typing import Sequence

from ..errors import LayoutError
from ..hookspecs import hookimpl
from ..layout import Layout, Shape
from .base import LayoutContext, Strategy


class Replicate(Strategy):
    name = "replicate"
    description = "Every rank holds the whole tensor; merge takes one copy and checks the others."

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        return Layout.replicated(full_shape, world_size)

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        first = tuple(slice_shapes[0])
        for rank, shape in enumerate(slice_shapes):
            if tuple(shape) != first:
                raise LayoutError(
                    f"replicated, but rank 0 holds shape {list(first)} and rank {rank} holds {list(shape)}; "
                    "give it a split strategy in the plan",
                    param=ctx.name,
                )
        return first


@hookimpl
def register_strategies(register):
    register(Replicate)
