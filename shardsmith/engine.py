"""Moving slices from one layout to another: merge, split and reshard are one operation.

A merge is a move to a single rank holding everything, a split a move from one, and a reshard
a move between two rank sets. `prepare_*` decides every parameter's source and target layout
without reading tensor data, and `execute` moves the bytes one parameter at a time. Each target
slice is streamed in C order, chunk by chunk: a run that is contiguous in a source slice is
handed on as a view of the memory-mapped source (no copy), any other band is copied into a
new buffer from the source boxes that overlap it. No slice is ever built whole, and the
source pages of a parameter are released once its chunks are written.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import dtypes as dt
from .errors import LayoutError, RankSetError, ShardsmithError, ValidationError
from .formats import CheckpointReader, TensorInfo
from .layout import Box, Copy, Layout, Shape
from .plan import ParamLayout, Plan, SliceResolver, is_scalar, resolve_full, resolve_slices
from .plugins import get_registry
from .rankset import Source
from .strategies.mirror import parameter_of

logger = logging.getLogger(__name__)

# Scalars that optimizers and ModelCheckpoint save next to the weights; `--weights-only` drops them.
OPTIMIZER_SCALARS = frozenset(
    {
        "learning_rate",
        "momentum",
        "global_step",
        "beta1_power",
        "beta2_power",
        "afactor_step",
        "weight_decay",
        "loss_scale",
        "epoch_num",
        "step_num",
        "cur_step_num",
        "cur_epoch_num",
        "current_iterator_step",
        "last_overflow_iterator_step",
    }
)


@dataclass(frozen=True)
class Selection:
    """The parameters a job moves, picked by `--include` / `--exclude` globs and `--weights-only`."""

    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    weights_only: bool = False

    def accepts(self, name: str, all_names: Sequence[str], mirror_prefixes: Sequence[str] = ()) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, g) for g in self.exclude):
            return False
        if self.weights_only:
            if name in OPTIMIZER_SCALARS:
                return False
            if parameter_of(name, all_names, mirror_prefixes) is not None:
                return False
        return True


@dataclass(frozen=True)
class ParamMove:
    """One parameter's source layout, target layout and replica policy."""

    name: str
    dtype: str
    source: Layout
    target: Layout
    replicas: str
    source_summary: str = ""
    target_summary: str = ""
    source_origin: str = ""  # why the source layout: "rule 2 (match = 'w*')", "default", "scalar", …

    @property
    def full_shape(self) -> Shape:
        return self.source.full_shape

    def target_nbytes(self, rank: int) -> int:
        return dt.expected_nbytes(self.dtype, self.target.slice_shapes[rank]) if self.dtype != dt.STRING else 0


@dataclass
class Job:
    """Everything decided before any byte moves: what is written where."""

    kind: str  # "merge", "split" or "reshard"
    moves: List[ParamMove]
    source_world: int
    target_world: int
    warnings: List[str] = field(default_factory=list)

    def entries(self, rank: int, source: Source) -> List[TensorInfo]:
        result = []
        for move in self.moves:
            if move.dtype == dt.STRING:
                info = source.info(move.name)
                result.append(TensorInfo(move.name, move.dtype, info.shape, info.nbytes))
            else:
                shape = move.target.slice_shapes[rank]
                result.append(TensorInfo(move.name, move.dtype, shape, dt.expected_nbytes(move.dtype, shape)))
        return result

    def total_bytes(self) -> int:
        return sum(m.target_nbytes(r) for m in self.moves for r in range(self.target_world))


class _LazyShapes(Mapping):
    """Slice shapes per parameter, asked of the rank set only for the parameters a plan touches."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __getitem__(self, name: str) -> List[Shape]:
        return self.source.slice_shapes(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.names)

    def __len__(self) -> int:
        return len(self.source.names)


def _selected_names(source: Source, plan: Plan, selection: Selection) -> List[str]:
    names = [n for n in source.names if selection.accepts(n, source.names, plan.mirror_prefixes)]
    if not names:
        raise ShardsmithError("no parameter is selected (check --include, --exclude and --weights-only)")
    return names


def _check_rank_consistency(source: Source, names: Sequence[str], selection: Selection, plan: Plan) -> Dict[str, str]:
    """Check every selected parameter is on every rank with one dtype; return name -> dtype."""
    for rank, extra in source.extra_names().items():
        extra = [n for n in extra if selection.accepts(n, source.names, plan.mirror_prefixes)]
        if extra:
            raise RankSetError(
                f"rank {rank} holds {', '.join(repr(n) for n in extra[:5])}{' …' if len(extra) > 5 else ''} "
                f"which rank 0 does not",
                path=source.paths[rank],
                param=extra[0],
            )
    dtypes = {}
    for name in source.names:
        dtypes[name] = source.info(name).dtype
    for name in names:
        missing = source.missing_ranks(name)
        if missing:
            raise RankSetError(
                f"missing from rank {', '.join(map(str, missing))}, whose file the layout says holds a slice of it",
                path=source.paths[missing[0]],
                param=name,
            )
        for rank in range(1, source.world_size):
            other = source.info(name, rank).dtype
            if other != dtypes[name]:
                raise ValidationError(
                    f"rank 0 holds it as {dtypes[name]} but rank {rank} as {other}", path=source.paths[rank], param=name
                )
    return dtypes


def _check_world_size(source: Source, plan: Plan, names: Sequence[str], dtypes: Mapping[str, str]) -> None:
    if source.world_size == plan.world_size:
        return
    where = f" ({plan.path})" if plan.path else ""
    if source.world_size > plan.world_size:
        raise RankSetError(
            f"the rank set has {source.world_size} ranks but the plan{where} has world_size {plan.world_size}",
            path=source.paths[0].parent.parent if source.world_size > 1 else source.paths[0],
        )
    missing = range(source.world_size, plan.world_size)
    details = _describe_lost_ranks(source, plan, names, dtypes, missing)
    raise RankSetError(
        f"the plan{where} has world_size {plan.world_size} but only ranks 0-{source.world_size - 1} are present; "
        f"missing rank{'s' if len(missing) > 1 else ''} {_rank_list(missing)}" + (f" ({details})" if details else ""),
        path=source.paths[0].parent.parent if source.world_size > 1 else source.paths[0],
    )


# Largest plan world size for which a missing-ranks error also lists what each missing rank
# would hold; laying the parameters out costs time and memory linear in the world size.
_MAX_DESCRIBED_WORLD_SIZE = 4096


def _rank_list(ranks: Sequence[int], limit: int = 16) -> str:
    """List rank numbers, eliding the middle of a long sequence (a `range` is never expanded)."""
    if len(ranks) <= limit:
        return ", ".join(map(str, ranks))
    return f"{', '.join(map(str, ranks[: limit // 2]))}, … {ranks[-1]} ({len(ranks)} ranks)"


def _describe_lost_ranks(
    source: Source, plan: Plan, names: Sequence[str], dtypes: Mapping[str, str], missing: Sequence[int]
) -> str:
    """Say which parameters each missing rank would hold, guessing every slice is rank 0's shape."""
    if plan.world_size > _MAX_DESCRIBED_WORLD_SIZE:
        return ""
    guessed = {n: [source.info(n).shape] * plan.world_size for n in source.names}
    lost: Dict[int, List[str]] = {r: [] for r in missing}
    try:
        layouts = resolve_slices(plan, source.names, dtypes, guessed, only=lambda n: n in names)
    except ShardsmithError:
        return ""
    for name, pl in layouts.items():
        present = {p.full for r in range(source.world_size) for p in pl.layout.pieces[r]}
        for r in missing:
            if any(p.full not in present for p in pl.layout.pieces[r]):
                lost[r].append(name)
    shown = [r for r in missing if lost[r]][:8]
    text = "; ".join(f"rank {r} would hold {', '.join(lost[r][:8])}{' …' if len(lost[r]) > 8 else ''}" for r in shown)
    if len([r for r in missing if lost[r]]) > len(shown):
        text += "; …"
    return text


def _check_int4(move: ParamMove) -> None:
    if not dt.packed_last_dim(move.dtype) or not move.full_shape:
        return
    last = move.full_shape[-1]
    for layout in (move.source, move.target):
        for pieces in layout.pieces:
            for piece in pieces:
                if piece.full.start[-1] != 0 or piece.full.stop[-1] != last:
                    raise LayoutError(
                        "an Int4 tensor split along its packed last dimension cannot be moved as bytes", param=move.name
                    )


def _source_resolver(source: Source, plan: Plan, selection: Selection) -> Tuple[List[str], Dict[str, str], SliceResolver]:
    names = _selected_names(source, plan, selection)
    dtypes = {n: source.info(n).dtype for n in source.names}
    _check_world_size(source, plan, names, dtypes)
    dtypes = _check_rank_consistency(source, names, selection, plan)
    return names, dtypes, SliceResolver(plan, source.names, dtypes, _LazyShapes(source), get_registry())


def _source_layouts(source: Source, plan: Plan, selection: Selection) -> Tuple[List[str], Dict[str, str], Dict[str, ParamLayout]]:
    names, dtypes, resolver = _source_resolver(source, plan, selection)
    return names, dtypes, {n: resolver.get(n) for n in names}


class _LazyFullShapes(Mapping):
    """Full shapes of a rank set's parameters, each resolved through the source plan when first asked.

    A target plan may lay out a selected optimizer state by a parameter the selection left out
    (`--include 'moments.*'`): that parameter's full shape must still be known.
    """

    def __init__(self, resolver: SliceResolver) -> None:
        self.resolver = resolver

    def __getitem__(self, name: str) -> Shape:
        return self.resolver.get(name).full_shape

    def __iter__(self) -> Iterator[str]:
        return iter(self.resolver.names)

    def __len__(self) -> int:
        return len(self.resolver.names)


def unused_rules(plan: Plan, names: Sequence[str]) -> List[str]:
    """Return a warning for every plan rule that matches no parameter: usually a typo in `match`."""
    warnings = []
    for rule in plan.rules:
        if not any(rule.matches(n) for n in names):
            where = f"{plan.path}: " if plan.path else ""
            warnings.append(f"{where}{rule.describe()} matches no parameter of the checkpoint")
    return warnings


def prepare_merge(source: Source, plan: Plan, selection: Selection = Selection(), replicas: Optional[str] = None) -> Job:
    """Decide a merge of a rank set into one full checkpoint."""
    names, dtypes, layouts = _source_layouts(source, plan, selection)
    moves = [
        ParamMove(
            n, dtypes[n], layouts[n].layout, Layout.replicated(layouts[n].full_shape, 1),
            replicas or layouts[n].replicas, layouts[n].summary, "full", layouts[n].origin,
        )
        for n in names
    ]
    for move in moves:
        _check_int4(move)
    return Job("merge", moves, source.world_size, 1, unused_rules(plan, source.names))


def prepare_split(source: Source, plan: Plan, selection: Selection = Selection()) -> Job:
    """Decide a split of one full checkpoint into a rank set."""
    if source.world_size != 1:
        raise ShardsmithError(
            f"split takes one full checkpoint, got a rank set of {source.world_size} files; use reshard for a rank set",
            path=source.paths[0],
        )
    names = _selected_names(source, plan, selection)
    dtypes = {info.name: info.dtype for info in source.infos()}
    shapes = {info.name: info.shape for info in source.infos()}
    layouts = resolve_full(plan, source.names, dtypes, shapes, only=set(names).__contains__)
    moves = [
        ParamMove(n, dtypes[n], Layout.replicated(shapes[n], 1), layouts[n].layout, "check", "full", layouts[n].summary)
        for n in names
    ]
    for move in moves:
        _check_int4(move)
    return Job("split", moves, 1, plan.world_size, unused_rules(plan, source.names))


def prepare_reshard(source: Source, plan: Plan, to_plan: Plan, selection: Selection = Selection(), replicas: Optional[str] = None) -> Job:
    """Decide a move from one rank set to another without writing the full checkpoint."""
    names, dtypes, resolver = _source_resolver(source, plan, selection)
    layouts = {n: resolver.get(n) for n in names}
    targets = resolve_full(to_plan, source.names, dtypes, _LazyFullShapes(resolver), only=set(names).__contains__)
    moves = [
        ParamMove(
            n, dtypes[n], layouts[n].layout, targets[n].layout, replicas or layouts[n].replicas,
            layouts[n].summary, targets[n].summary, layouts[n].origin,
        )
        for n in names
    ]
    for move in moves:
        _check_int4(move)
    return Job(
        "reshard", moves, source.world_size, to_plan.world_size,
        unused_rules(plan, source.names) + unused_rules(to_plan, source.names),
    )


# Bytes compared at once by same_bytes, which bounds its temporary boolean arrays.
_COMPARE_BYTES = 16 * 1024 * 1024


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Compare two arrays bit for bit (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return a.tobytes() == b.tobytes()
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    if a.ndim == 0 or a.nbytes <= _COMPARE_BYTES:
        return bool(np.array_equal(a.view(unsigned), b.view(unsigned)))
    row_bytes = a.nbytes // a.shape[0]
    if row_bytes > _COMPARE_BYTES and a.ndim > 1:
        return all(same_bytes(a[i], b[i]) for i in range(a.shape[0]))
    step = max(1, _COMPARE_BYTES // max(row_bytes, 1))
    return all(
        np.array_equal(a[i : i + step].view(unsigned), b[i : i + step].view(unsigned)) for i in range(0, a.shape[0], step)
    )


def _format_value(array: np.ndarray, dtype: str) -> str:
    """Format a small storage array as its values, each in the shortest form that is exact."""
    if dtype == "BFloat16":
        array = dt.to_float64(array, dtype).astype(np.float32)
    items = [str(x) for x in np.asarray(array).reshape(-1)]
    return items[0] if array.ndim == 0 else f"[{', '.join(items)}]"


def _describe_values(values: Sequence[np.ndarray], dtype: str) -> str:
    return ", ".join(f"rank {r}: {_format_value(v, dtype)}" for r, v in enumerate(values))


class _Arrays:
    """The source arrays of one parameter, opened on first use and released together.

    NOTE: a tensor stored in several records (a .ckpt tensor over 512 MiB) is joined into one
    array by the reader, so it stays resident at its full size until the parameter is written.
    """

    def __init__(self, readers: Sequence[CheckpointReader], name: str) -> None:
        self.readers = readers
        self.name = name
        self._cache: Dict[int, np.ndarray] = {}

    def __getitem__(self, rank: int) -> np.ndarray:
        if rank not in self._cache:
            try:
                self._cache[rank] = self.readers[rank].array(self.name)
            except ShardsmithError:
                raise
            except (ValueError, OSError) as exc:
                raise ShardsmithError(f"reading failed: {exc}", path=self.readers[rank].path, param=self.name) from exc
        return self._cache[rank]

    def release(self) -> None:
        self._cache.clear()
        for reader in self.readers:
            reader.release(self.name)

    def span(self, rank: int, box: Box) -> "SourceSpan":
        """Return the bytes of rank's content from the first to the last element of `box`."""
        array = self[rank]
        first = _offset(box.start, array.shape)
        last = _offset([b - 1 for b in box.stop], array.shape)
        return SourceSpan(rank, first * array.itemsize, (last + 1) * array.itemsize)

    def release_span(self, span: "SourceSpan") -> None:
        self.readers[span.rank].release_content(self.name, span.start, span.stop)


@dataclass(frozen=True)
class SourceSpan:
    """Bytes `[start, stop)` of source rank `rank`'s content of a parameter."""

    rank: int
    start: int
    stop: int


# Replicated tensors up to this many elements (global_step, a small norm weight) are reported
# with every rank's value; larger ones with the largest difference only.
_SHOWN_VALUES = 4


def check_replicas(move: ParamMove, arrays: _Arrays, source: Source, warn: Callable[[str], None]) -> None:
    """Check that copies the layout declares identical contain identical bytes, by the move's policy."""
    copies = move.source.copies()
    if not copies:
        return
    if move.source.is_replicated and math.prod(move.full_shape) <= _SHOWN_VALUES:
        # Small replicated values such as global_step: show every rank's value when they differ.
        values = [arrays[r] for r in range(move.source.world_size)]
        differing = [r for r, v in enumerate(values) if not same_bytes(values[0], v)]
        if differing:
            largest, rank = max((_largest_difference(values[0], values[r], move.dtype)[0], r) for r in differing)
            message = (
                f"replicated values differ across ranks ({_describe_values(values, move.dtype)}); "
                f"largest difference {largest:.6g}, between rank 0 and rank {rank}"
            )
            _replica_failure(move, message, warn, _path_of(source, rank))
        return
    for main_rank, main_piece, copy_rank, copy_piece in copies:
        a = arrays[main_rank][main_piece.local.slices()]
        b = arrays[copy_rank][copy_piece.local.slices()]
        if same_bytes(a, b):
            # Unmap each copy once checked, so that a tensor replicated on many ranks costs two
            # copies of resident memory, not one per rank.
            arrays.release_span(arrays.span(copy_rank, copy_piece.local))
            continue
        largest, worst = _largest_difference(a, b, move.dtype)
        message = (
            f"copies that should be identical differ: rank {main_rank} and rank {copy_rank} "
            f"(box {main_piece.full}), largest difference {largest:.6g} at index {list(map(int, worst))}"
        )
        _replica_failure(move, message, warn, _path_of(source, copy_rank))
        return


def _largest_difference(a: np.ndarray, b: np.ndarray, dtype: str) -> Tuple[float, Tuple[int, ...]]:
    """Return the largest absolute difference of two storage arrays as numbers, and its index.

    Elements that differ only as NaN payloads or where both are the same infinity count as 0;
    an infinity against a finite value counts as inf.
    """
    fa = dt.to_float64(np.ascontiguousarray(a), dtype)
    fb = dt.to_float64(np.ascontiguousarray(b), dtype)
    with np.errstate(invalid="ignore"):
        diff = np.abs(fa - fb)
    diff[np.isnan(fa) & np.isnan(fb)] = 0
    diff[(fa == fb)] = 0
    diff[np.isnan(diff)] = np.inf
    if not diff.size:
        return float("nan"), ()
    flat = int(np.argmax(diff))
    return float(diff.reshape(-1)[flat]), tuple(int(i) for i in np.unravel_index(flat, diff.shape))


def _path_of(source: Optional[Source], rank: int) -> Optional[Path]:
    """Return rank's file, or None where the slices come from memory (the msrun jobs pass no Source)."""
    return source.paths[rank] if source is not None else None


def _replica_failure(move: ParamMove, message: str, warn: Callable[[str], None], path: Optional[Path] = None) -> None:
    if move.replicas == "first":
        warn(f"parameter '{move.name}': {message}; keeping the lowest rank's copy (replicas = \"first\")")
        return
    if move.source_origin == "default":
        # No rule named it, so "replicated" was our assumption, not the user's: far more often a
        # split parameter the plan forgot than copies that drifted.
        raise ValidationError(
            f"no plan rule matches it, so it is taken as replicated, but {message}",
            path=path,
            param=move.name,
            hint="If it is split, add a rule for it to the plan (`shardsmith plan SRC --auto --like FULL.ckpt` "
            "infers one); if it is an optimizer state under a prefix of your own, add the prefix to "
            "[mirror] prefixes; if its copies legitimately drift, give it a rule with replicas = \"first\"",
        )
    raise ValidationError(
        message,
        path=path,
        param=move.name,
        hint='Set replicas = "first" on its plan rule (or --replicas first) to keep the lowest rank\'s copy',
    )


def check_strings(move: ParamMove, source: Source, warn: Callable[[str], None]) -> str:
    values = [reader.string(move.name) for reader in source.readers]
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        _replica_failure(move, f"replicated values differ across ranks ({shown})", warn)
    return values[0]


# Bytes of a target slice handed to the writer at once. Measured in benchmarks/RESULTS.md:
# large enough that the Python work and system calls per chunk do not show, small enough
# that several chunks fit in the writer's in-flight budget. Read at call time, so tests can
# patch it small.
CHUNK_BYTES = 8 * 1024 * 1024


def contiguous_blocks(shape: Shape, itemsize: int, chunk_bytes: int) -> Iterator[Box]:
    """Cut the C-order content of an array of `shape` into consecutive boxes, each contiguous.

    Each box is at most `chunk_bytes`, unless one element of the innermost dim that has to be
    cut is larger. A box spans whole trailing dims and a run of indices of one dim `d`, at one
    index of every dim before `d`.
    """
    if math.prod(shape) == 0:
        return
    ndim = len(shape)
    # Find the outermost dim d whose trailing dims fit in one chunk; `inner` is the bytes of one index of d.
    d = ndim
    inner = itemsize
    while d > 0 and inner * shape[d - 1] <= chunk_bytes:
        d -= 1
        inner *= shape[d]
    if d == 0:
        yield Box.whole(shape)
        return
    d -= 1
    step = max(1, chunk_bytes // inner)
    for outer in np.ndindex(*shape[:d]):
        for start in range(0, shape[d], step):
            stop = min(start + step, shape[d])
            yield Box(
                tuple(outer) + (start,) + (0,) * (ndim - d - 1),
                tuple(i + 1 for i in outer) + (stop,) + tuple(shape[d + 1 :]),
            )


def _is_contiguous(box: Box, shape: Shape) -> bool:
    """Tell whether `box` is one run of the C-order content of an array of `shape`."""
    cut = [k for k, (a, b) in enumerate(zip(box.start, box.stop)) if b - a > 1]
    if not cut:
        return True
    return all(box.start[k] == 0 and box.stop[k] == shape[k] for k in range(cut[0] + 1, len(shape)))


def _offset(index: Sequence[int], shape: Shape) -> int:
    """Return the C-order position of `index` in an array of `shape`."""
    position = 0
    for i, n in zip(index, shape):
        position = position * n + i
    return position


def _source_box(copy: Copy, target: Box) -> Box:
    """Return the part of `copy`'s source box that fills `target`, a part of its target box."""
    return target.shift([s - t for s, t in zip(copy.source.start, copy.target.start)])


def slice_chunks(
    move: ParamMove, arrays: _Arrays, rank: int, copies: Optional[List[Copy]] = None, chunk_bytes: Optional[int] = None
) -> Iterator[Tuple[np.ndarray, Optional[SourceSpan]]]:
    """Yield target `rank`'s slice of `move` in C order, as C-contiguous arrays of about `chunk_bytes`.

    A block of the slice made of runs that are contiguous in their source slices is yielded as
    those views of the sources, without a copy (a row split, a replicated tensor, most
    reshards along dim 0), each with the `SourceSpan` it views, whose pages the caller
    releases once the view is written. Any other block is copied into a new buffer from every
    source box that overlaps it (the span is None). What no source covers (padding) is zeros.
    """
    if copies is None:
        copies = move.source.copies_into(move.target, rank)
    shape = move.target.slice_shapes[rank]
    storage = dt.storage_dtype(move.dtype)
    for block in contiguous_blocks(shape, storage.itemsize, chunk_bytes or CHUNK_BYTES):
        parts = []
        for copy in copies:
            overlap = copy.target.intersect(block)
            if overlap is not None and overlap.size:
                parts.append((copy, _source_box(copy, overlap), overlap))
        if _tiles_in_order(parts, arrays, block, shape):
            for copy, source_box, _ in sorted(parts, key=lambda part: _offset(part[2].start, shape)):
                yield arrays[copy.source_rank][source_box.slices()], arrays.span(copy.source_rank, source_box)
            continue
        covered = sum(overlap.size for _, _, overlap in parts)
        band = np.empty(block.shape, storage) if covered == block.size else np.zeros(block.shape, storage)
        to_band = [-a for a in block.start]
        for copy, source_box, overlap in parts:
            band[overlap.shift(to_band).slices()] = arrays[copy.source_rank][source_box.slices()]
            arrays.release_span(arrays.span(copy.source_rank, source_box))
        yield band, None


def _tiles_in_order(parts: List[Tuple[Copy, Box, Box]], arrays: _Arrays, block: Box, shape: Shape) -> bool:
    """Tell whether the source boxes of `parts`, in C order, make up `block` with no copy.

    The target boxes are disjoint and inside `block`; when each is a contiguous run of the slice
    and of its source slice and they add up to the block, in C order they tile it exactly.
    """
    if sum(overlap.size for _, _, overlap in parts) != block.size:
        return False
    for copy, source_box, overlap in parts:
        if not _is_contiguous(overlap, shape) or not _is_contiguous(source_box, arrays[copy.source_rank].shape):
            return False
    return True


def as_bytes(array: np.ndarray) -> memoryview:
    """Return a C-contiguous array's content as a flat byte memoryview, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))


# Receives a str for a str entry, otherwise the slice's bytes in C order as an iterator of buffers.
Writer = Callable[[int, str, Union[str, Iterator[memoryview]]], None]
# `written(callback, ranks)`: call back once what was written so far for `ranks` (None: all) is written.
WrittenHook = Callable[[Callable[[], None], Optional[Sequence[int]]], None]


def execute(
    job: Job,
    source: Source,
    write: Optional[Writer],
    *,
    written: Optional[WrittenHook] = None,
    progress: Optional[Callable[[int], None]] = None,
    warn: Optional[Callable[[str], None]] = None,
    chunk_bytes: Optional[int] = None,
) -> None:
    """Move every parameter of `job`; with `write=None` only validate (a dry run reads the replicas too).

    `write(rank, name, value)` gets every target rank's value of each parameter, in order. A
    writer that queues the chunks instead of writing them at once passes `written`:
    `written(callback, ranks)` must call `callback` once everything handed to `write` so far for
    `ranks` (None for all) is written. The callbacks release source pages that queued views use.
    """
    warn = warn or (lambda message: logger.warning("%s", message))
    for move in job.moves:
        if move.dtype == dt.STRING:
            value = check_strings(move, source, warn)
            if write is not None:
                for rank in range(job.target_world):
                    write(rank, move.name, value)
            if progress:
                progress(0)
            continue
        arrays = _Arrays(source.readers, move.name)
        try:
            check_replicas(move, arrays, source, warn)
            if write is not None:
                # Target ranks that hold copies read the same source pages; only the last of
                # each group releases them chunk by chunk, so the others do not unmap pages
                # that are still to be written.
                releasing = {max(group) for group in move.target.replica_groups()}
                for rank in range(job.target_world):
                    hook = written if rank in releasing else _keep_pages
                    write(rank, move.name, _stream(move, arrays, rank, hook, chunk_bytes))
        except BaseException:
            arrays.release()
            raise
        if written is not None and write is not None:
            written(arrays.release, None)
        else:
            arrays.release()
        if progress:
            progress(sum(move.target_nbytes(r) for r in range(job.target_world)))


def _keep_pages(callback: Callable[[], None], ranks: Optional[Sequence[int]]) -> None:
    """A `written` hook that drops the release: the parameter's release at its end still comes."""


def _stream(move: ParamMove, arrays: _Arrays, rank: int, written: Optional[WrittenHook], chunk_bytes: Optional[int]):
    """Yield rank's slice as bytes, releasing the source pages of each view once it is written."""
    for chunk, span in slice_chunks(move, arrays, rank, chunk_bytes=chunk_bytes):
        yield as_bytes(chunk)
        if span is None:
            continue
        # The writer asks for the next chunk only once it has taken this one.
        if written is None:
            arrays.release_span(span)
        else:
            written(functools.partial(arrays.release_span, span), [rank])
