"""`fused_qkv`: a fused QKV projection split by attention heads.

The full tensor is [Q; K; V] along dim 0: the query heads' rows, then the key heads' rows, then
the value heads' rows, each head `head_dim` rows long. A tensor-parallel rank computes attention
for its own heads only, so rank r holds [q_r; k_r; v_r]: its heads' rows of Q, then of K, then
of V. A slice is therefore not one block of the full tensor but three, and the layout gives each
rank three pieces. The same layout serves the weight ([3 * heads * head_dim, hidden]), its bias
([3 * heads * head_dim]) and, through `mirror`, their optimizer states.

With grouped-query attention K and V have `kv_groups` heads each instead of `query_heads`, and
every rank takes the same share of query heads and of key/value heads.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from shardsmith.errors import LayoutError, PlanError
from shardsmith.hookspecs import hookimpl
from shardsmith.layout import Box, Layout, Piece, Shape
from shardsmith.strategies.base import LayoutContext, Option, Strategy, parts_or_world, require_ndim

__all__ = ["FusedQKV", "register_strategies"]
__version__ = "0.1.0"


class FusedQKV(Strategy):
    name = "fused_qkv"
    description = (
        "A fused [Q; K; V] weight or bias split by attention heads: rank r holds [q_r; k_r; v_r], "
        "its heads' rows of Q, K and V."
    )
    options = {
        "heads": Option("int", "attention heads of Q, K and V alike (multi-head attention)", default=None, minimum=1),
        "query_heads": Option("int", "query heads, for grouped-query attention (with kv_groups)", default=None, minimum=1),
        "kv_groups": Option(
            "int", "key/value heads, for grouped-query attention (with query_heads)", default=None, minimum=1
        ),
        "parts": Option(
            "int", "model-parallel ranks (default: world size); the other ranks hold copies", default=None, minimum=1
        ),
    }

    def __init__(self, **values):
        super().__init__(**values)
        heads = self.values["heads"]
        query_heads = self.values["query_heads"]
        kv_groups = self.values["kv_groups"]
        if heads is not None:
            if query_heads is not None or kv_groups is not None:
                raise PlanError(
                    "strategy 'fused_qkv' takes either 'heads' or 'query_heads' with 'kv_groups', not both"
                )
            self.query_heads = self.kv_heads = heads
        elif query_heads is not None and kv_groups is not None:
            if query_heads % kv_groups:
                raise PlanError(
                    f"strategy 'fused_qkv': query_heads {query_heads} is not a multiple of kv_groups {kv_groups}, "
                    "but in grouped-query attention every key/value head serves the same number of query heads"
                )
            self.query_heads, self.kv_heads = query_heads, kv_groups
        else:
            raise PlanError(
                "strategy 'fused_qkv' needs option 'heads' (multi-head attention) or both 'query_heads' and "
                "'kv_groups' (grouped-query attention)"
            )

    @property
    def _grouped(self) -> bool:
        return self.values["heads"] is None

    def _sections(self) -> List[Tuple[str, int]]:
        """Return (label, head count) of Q, K and V in the order they sit along dim 0."""
        return [("query", self.query_heads), ("key", self.kv_heads), ("value", self.kv_heads)]

    def _check_heads(self, parts: int, world_size: int, name: str) -> None:
        """Raise LayoutError unless every rank gets whole heads of Q, K and V.

        NOTE: more ranks than KV groups is rejected, although some frameworks then replicate each
        key/value head over several ranks; that layout is not implemented.
        """
        if self._grouped:
            counts = [(self.query_heads, "query heads", "query_heads"), (self.kv_heads, "KV groups", "kv_groups")]
        else:
            counts = [(self.query_heads, "heads", "heads")]
        for count, label, option in counts:
            if count % parts:
                where = "" if parts == world_size else f" (parts = {parts} of world size {world_size})"
                raise LayoutError(
                    f"{count} {label} not divisible by {parts} ranks{where}",
                    param=name,
                    hint=f"Split over a number of ranks that divides '{option}', or check the option",
                )

    def _head_dim(self, rows: int, name: str) -> int:
        total = self.query_heads + 2 * self.kv_heads
        if rows % total:
            raise LayoutError(
                f"dim 0 of size {rows} is not a multiple of the {total} heads of Q, K and V "
                f"({self.query_heads} + {self.kv_heads} + {self.kv_heads}), so no head size fits",
                param=name,
                hint="Check the head options against the model's configuration",
            )
        return rows // total

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        require_ndim(self, len(full_shape), 1, ctx.name)
        parts = parts_or_world(self.values["parts"], world_size, ctx.name)
        self._check_heads(parts, world_size, ctx.name)
        head_dim = self._head_dim(full_shape[0], ctx.name)
        rest = tuple(full_shape[1:])
        zeros = (0,) * len(rest)
        slice_shape = (full_shape[0] // parts,) + rest

        pieces = []
        for rank in range(world_size):
            index = rank % parts  # model-parallel ranks are adjacent, as in dev_matrix [world / parts, parts]
            rank_pieces = []
            local_row = 0
            section_row = 0
            for _, heads in self._sections():
                rows = heads // parts * head_dim
                full_row = section_row + index * rows
                rank_pieces.append(
                    Piece(Box.at((local_row,) + zeros, (rows,) + rest), Box.at((full_row,) + zeros, (rows,) + rest))
                )
                local_row += rows
                section_row += heads * head_dim
            pieces.append(tuple(rank_pieces))
        return Layout(tuple(full_shape), (slice_shape,) * world_size, tuple(pieces), self.summary())

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        first = tuple(slice_shapes[0])
        require_ndim(self, len(first), 1, ctx.name)
        for rank, shape in enumerate(slice_shapes):
            if tuple(shape) != first:
                raise LayoutError(
                    f"strategy 'fused_qkv' gives every rank the same slice shape, but rank 0 holds "
                    f"{list(first)} and rank {rank} holds {list(shape)}",
                    param=ctx.name,
                    hint="Check that the plan gives this parameter the strategy it was trained with",
                )
        parts = parts_or_world(self.values["parts"], world_size, ctx.name)
        self._check_heads(parts, world_size, ctx.name)
        return (first[0] * parts,) + first[1:]


@hookimpl
def register_strategies(register):
    register(FusedQKV)
