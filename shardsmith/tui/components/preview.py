"""A drawing of which block of the full tensor each rank holds.

The full tensor's dims 0 and 1 are cut at every boundary of a rank's piece, and each cell of the
resulting grid lists the ranks that hold it: one rank for a model-parallel block, several for
data-parallel copies. A 1-D tensor is drawn as one row of blocks along dim 0.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ...layout import Box, Layout

# One colour per distinct block, so the copies of a block share its colour.
PALETTE = ("cyan", "magenta", "green", "yellow", "bright_blue", "red", "bright_cyan", "bright_magenta")


def ranks_text(ranks: Sequence[int]) -> str:
    """Write ranks compactly: `0-3`, `0,4`, `0-1,6`, and a long even stride as `0,8,…,56`."""
    ranks = sorted(ranks)
    if len(ranks) > 3:
        steps = {b - a for a, b in zip(ranks, ranks[1:])}
        if len(steps) == 1 and steps != {1}:
            return f"{ranks[0]},{ranks[1]},…,{ranks[-1]}"
    parts: List[str] = []
    start = prev = None
    for rank in ranks + [None]:
        if start is None:
            start = prev = rank
            continue
        if rank is not None and rank == prev + 1:
            prev = rank
            continue
        if start == prev:
            parts.append(f"{start}")
        elif prev > start + 1:
            parts.append(f"{start}-{prev}")
        else:
            parts.append(f"{start},{prev}")
        start = prev = rank
    return ",".join(parts)


def _cuts(layout: Layout, dim: int) -> List[int]:
    points = {0, layout.full_shape[dim]}
    for pieces in layout.pieces:
        for piece in pieces:
            points.add(piece.full.start[dim])
            points.add(piece.full.stop[dim])
    return sorted(points)


def _shown(intervals: List[Tuple[int, int]], limit: int) -> List[Optional[Tuple[int, int]]]:
    """Keep the first intervals and the last one; None marks the gap between them."""
    if len(intervals) <= limit:
        return list(intervals)
    return list(intervals[: limit - 2]) + [None, intervals[-1]]


def layout_drawing(layout: Layout, max_rows: int = 8, max_columns: int = 6) -> RenderableType:
    """Return a grid of the full tensor's blocks, each labelled with the ranks that hold it."""
    ndim = len(layout.full_shape)
    if ndim == 0:
        return Text("A 0-d tensor: every rank holds the one value.", style="dim")
    if any(n == 0 for n in layout.full_shape):
        return Text(f"An empty tensor of shape {list(layout.full_shape)}.", style="dim")

    row_dim, col_dim = (None, 0) if ndim == 1 else (0, 1)
    col_cuts = _cuts(layout, col_dim)
    row_cuts = _cuts(layout, row_dim) if row_dim is not None else [0, 1]
    columns = _shown(list(zip(col_cuts, col_cuts[1:])), max_columns)
    rows = _shown(list(zip(row_cuts, row_cuts[1:])), max_rows)

    # Colour each distinct block by the order in which its main copy appears.
    colour_of = {}
    for _, piece in layout.main_pieces():
        colour_of.setdefault(piece.full, PALETTE[len(colour_of) % len(PALETTE)])

    table = Table(box=box.SQUARE, show_lines=True, padding=(0, 1), show_header=True, header_style="dim", expand=False)
    if row_dim is not None:
        table.add_column(f"dim {row_dim}", style="dim", justify="right", no_wrap=True)
    for interval in columns:
        table.add_column("…" if interval is None else f"{interval[0]}:{interval[1]}", justify="center", no_wrap=True)

    for row in rows:
        cells: List[RenderableType] = []
        if row is None:
            if row_dim is not None:
                cells.append("⋮")
            table.add_row(*cells, *["⋮" for _ in columns])
            continue
        if row_dim is not None:
            cells.append(f"{row[0]}:{row[1]}")
        for column in columns:
            if column is None:
                cells.append("…")
                continue
            holders = []
            colour = "white"
            for rank, pieces in enumerate(layout.pieces):
                for piece in pieces:
                    if _covers(piece.full, row_dim, row, col_dim, column):
                        holders.append(rank)
                        colour = colour_of.get(piece.full, colour)
                        break
            cells.append(Text(ranks_text(holders) if holders else "—", style=f"bold {colour}" if holders else "red"))
        table.add_row(*cells)

    notes = []
    split_beyond = [k for k in range(2, ndim) if len({p.full.start[k] for ps in layout.pieces for p in ps}) > 1]
    if split_beyond:
        dims = ", ".join(map(str, split_beyond))
        verb = "is" if len(split_beyond) == 1 else "are"
        notes.append(Text(f"dim {dims} {verb} split too: a cell's ranks hold parts of it", style="yellow"))
    caption = f"full {list(layout.full_shape)}: dim {col_dim} across" + (f", dim {row_dim} down" if row_dim is not None else "")
    return Group(Text(caption, style="dim"), table, *notes)


def _covers(full: Box, row_dim: Optional[int], row: Tuple[int, int], col_dim: int, column: Tuple[int, int]) -> bool:
    if not (full.start[col_dim] < column[1] and column[0] < full.stop[col_dim]):
        return False
    if row_dim is None:
        return True
    return full.start[row_dim] < row[1] and row[0] < full.stop[row_dim]


def rank_boxes(layout: Layout, limit: int = 8) -> Text:
    """List the full-tensor box of each rank's pieces, one rank a line."""
    text = Text()
    for rank, pieces in enumerate(layout.pieces[:limit]):
        boxes = " + ".join(str(p.full) for p in pieces) or "nothing"
        text.append(f"rank {rank}: ", style="dim")
        text.append(boxes + "\n")
    if layout.world_size > limit:
        text.append(f"… {layout.world_size - limit} more ranks\n", style="dim")
    return text
