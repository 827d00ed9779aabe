"""Which part of a full tensor each rank holds.

A `Layout` maps every rank's slice onto the full tensor as a list of `Piece`s: a box of the slice
and the same-shaped box of the full tensor. One piece per rank is the usual MindSpore case
(`from_tensor_map`), but a strategy may cut a slice into several pieces (a fused QKV weight whose
slice is [q_r; k_r; v_r]) or leave part of a slice uncovered (padding rows, which are zeros on
split and ignored on merge). Merge, split, reshard and the msrun jobs all work from pieces, so a
plugin layout is moved by the same code as a built-in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import LayoutError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A rectangular region: `start[k] <= index[k] < stop[k]` on every dimension."""

    start: Shape
    stop: Shape

    @classmethod
    def whole(cls, shape: Sequence[int]) -> "Box":
        return cls(tuple(0 for _ in shape), tuple(int(n) for n in shape))

    @classmethod
    def at(cls, offset: Sequence[int], shape: Sequence[int]) -> "Box":
        return cls(tuple(offset), tuple(o + n for o, n in zip(offset, shape)))

    @property
    def shape(self) -> Shape:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.start)

    def slices(self) -> Tuple[slice, ...]:
        """Index expression for numpy: `array[box.slices()]`."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def intersect(self, other: "Box") -> Optional["Box"]:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        if any(a >= b for a, b in zip(start, stop)):
            return None
        return Box(start, stop)

    def shift(self, delta: Sequence[int]) -> "Box":
        return Box(
            tuple(a + d for a, d in zip(self.start, delta)),
            tuple(b + d for b, d in zip(self.stop, delta)),
        )

    def project(self, dims: Sequence[int]) -> "Box":
        return Box(tuple(self.start[d] for d in dims), tuple(self.stop[d] for d in dims))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop)) + "]"


@dataclass(frozen=True)
class Piece:
    """A part of one rank's slice (`local`) and where it sits in the full tensor (`full`)."""

    local: Box
    full: Box

    def __post_init__(self) -> None:
        if self.local.shape != self.full.shape:
            raise ValueError(f"piece boxes differ in shape: {self.local} vs {self.full}")


@dataclass(frozen=True)
class Copy:
    """One region to move: `size` elements box-shaped, from a source slice to a target slice."""

    source_rank: int
    source: Box
    target: Box


@dataclass(frozen=True)
class Layout:
    """The slice shape and pieces of every rank, for one parameter of `full_shape`.

    Ranks whose pieces cover the same full box hold copies of it; the lowest such rank is the
    main copy that merge reads, the others are checked against it (or ignored, by policy).
    """

    full_shape: Shape
    slice_shapes: Tuple[Shape, ...]
    pieces: Tuple[Tuple[Piece, ...], ...]
    description: str = ""

    @property
    def world_size(self) -> int:
        return len(self.slice_shapes)

    @classmethod
    def replicated(cls, full_shape: Sequence[int], world_size: int) -> "Layout":
        shape = tuple(int(n) for n in full_shape)
        whole = Piece(Box.whole(shape), Box.whole(shape))
        return cls(shape, (shape,) * world_size, ((whole,),) * world_size, "replicated")

    @property
    def is_replicated(self) -> bool:
        whole = Box.whole(self.full_shape)
        return all(
            len(p) == 1 and p[0].full == whole and s == self.full_shape
            for s, p in zip(self.slice_shapes, self.pieces)
        )

    def main_pieces(self) -> List[Tuple[int, Piece]]:
        """Return (rank, piece) for the lowest rank holding each distinct full box."""
        seen: Dict[Box, int] = {}
        result = []
        for rank, pieces in enumerate(self.pieces):
            for piece in pieces:
                if piece.full not in seen:
                    seen[piece.full] = rank
                    result.append((rank, piece))
        return result

    def _main_boxes(self) -> Tuple[List[Tuple[int, Piece]], np.ndarray, np.ndarray]:
        """Return main_pieces() with their full boxes' starts and stops as arrays, computed once per layout."""
        cached = self.__dict__.get("_main_boxes_cache")
        if cached is None:
            mains = self.main_pieces()
            ndim = len(self.full_shape)
            starts = np.array([p.full.start for _, p in mains], dtype=np.int64).reshape(len(mains), ndim)
            stops = np.array([p.full.stop for _, p in mains], dtype=np.int64).reshape(len(mains), ndim)
            cached = (mains, starts, stops)
            # The dataclass is frozen; the cache is derived data, not a field, so it takes no part in == or hash.
            object.__setattr__(self, "_main_boxes_cache", cached)
        return cached

    def copies(self) -> List[Tuple[int, Piece, int, Piece]]:
        """Return (main rank, main piece, copy rank, copy piece) for every redundant piece."""
        main: Dict[Box, Tuple[int, Piece]] = {}
        result = []
        for rank, pieces in enumerate(self.pieces):
            for piece in pieces:
                if piece.full in main:
                    main_rank, main_piece = main[piece.full]
                    result.append((main_rank, main_piece, rank, piece))
                else:
                    main[piece.full] = (rank, piece)
        return result

    def replica_groups(self) -> List[List[int]]:
        """Group ranks that hold identical slices (the same full boxes at the same places)."""
        groups: Dict[Tuple[Piece, ...], List[int]] = {}
        for rank, pieces in enumerate(self.pieces):
            groups.setdefault(pieces, []).append(rank)
        return list(groups.values())

    def check_coverage(self, name: str) -> None:
        """Raise LayoutError unless the distinct full boxes tile the full tensor, each element once.

        Checked by index ranges: every box lies inside the full shape, no two distinct boxes
        overlap, and their sizes add up to the full tensor's size.
        """
        if math.prod(self.full_shape) == 0:
            # A tensor with a 0 dim (or a str entry, dims [0]) has no element to cover, and its
            # boxes are empty, which `intersect` cannot tell from disjoint.
            return
        whole = Box.whole(self.full_shape)
        boxes = [piece.full for _, piece in self.main_pieces()]
        for box in boxes:
            if box.intersect(whole) != box:
                raise LayoutError(f"a slice box {box} lies outside the full shape {list(self.full_shape)}", param=name)
        overlapping = _find_overlap(boxes, self.full_shape)
        if overlapping is not None:
            a, b = overlapping
            raise LayoutError(f"slice boxes {a} and {b} overlap without being copies", param=name)
        covered = sum(box.size for box in boxes)
        if covered != math.prod(self.full_shape):
            raise LayoutError(
                f"the slices cover {covered} of {math.prod(self.full_shape)} elements of the full shape "
                f"{list(self.full_shape)}",
                param=name,
            )
        for rank, (shape, pieces) in enumerate(zip(self.slice_shapes, self.pieces)):
            own = Box.whole(shape)
            for piece in pieces:
                if piece.local.intersect(own) != piece.local:
                    raise LayoutError(f"rank {rank}'s piece {piece.local} lies outside its slice {list(shape)}", param=name)

    def ranks_holding(self, box: Box) -> List[int]:
        return [r for r, pieces in enumerate(self.pieces) if any(p.full.intersect(box) for p in pieces)]

    def copies_into(self, target: "Layout", target_rank: int) -> List[Copy]:
        """Plan how to assemble `target_rank`'s slice of `target` from this layout's slices.

        Each element is read from the main copy holding it, so a reshard never stacks replicas.
        Regions of the target slice that no target piece covers are padding and are left out.
        """
        if target.full_shape != self.full_shape:
            raise LayoutError(
                f"source full shape {list(self.full_shape)} differs from target full shape {list(target.full_shape)}"
            )
        result = []
        mains, starts, stops = self._main_boxes()
        for tpiece in target.pieces[target_rank]:
            # One vectorized test over all main boxes: a Python loop over every pair is quadratic
            # in the world size (16 M intersections per parameter for a 4096 -> 4096 reshard).
            hits = np.all(starts < np.asarray(tpiece.full.stop, dtype=np.int64), axis=1) & np.all(
                stops > np.asarray(tpiece.full.start, dtype=np.int64), axis=1
            )
            for index in np.flatnonzero(hits):
                srank, spiece = mains[index]
                overlap = spiece.full.intersect(tpiece.full)
                if overlap is None or overlap.size == 0:
                    continue
                source = overlap.shift([a - b for a, b in zip(spiece.local.start, spiece.full.start)])
                dest = overlap.shift([a - b for a, b in zip(tpiece.local.start, tpiece.full.start)])
                result.append(Copy(srank, source, dest))
        return result

    def project(self, dims: Sequence[int]) -> "Layout":
        """Keep only `dims` of this layout: the split of a state that keeps some of the parameter's dimensions."""
        full = tuple(self.full_shape[d] for d in dims)
        slice_shapes = tuple(tuple(s[d] for d in dims) for s in self.slice_shapes)
        pieces = []
        for rank_pieces in self.pieces:
            kept: List[Piece] = []
            for piece in rank_pieces:
                projected = Piece(piece.local.project(dims), piece.full.project(dims))
                if projected not in kept:
                    kept.append(projected)
            pieces.append(tuple(kept))
        return Layout(full, slice_shapes, tuple(pieces), self.description)


# Largest grid of cells `_find_overlap` counts in; past it, it compares the boxes pairwise.
_MAX_COVERAGE_CELLS = 1 << 24


def _find_overlap(boxes: Sequence[Box], full_shape: Shape) -> Optional[Tuple[Box, Box]]:
    """Return two boxes that share an element, or None.

    The box edges cut the tensor into a grid of cells, each inside or outside every box, so
    counting how many boxes cover each cell finds an overlap in time linear in the cells covered.
    Comparing every pair instead takes minutes for a parameter split over a few thousand ranks.
    """
    edges = []
    for k, size in enumerate(full_shape):
        edges.append(sorted({0, size, *(box.start[k] for box in boxes), *(box.stop[k] for box in boxes)}))
    if math.prod(len(e) - 1 for e in edges) > _MAX_COVERAGE_CELLS:
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap = a.intersect(b)
                if overlap is not None and overlap.size:
                    return a, b
        return None

    import numpy as np

    position = [{edge: i for i, edge in enumerate(e)} for e in edges]
    counts = np.zeros([len(e) - 1 for e in edges], np.int32)
    for box in boxes:
        counts[tuple(slice(position[k][box.start[k]], position[k][box.stop[k]]) for k in range(len(edges)))] += 1
    if counts.size == 0 or counts.max() <= 1:
        return None
    cell = np.unravel_index(int(np.argmax(counts)), counts.shape)
    point = [edges[k][int(i)] for k, i in enumerate(cell)]
    holding = [box for box in boxes if all(a <= x < b for a, x, b in zip(box.start, point, box.stop))]
    return holding[0], holding[1]


TensorMapEntry = Union[int, Sequence[int]]


def rank_coordinate(rank: int, dev_matrix: Sequence[int]) -> Tuple[int, ...]:
    """Return rank's coordinate in dev_matrix, row-major (last axis fastest), as MindSpore numbers ranks."""
    coord = []
    for n in reversed(dev_matrix):
        coord.append(rank % n)
        rank //= n
    return tuple(reversed(coord))


def from_tensor_map(
    full_shape: Sequence[int],
    dev_matrix: Sequence[int],
    tensor_map: Sequence[TensorMapEntry],
    *,
    name: str = "",
    description: str = "",
) -> Layout:
    """Build the layout MindSpore's strategy files describe.

    Entry k of tensor_map names the dev_matrix axis that splits tensor dim k, counted from the last
    axis (0 = last); -1 leaves the dim whole. An entry may also be a list of axes, outermost first,
    when several axes split one dim. Ranks that differ only on unmapped axes hold copies.
    """
    full_shape = tuple(int(n) for n in full_shape)
    dev_matrix = tuple(int(n) for n in dev_matrix)
    param = name or None
    if len(tensor_map) != len(full_shape):
        raise LayoutError(
            f"tensor_map {list(tensor_map)} has {len(tensor_map)} entries but the tensor has {len(full_shape)} "
            f"dimensions (shape {list(full_shape)})",
            param=param,
        )
    if any(n < 1 for n in dev_matrix):
        raise LayoutError(f"dev_matrix {list(dev_matrix)} has an axis smaller than 1", param=param)
    axes_per_dim: List[Tuple[int, ...]] = []
    used: List[int] = []
    for k, entry in enumerate(tensor_map):
        entries = (entry,) if isinstance(entry, int) else tuple(entry)
        axes = []
        for m in entries:
            if m == -1:
                continue
            if not 0 <= m < len(dev_matrix):
                raise LayoutError(
                    f"tensor_map entry {m} for dim {k} names no axis of dev_matrix {list(dev_matrix)}", param=param
                )
            if m in used:
                raise LayoutError(f"tensor_map {list(tensor_map)} uses device axis {m} twice", param=param)
            used.append(m)
            axes.append(len(dev_matrix) - 1 - m)
        axes_per_dim.append(tuple(axes))

    parts = [math.prod(dev_matrix[a] for a in axes) for axes in axes_per_dim]
    for k, (size, n) in enumerate(zip(full_shape, parts)):
        if size % n:
            raise LayoutError(f"dim {k} of size {size} does not divide into {n} parts", param=param)
    block = tuple(size // n for size, n in zip(full_shape, parts))

    world_size = math.prod(dev_matrix)
    pieces = []
    for rank in range(world_size):
        coord = rank_coordinate(rank, dev_matrix)
        index = []
        for axes in axes_per_dim:
            i = 0
            for a in axes:
                i = i * dev_matrix[a] + coord[a]
            index.append(i)
        offset = tuple(i * b for i, b in zip(index, block))
        pieces.append((Piece(Box.whole(block), Box.at(offset, block)),))
    return Layout(full_shape, (block,) * world_size, tuple(pieces), description)


def split_counts(tensor_map: Sequence[TensorMapEntry], dev_matrix: Sequence[int]) -> List[int]:
    """Return into how many parts each tensor dim is cut."""
    counts = []
    for entry in tensor_map:
        entries = (entry,) if isinstance(entry, int) else tuple(entry)
        counts.append(math.prod(dev_matrix[len(dev_matrix) - 1 - m] for m in entries if m != -1))
    return counts

