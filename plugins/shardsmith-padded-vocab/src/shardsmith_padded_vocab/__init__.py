"""`padded_vocab`: a row split of an embedding whose vocabulary is padded to the part count.

Vocabulary-parallel embeddings and LM heads split the vocabulary dimension (dim 0) into equal
blocks. A vocabulary that does not divide by the part count is therefore padded with extra rows
up to the next multiple. With `vocab_size` 10 over 4 parts that is 12 rows, 3 per rank, and the
last 2 rows of rank 3 are padding. The layout covers only the real rows; the padding rows of a slice are
covered by no piece, so split writes zeros there and merge ignores them. Optimizer states that
`mirror` the embedding get the same layout, so they are padded and stripped identically.
"""

from __future__ import annotations

from typing import Sequence

from shardsmith.errors import LayoutError
from shardsmith.hookspecs import hookimpl
from shardsmith.layout import Box, Layout, Piece, Shape
from shardsmith.strategies.base import LayoutContext, Option, Strategy, parts_or_world, require_ndim

__all__ = ["PaddedVocab", "padded_rows", "register_strategies"]
__version__ = "0.1.0"


def padded_rows(vocab_size: int, parts: int) -> int:
    """Return `vocab_size` rounded up to a multiple of `parts`."""
    return -(-vocab_size // parts) * parts


class PaddedVocab(Strategy):
    name = "padded_vocab"
    description = (
        "Rows split in equal blocks after padding the vocabulary (dim 0) to a multiple of the part count; "
        "padding rows are zeros on split and dropped on merge unless keep_padding is set."
    )
    options = {
        "vocab_size": Option("int", "the true vocabulary size, without padding rows", minimum=1),
        "keep_padding": Option(
            "bool", "merge keeps the padding rows in the full tensor (default: strips them)", default=False
        ),
        "parts": Option(
            "int", "number of blocks (default: world size); the other ranks hold copies", default=None, minimum=1
        ),
    }

    def _padding_message(self, rows_label: str, rows: int, parts: int) -> str:
        vocab_size = self.values["vocab_size"]
        return (
            f"{rows_label} {rows} rows, but vocab_size {vocab_size} padded to a multiple of {parts} parts "
            f"is {padded_rows(vocab_size, parts)} rows"
        )

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        """Lay out a full tensor of either the true vocabulary or the padded one along dim 0.

        Accepting both lets one plan split a stripped merge and a `keep_padding` merge alike.
        """
        require_ndim(self, len(full_shape), 1, ctx.name)
        parts = parts_or_world(self.values["parts"], world_size, ctx.name)
        vocab_size = self.values["vocab_size"]
        padded = padded_rows(vocab_size, parts)
        real_rows = full_shape[0]
        if real_rows not in (vocab_size, padded):
            expected = f"{vocab_size}" if padded == vocab_size else f"{vocab_size} or {padded}"
            raise LayoutError(
                self._padding_message("dim 0 has", real_rows, parts) + f"; expected {expected} rows",
                param=ctx.name,
                hint="Check 'vocab_size' and 'parts'; a merge with keep_padding = true can only be split "
                "again over the same part count",
            )

        block = padded // parts
        rest = tuple(full_shape[1:])
        zeros = (0,) * len(rest)
        pieces = []
        for rank in range(world_size):
            start = rank % parts * block  # model-parallel ranks are adjacent, as in `row`
            rows = min(block, real_rows - start)
            if rows <= 0:
                # The whole slice is padding: a rank past the end of a small vocabulary.
                pieces.append(())
                continue
            pieces.append((Piece(Box.at((0,) + zeros, (rows,) + rest), Box.at((start,) + zeros, (rows,) + rest)),))
        slice_shape = (block,) + rest
        return Layout(tuple(full_shape), (slice_shape,) * world_size, tuple(pieces), self.summary())

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        first = tuple(slice_shapes[0])
        require_ndim(self, len(first), 1, ctx.name)
        parts = parts_or_world(self.values["parts"], world_size, ctx.name)
        vocab_size = self.values["vocab_size"]
        padded = padded_rows(vocab_size, parts)
        total = sum(shape[0] for shape in slice_shapes[:parts] if len(shape) >= 1)
        if total != padded:
            slices_label = "the slice of rank 0 has" if parts == 1 else f"the slices of ranks 0-{parts - 1} add up to"
            raise LayoutError(
                self._padding_message(slices_label, total, parts),
                param=ctx.name,
                hint="Check 'vocab_size' and 'parts' against the model's configuration",
            )
        for rank, shape in enumerate(slice_shapes):
            if tuple(shape) != first:
                raise LayoutError(
                    f"strategy 'padded_vocab' gives every rank the same slice shape, but rank 0 holds "
                    f"{list(first)} and rank {rank} holds {list(shape)}",
                    param=ctx.name,
                    hint="Check that the plan gives this parameter the strategy it was trained with",
                )
        rows = padded if self.values["keep_padding"] else vocab_size
        return (rows,) + first[1:]


@hookimpl
def register_strategies(register):
    register(PaddedVocab)
