"""Inferring a plan from a rank set, and writing plans compactly.

Slice shapes alone cannot tell a layout: a row split and a replicated tensor give the same slice
shape, and so do a row and a column split. The evidence used here is what is really known:

- the bytes each rank holds: ranks with equal digests hold copies, so one digest on every rank
  means replicated and the groups of equal ranks pin down how many parts a split has and which
  ranks are data-parallel copies;
- a reference checkpoint of the same network on one device (`like`). It gives the full shapes,
  and with them the split factor of every dimension. Where its values equal the slices', they
  also tell apart layouts that shapes and copies cannot;
- optimizer-state names, which make a state follow its parameter (`mirror`).

Where the evidence allows several layouts, the built-in one is taken: `replicate`, `row`,
`column` and `grid` (row-major tiles, model-parallel ranks adjacent) come before a `tensor_map`
that orders the device axes differently. What stays open is reported with the layouts that
remain, never guessed.

The second half writes plans: `compact_rules` turns one assignment per parameter into few
`[[param]]` rules with globs (`layers.*.attention.wq.weight`), checking every glob against all
names so the plan means exactly what was assigned. The TUI saves through it too.

This module imports neither Textual nor MindSpore.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .errors import LayoutError, ShardsmithError
from .layout import Layout, Shape, from_tensor_map
from .plan import ParamLayout, Plan, Rule, is_scalar
from .plugins import StrategyRegistry, get_registry
from .rankset import Source, open_source
from .strategies.base import LayoutContext
from .strategies.mirror import parameter_of


# Buffers that data-parallel ranks update on their own, so their copies differ (the last name
# component of nn.BatchNorm's running statistics in MindSpore 2.10).
UNSYNCHRONIZED_BUFFERS = ("moving_mean", "moving_variance")

# Device-axis orders tried per parameter are (split dims + 1)!; past this many split dims only
# the row-major order is tried, which is the one preferred anyway.
MAX_PERMUTED_AXES = 4


# -- assignments -------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Assignment:
    """A strategy with its options and replica policy, as one plan rule would assign it.

    Option values are stored frozen (lists as tuples) and options left at `None` are dropped, so
    two assignments that write the same rule compare equal.
    """

    strategy: str
    options: Tuple[Tuple[str, Any], ...] = ()
    replicas: str = "check"

    @classmethod
    def make(cls, strategy: str, options: Optional[Mapping[str, Any]] = None, replicas: str = "check") -> "Assignment":
        items = tuple((k, _freeze(v)) for k, v in (options or {}).items() if v is not None)
        return cls(strategy, items, replicas)

    @classmethod
    def from_rule(cls, rule: Rule) -> "Assignment":
        return cls.make(rule.strategy, dict(rule.options), rule.replicas)

    def option_dict(self) -> Dict[str, Any]:
        return {k: _thaw(v) for k, v in self.options}

    def summary(self) -> str:
        """Return the strategy and its options in one line: `grid(grid=[2, 2])`, `row`."""
        shown = ", ".join(f"{k}={_thaw(v)}" for k, v in self.options)
        text = f"{self.strategy}({shown})" if shown else self.strategy
        if self.replicas != "check":
            text += f" [replicas={self.replicas}]"
        return text

    def rule(self, match: str, index: int) -> Rule:
        return Rule(match, self.strategy, tuple((k, _thaw(v)) for k, v in self.options), self.replicas, index)


REPLICATE = Assignment("replicate")


# -- evidence: bytes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankBytes:
    """The digest of each rank's slice, and whether rank 0's slice is one value repeated.

    A constant slice (all zeros, all ones) proves nothing about copies: a split tensor of
    zeros has equal bytes on every rank too.
    """

    digests: Tuple[bytes, ...]
    constant: bool

    def partition(self) -> List[List[int]]:
        """Group the ranks that hold equal bytes, in order of their lowest rank."""
        groups: Dict[bytes, List[int]] = {}
        for rank, digest in enumerate(self.digests):
            groups.setdefault(digest, []).append(rank)
        return list(groups.values())

    @property
    def all_equal(self) -> bool:
        return len(set(self.digests)) == 1


def _uint_view(array: np.ndarray) -> np.ndarray:
    """Return the elements as unsigned integers of the same size, so equality is bitwise (NaN == NaN)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(f"u{flat.dtype.itemsize}") if flat.dtype.itemsize in (1, 2, 4, 8) else flat.view(np.uint8)


def digest_array(array: np.ndarray) -> bytes:
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.blake2b(data.data, digest_size=16).digest()


def rank_bytes(source: Source, name: str) -> RankBytes:
    """Hash `name`'s slice on every rank, one rank at a time, releasing each slice's pages after."""
    digests = []
    constant = False
    for rank, reader in enumerate(source.readers):
        array = reader.array(name)
        digests.append(digest_array(array))
        if rank == 0:
            values = _uint_view(array)
            constant = values.size == 0 or bool(np.all(values == values[0]))
        del array
        reader.release(name)
    return RankBytes(tuple(digests), constant)


# -- evidence: layouts that fit the shapes -------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A layout that fits the full and slice shapes, and the rule that produces it."""

    assignment: Assignment
    layout: Layout

    @property
    def summary(self) -> str:
        return self.assignment.summary()


def _partition_of(layout: Layout) -> List[List[int]]:
    return sorted(layout.replica_groups())


def _refines(layout: Layout, partition: Sequence[Sequence[int]]) -> bool:
    """Return whether the ranks of every group of copies in `layout` have equal digests."""
    class_of = {rank: i for i, group in enumerate(partition) for rank in group}
    return all(len({class_of[r] for r in group}) == 1 for group in layout.replica_groups())


def _same_layout(a: Layout, b: Layout) -> bool:
    return a.full_shape == b.full_shape and a.slice_shapes == b.slice_shapes and a.pieces == b.pieces


def _builtin_layout(assignment: Assignment, full: Shape, world_size: int, name: str, registry: StrategyRegistry) -> Layout:
    strategy = registry.get(assignment.strategy).from_options(assignment.option_dict(), where=f"inferred layout of '{name}'")
    ctx = LayoutContext(name, [name], lambda other: Layout.replicated((), world_size))
    return strategy.layout(tuple(full), world_size, ctx)


def split_factors(full: Shape, slice_shape: Shape) -> Optional[Tuple[int, ...]]:
    """Return how many parts each dim is cut into, or None when the slice does not divide the full shape."""
    if len(full) != len(slice_shape):
        return None
    factors = []
    for whole, part in zip(full, slice_shape):
        if part == 0:
            if whole != 0:
                return None
            factors.append(1)
        elif whole % part:
            return None
        else:
            factors.append(whole // part)
    return tuple(factors)


def layout_candidates(
    full: Shape, slice_shape: Shape, world_size: int, name: str, registry: Optional[StrategyRegistry] = None
) -> List[Candidate]:
    """List the layouts, built-in and `tensor_map`, that cut `full` into slices of `slice_shape`.

    The order is the preference: the built-in strategy first, then the other orders of the device
    axes (data-parallel axis and one axis per split dim) as `tensor_map`s. Returns [] when the
    shapes do not fit any layout over `world_size` ranks.
    """
    registry = registry or get_registry()
    factors = split_factors(full, slice_shape)
    if factors is None:
        return []
    split_dims = [k for k, f in enumerate(factors) if f > 1]
    parts = math.prod(factors)
    if world_size % parts:
        return []
    data_parallel = world_size // parts

    builtin: Optional[Assignment] = None
    if not split_dims:
        builtin = REPLICATE
    elif split_dims == [0]:
        builtin = Assignment.make("row", {"parts": None if parts == world_size else parts})
    elif split_dims == [1]:
        builtin = Assignment.make("column", {"parts": None if parts == world_size else parts})
    elif split_dims == [0, 1]:
        builtin = Assignment.make("grid", {"grid": [factors[0], factors[1]]})

    result: List[Candidate] = []
    if builtin is not None:
        result.append(Candidate(builtin, _builtin_layout(builtin, full, world_size, name, registry)))
    if not split_dims:
        return result

    # Axes outermost first: the data-parallel copies, then one axis per split dim in dim order.
    # That order is MindSpore's usual device matrix; the other orders come after it.
    axes: List[Tuple[Optional[int], int]] = ([(None, data_parallel)] if data_parallel > 1 else []) + [
        (k, factors[k]) for k in split_dims
    ]
    orders = itertools.permutations(axes) if len(axes) <= MAX_PERMUTED_AXES else [tuple(axes)]
    for order in orders:
        dev_matrix = [size for _, size in order]
        tensor_map: List[int] = [-1] * len(full)
        for position, (dim, _) in enumerate(order):
            if dim is not None:
                tensor_map[dim] = len(order) - 1 - position
        layout = from_tensor_map(full, dev_matrix, tensor_map, name=name)
        if any(_same_layout(layout, c.layout) for c in result):
            continue
        assignment = Assignment.make("tensor_map", {"dev_matrix": dev_matrix, "tensor_map": tensor_map})
        result.append(Candidate(assignment, layout))
    return result


def _matches_values(candidate: Candidate, source: Source, name: str, reference: np.ndarray) -> bool:
    """Return whether every rank's slice equals the reference tensor's values at its pieces, bit for bit."""
    ref = _uint_view(reference).reshape(reference.shape) if reference.ndim else _uint_view(reference)
    for rank, pieces in enumerate(candidate.layout.pieces):
        array = source.readers[rank].array(name)
        held = _uint_view(array).reshape(array.shape)
        try:
            for piece in pieces:
                if not np.array_equal(held[piece.local.slices()], ref[piece.full.slices()]):
                    return False
        finally:
            del array, held
            source.readers[rank].release(name)
    return True


# -- inference -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inference:
    """What was inferred for one parameter.

    `summary` is the layout for tables ("row", "grid(grid=[2, 2])", "replicate", "mirror of 'w'",
    or "?" when undecided). `certain` is True when the evidence allows only this layout.
    `reason` names the evidence that decided it, or what is missing. `assignment` is the rule to
    write. It is None for scalars, for states that follow their parameter by default, and for
    undecided parameters. `candidates` lists the layouts still open.
    """

    name: str
    summary: str
    certain: bool
    reason: str
    assignment: Optional[Assignment] = None
    decided: bool = True
    follows: Optional[str] = None
    full_shape: Optional[Shape] = None
    candidates: Tuple[str, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "inferred": self.summary,
            "decided": self.decided,
            "certain": self.certain,
            "reason": self.reason,
            "follows": self.follows,
            "full_shape": list(self.full_shape) if self.full_shape is not None else None,
            "rule": None
            if self.assignment is None
            else {"strategy": self.assignment.strategy, **self.assignment.option_dict(), **(
                {"replicas": self.assignment.replicas} if self.assignment.replicas != "check" else {})},
            "candidates": list(self.candidates),
        }


def _ranks_text(ranks: Sequence[int]) -> str:
    return ",".join(map(str, ranks))


def _groups_text(partition: Sequence[Sequence[int]]) -> str:
    return " | ".join(_ranks_text(g) for g in partition)


def _undecided(name: str, reason: str, candidates: Sequence[str] = (), full: Optional[Shape] = None) -> Inference:
    return Inference(name, "?", False, reason, None, False, None, full, tuple(candidates))


class _Reference:
    """The `like` checkpoint: full shapes and values by name, read one tensor at a time."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.path = source.paths[0]

    def shape(self, name: str) -> Optional[Shape]:
        info = self.source.info(name)
        return tuple(info.shape) if info is not None else None

    def dtype(self, name: str) -> Optional[str]:
        info = self.source.info(name)
        return info.dtype if info is not None else None

    def array(self, name: str) -> np.ndarray:
        return self.source.readers[0].array(name)

    def release(self, name: str) -> None:
        self.source.readers[0].release(name)


def open_reference(like: Union[Path, str, Source], format: Optional[str] = None, *, verify_crc: bool = True) -> Source:
    """Open the `--like` checkpoint; it must be one full checkpoint, not a rank set."""
    if isinstance(like, Source):
        reference = like
    else:
        reference = open_source([Path(like)], format=format, verify_crc=verify_crc)
    if reference.world_size != 1:
        path = reference.paths[0].parent.parent
        reference.close()
        raise ShardsmithError(
            f"--like needs one full checkpoint, but this is a rank set of {reference.world_size} ranks",
            path=path,
            hint="Give the checkpoint of the same network saved on a single device",
        )
    return reference


def _infer_from_full(
    name: str,
    full: Shape,
    slice_shape: Shape,
    world_size: int,
    held: Optional[RankBytes],
    source: Source,
    reference: Optional[_Reference],
    registry: StrategyRegistry,
    how_full: str,
) -> Inference:
    """Decide among the layouts that cut `full` into `slice_shape`, using the bytes as evidence."""
    candidates = layout_candidates(full, slice_shape, world_size, name, registry)
    if not candidates:
        return _undecided(
            name,
            f"{how_full} {list(full)} and slices {list(slice_shape)} fit no layout over {world_size} ranks",
            full=full,
        )
    notes: List[str] = [f"{how_full} {list(full)}, slices {list(slice_shape)}"]
    pool = candidates
    exact: List[Candidate] = []
    informative = held is not None and not held.constant and world_size > 1
    if held is not None and world_size > 1:
        partition = held.partition()
        if not informative:
            notes.append("every slice is one repeated value, so equal bytes prove nothing")
        else:
            consistent = [c for c in candidates if _refines(c.layout, partition)]
            if not consistent and candidates[0].assignment == REPLICATE:
                # The shapes leave only copies, so the copies have drifted apart.
                first = Assignment("replicate", (), "first")
                return Inference(
                    name,
                    first.summary(),
                    False,
                    f"{notes[0]}: every rank holds a copy, but the copies differ (ranks "
                    f"{_groups_text(partition)}), as unsynchronized buffers do; merge takes rank 0's "
                    'with replicas = "first"',
                    first,
                    True,
                    None,
                    tuple(full),
                    (first.summary(),),
                )
            if not consistent:
                return _undecided(
                    name,
                    f"{notes[0]}, but no layout puts copies where the ranks hold equal bytes "
                    f"(equal: {_groups_text(partition)})",
                    [c.summary for c in candidates],
                    full,
                )
            exact = [c for c in consistent if _partition_of(c.layout) == sorted(partition)]
            pool = exact or consistent
            if not exact:
                notes.append(f"ranks {_groups_text(partition)} hold equal bytes, more copies than any layout explains")
            elif len(partition) == world_size:
                notes.append("every rank holds different bytes")
            elif len(partition) == 1:
                notes.append(f"all {world_size} ranks hold identical bytes")
            else:
                notes.append(f"copies on ranks {_groups_text(partition)}")

    by_values = False
    if len(pool) > 1 and reference is not None and reference.shape(name) == tuple(full):
        ref_array = reference.array(name)
        try:
            matching = [c for c in pool if _matches_values(c, source, name, ref_array)]
        finally:
            del ref_array
            reference.release(name)
        if matching:
            pool = matching
            by_values = len(matching) == 1
            notes.append("the reference's values match" + ("" if by_values else f" {len(matching)} layouts"))
        else:
            notes.append("the reference's values differ from the slices, so they cannot tell the layouts apart")

    chosen = pool[0]
    certain = len(pool) == 1
    if len(pool) > 1:
        others = ", ".join(c.summary for c in pool[1:4]) + (", …" if len(pool) > 4 else "")
        notes.append(f"also fits: {others}; took the built-in, row-major one")
    return Inference(
        name,
        chosen.summary,
        certain,
        "; ".join(notes),
        chosen.assignment,
        True,
        None,
        tuple(full),
        tuple(c.summary for c in pool),
    )


def _infer_without_full(
    name: str, slice_shape: Shape, world_size: int, held: Optional[RankBytes], source: Source, registry: StrategyRegistry
) -> Inference:
    """Infer from slices and bytes alone: replicated, or a split whose dimension only 1-D tensors show."""
    if world_size == 1:
        return Inference(name, "replicate", True, "a single rank holds the whole tensor", REPLICATE, True, None, slice_shape)
    if held is None:
        return _undecided(
            name,
            f"every rank holds a slice of {list(slice_shape)}: replicated or split, the shapes cannot tell; "
            "give --like FULL.ckpt or let the bytes be checked",
        )
    partition = held.partition()
    if len(partition) == 1:
        if held.constant:
            return Inference(
                name,
                "replicate",
                False,
                f"all {world_size} ranks hold identical bytes, but every slice is one repeated value and a split "
                "tensor would look the same; give --like FULL.ckpt to be sure",
                REPLICATE,
                True,
                None,
                slice_shape,
                ("replicate",),
            )
        return Inference(
            name, "replicate", True, f"all {world_size} ranks hold identical bytes", REPLICATE, True, None, slice_shape
        )

    parts = len(partition)
    copies = "every rank holds different bytes" if parts == world_size else f"copies on ranks {_groups_text(partition)}"
    if name.rsplit(".", 1)[-1] in UNSYNCHRONIZED_BUFFERS:
        return Inference(
            name,
            Assignment("replicate", (), "first").summary(),
            False,
            f"{copies}, as the running statistics of a BatchNorm are not synchronized across "
            "data-parallel ranks; merge takes rank 0's copy. Give --like FULL.ckpt to be sure",
            Assignment("replicate", (), "first"),
            True,
            None,
            slice_shape,
            ("replicate",),
        )
    if world_size % parts:
        return _undecided(name, f"the ranks fall into {parts} groups of equal bytes ({_groups_text(partition)}), which no layout over {world_size} ranks gives")

    # Every way to cut the tensor into `parts` blocks along its dims, as full shapes to try.
    options: List[Tuple[Shape, Candidate]] = []
    for factors in _factorizations(parts, len(slice_shape)):
        full = tuple(n * f for n, f in zip(slice_shape, factors))
        for candidate in layout_candidates(full, slice_shape, world_size, name, registry):
            if _partition_of(candidate.layout) == sorted(partition):
                options.append((full, candidate))
                break
    if not options:
        return _undecided(name, f"split ({copies}), but no layout of slices {list(slice_shape)} puts the copies there")
    if len(options) == 1:
        full, candidate = options[0]
        # Copies that drift apart (buffers no collective keeps equal) look exactly like this.
        return Inference(
            name,
            candidate.summary,
            False,
            f"{copies}; a {len(slice_shape)}-D slice can only be split along dim 0, full shape {list(full)}, "
            "unless the ranks hold unsynchronized copies; give --like FULL.ckpt to be sure",
            candidate.assignment,
            True,
            None,
            full,
            (candidate.summary,),
        )
    listed = [f"{c.summary} -> {list(full)}" for full, c in options]
    shown = "; ".join(listed[:4]) + ("; …" if len(listed) > 4 else "")
    return _undecided(
        name,
        f"split in {parts} parts ({copies}), but the slices do not show along which dimension ({shown}); "
        "give --like FULL.ckpt",
        listed,
    )


def _factorizations(parts: int, ndim: int) -> List[Tuple[int, ...]]:
    """Return every way to write `parts` as a product of `ndim` factors, one per dim, dim 0 split first."""
    if ndim == 0:
        return [()] if parts == 1 else []
    result = []
    for first in range(parts, 0, -1):
        if parts % first == 0:
            for rest in _factorizations(parts // first, ndim - 1):
                result.append((first,) + rest)
    return result


def _infer_one(
    name: str,
    source: Source,
    reference: Optional[_Reference],
    check_bytes: bool,
    registry: StrategyRegistry,
    bytes_cache: Optional[MutableMapping[str, RankBytes]] = None,
) -> Tuple[Inference, Optional[RankBytes]]:
    world_size = source.world_size
    info = source.info(name)
    assert info is not None
    if is_scalar(info.dtype, tuple(info.shape)):
        return Inference(name, "replicate", True, "a scalar: always replicated", None, True, None, tuple(info.shape)), None
    missing = source.missing_ranks(name)
    if missing:
        return _undecided(name, f"missing from rank {_ranks_text(missing)}"), None
    dtypes = {source.info(name, r).dtype for r in range(world_size)}
    if len(dtypes) > 1:
        return _undecided(name, f"the ranks hold different dtypes ({', '.join(sorted(dtypes))})"), None
    shapes = source.slice_shapes(name)
    if len(set(shapes)) > 1:
        listed = ", ".join(str(list(s)) for s in shapes[:8]) + (", …" if len(shapes) > 8 else "")
        return _undecided(
            name, f"the ranks hold slices of different shapes ({listed}); every built-in strategy gives equal slices"
        ), None
    slice_shape = tuple(shapes[0])
    held = None
    if check_bytes:
        held = bytes_cache.get(name) if bytes_cache is not None else None
        if held is None:
            held = rank_bytes(source, name)
            if bytes_cache is not None:
                bytes_cache[name] = held

    if reference is not None:
        ref_shape = reference.shape(name)
        if ref_shape is not None:
            if reference.dtype(name) != info.dtype:
                return _undecided(
                    name,
                    f"the reference holds it as {reference.dtype(name)}, the ranks as {info.dtype}",
                    full=ref_shape,
                ), held
            return _infer_from_full(
                name, ref_shape, slice_shape, world_size, held, source, reference, registry, "reference shape"
            ), held
    inference = _infer_without_full(name, slice_shape, world_size, held, source, registry)
    if reference is not None and inference.decided:
        inference = _with_note(inference, "not in the reference")
    elif reference is not None:
        inference = _with_note(inference, "not in the reference", prefix=True)
    return inference, held


def _with_note(inference: Inference, note: str, prefix: bool = False) -> Inference:
    reason = f"{note}; {inference.reason}" if prefix else f"{inference.reason} ({note})"
    return Inference(
        inference.name,
        inference.summary,
        inference.certain,
        reason,
        inference.assignment,
        inference.decided,
        inference.follows,
        inference.full_shape,
        inference.candidates,
    )


def _mirror_fits(
    state: str, parent: Inference, source: Source, held: Optional[RankBytes], registry: StrategyRegistry
) -> Optional[Shape]:
    """Return the state's full shape if it follows `parent`'s layout (shapes and copies), else None."""
    if parent.assignment is None or parent.full_shape is None:
        return None
    world_size = source.world_size
    try:
        parent_layout = _builtin_layout(parent.assignment, parent.full_shape, world_size, parent.name, registry)
        mirror = registry.get("mirror").from_options({"of": parent.name}, where=f"mirror of '{parent.name}'")
        ctx = LayoutContext(state, [state, parent.name], lambda other: parent_layout)
        shapes = source.slice_shapes(state)
        full = tuple(mirror.full_shape(shapes, world_size, ctx))
        layout = mirror.layout(full, world_size, ctx)
    except ShardsmithError:
        return None
    if [tuple(s) for s in layout.slice_shapes] != [tuple(s) for s in shapes]:
        return None
    if held is not None and not held.constant and not _refines(layout, held.partition()):
        return None
    return full


def infer_layouts(
    source: Source,
    like: Union[None, Path, str, Source] = None,
    *,
    check_bytes: bool = True,
    progress: Optional[Callable[[int, int, str], None]] = None,
    registry: Optional[StrategyRegistry] = None,
    bytes_cache: Optional[MutableMapping[str, RankBytes]] = None,
) -> Dict[str, Inference]:
    """Infer the layout of every parameter of a rank set, in rank 0's order.

    `like` is a full checkpoint of the same network (a path or an open Source) that gives full
    shapes. With `check_bytes` every slice is read once, one parameter and one rank at a time,
    to find which ranks hold copies. Without it only shapes are used, so most splits stay
    undecided. `progress(done, total, name)` is called before each parameter. `bytes_cache`
    holds digests computed earlier, by name; the ones computed here are added to it.
    """
    registry = registry or get_registry()
    reference_source = open_reference(like) if isinstance(like, (str, Path)) else like
    reference = _Reference(reference_source) if reference_source is not None else None
    try:
        own: Dict[str, Inference] = {}
        held_by_name: Dict[str, Optional[RankBytes]] = {}
        total = len(source.names)
        for done, name in enumerate(source.names):
            if progress is not None:
                progress(done, total, name)
            own[name], held_by_name[name] = _infer_one(name, source, reference, check_bytes, registry, bytes_cache)
    finally:
        if reference_source is not None and reference_source is not like:
            reference_source.close()
    return _follow_parents(source, own, held_by_name, registry)


def _follow_parents(
    source: Source, own: Dict[str, Inference], held_by_name: Mapping[str, Optional[RankBytes]], registry: StrategyRegistry
) -> Dict[str, Inference]:
    """Make each optimizer state follow its parameter wherever its shapes and copies allow it."""
    names = set(source.names)
    result: Dict[str, Inference] = {}
    for name in source.names:
        inference = own[name]
        parent_name = parameter_of(name, names)
        if parent_name is None or inference.assignment is None and inference.decided:
            result[name] = inference
            continue
        parent = own[parent_name]
        if not parent.decided:
            if not inference.decided:
                inference = _with_note(inference, f"follows '{parent_name}', which is undecided too", prefix=True)
            result[name] = inference
            continue
        if parent.assignment is None or parent.assignment.strategy == "replicate":
            # The default replicates a state of a replicated parameter, so keep its own inference.
            result[name] = inference
            continue
        full = _mirror_fits(name, parent, source, held_by_name.get(name), registry)
        if full is None:
            if inference.decided:
                result[name] = _with_note(inference, f"does not follow '{parent_name}' ({parent.summary})")
            else:
                result[name] = inference
            continue
        result[name] = Inference(
            name,
            f"mirror of '{parent_name}'",
            parent.certain,
            f"optimizer state of '{parent_name}', whose layout its slices fit",
            None,
            True,
            parent_name,
            full,
            (f"mirror of '{parent_name}'",),
        )
    return result


# -- compact plans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Want:
    """The layout a plan must give one parameter, as the rules that may match it.

    `required` is the assignment a matching rule must carry (None: no rule may match).
    `default_ok` is True when the plan may also leave the name to the default (replicate, or
    mirror for an optimizer state of a split parameter) because that lays it out the same way.
    """

    required: Optional[Assignment]
    default_ok: bool

    def accepts(self, assignment: Assignment) -> bool:
        return assignment == self.required


DONT_CARE = None  # scalars: plan rules never apply to them

# Globs are also built from the whole names of groups up to this size. Each such glob is matched
# against every name, and their count grows with the group.
MAX_GROUP_FOR_NAME_GLOBS = 200


def glob_escape(name: str) -> str:
    """Escape fnmatch's special characters so a glob matches `name` only."""
    return re.sub(r"([\[\]*?])", lambda m: "[" + m.group(1) + "]", name)


_DIGITS = re.compile(r"\d+")


def _numeric_globs(name: str) -> Set[str]:
    """Return the name with each run of digits, and with all of them, replaced by `*`.

    `layers.11.ffn.w1.weight` gives `layers.*.ffn.w1.weight`, `layers.11.ffn.w*.weight` and
    `layers.*.ffn.w*.weight`, because `w1` and `w2` usually need different rules.
    """
    parts = _DIGITS.split(name)
    runs = _DIGITS.findall(name)
    if not runs:
        return set()
    escaped = [glob_escape(p) for p in parts]
    globs = {"*".join(escaped)}
    for k in range(len(runs)):
        pieces = [escaped[0]]
        for i, run in enumerate(runs):
            pieces.append("*" if i == k else run)
            pieces.append(escaped[i + 1])
        globs.add("".join(pieces))
    return globs


def _merged_globs(globs: Iterable[str], limit: int = 200) -> Set[str]:
    """Return globs with `*` in one dotted position where at least two of `globs` differ only there.

    At most `limit` of them, those that merge the most, because each one is later matched
    against every name.
    """
    by_key: Dict[str, Set[str]] = {}
    for glob in globs:
        tokens = glob.split(".")
        for k in range(len(tokens)):
            if tokens[k] == "*":
                continue
            key = ".".join(tokens[:k] + ["*"] + tokens[k + 1 :])
            by_key.setdefault(key, set()).add(glob)
    merging = sorted((key for key, members in by_key.items() if len(members) > 1), key=lambda k: -len(by_key[k]))
    return set(merging[:limit])


def compact_rules(
    names: Sequence[str],
    wants: Mapping[str, Optional[Want]],
    candidates: Sequence[str] = (),
) -> List[Rule]:
    """Write one rule per group of parameters that share an assignment, with globs where they fit.

    `wants[name]` is None for names no rule may affect (scalars). A glob is used only if every
    name it matches accepts its assignment. The order of the rules therefore does not matter,
    and the result lays out every name exactly as requested. Names no glob covers get an
    exact-name rule.
    `candidates` are globs to try first (the user's own, or an existing plan's).
    """
    needed: Dict[Assignment, List[str]] = {}
    for name in names:
        want = wants.get(name)
        if want is not None and want.required is not None and not want.default_ok:
            needed.setdefault(want.required, []).append(name)
    if not needed:
        return []

    position = {name: i for i, name in enumerate(names)}
    given = set(candidates)
    matchers: Dict[str, List[str]] = {}

    def matched(glob: str) -> List[str]:
        if glob not in matchers:
            regex = re.compile(fnmatch.translate(glob))
            matchers[glob] = [n for n in names if regex.match(n)]
        return matchers[glob]

    def valid(glob: str, assignment: Assignment) -> bool:
        for name in matched(glob):
            want = wants.get(name)
            if want is not None and not want.accepts(assignment):
                return False
        return True

    chosen: List[Tuple[int, str, Assignment]] = []
    for assignment, group in needed.items():
        # A glob that only one name of the group produces cannot beat that name's own rule.
        produced = Counter(glob for name in group for glob in _numeric_globs(name))
        numeric = {glob for glob, count in produced.items() if count > 1}
        merged = _merged_globs(numeric)
        if len(group) <= MAX_GROUP_FOR_NAME_GLOBS:
            merged |= _merged_globs(glob_escape(n) for n in group)  # fc1.weight + fc1.bias -> fc1.*
        pool = list(dict.fromkeys(list(candidates) + sorted(merged) + sorted(numeric)))
        uncovered = set(group)
        usable = [g for g in pool if any(n in uncovered for n in matched(g)) and valid(g, assignment)]
        while uncovered and usable:
            # Greedy cover: the glob reaching most uncovered names; among equals a given
            # candidate, then the most literal.
            best = max(
                usable,
                key=lambda g: (len(uncovered.intersection(matched(g))), g in given, -g.count("*"), len(g)),
            )
            gain = uncovered.intersection(matched(best))
            if len(gain) < 2:
                break
            chosen.append((min(position[n] for n in gain), best, assignment))
            uncovered -= gain
            usable = [g for g in usable if g != best and uncovered.intersection(matched(g))]
        for name in uncovered:
            chosen.append((position[name], glob_escape(name), assignment))
    chosen.sort(key=lambda item: item[0])
    return [assignment.rule(glob, i) for i, (_, glob, assignment) in enumerate(chosen, start=1)]


def check_rules(names: Sequence[str], wants: Mapping[str, Optional[Want]], rules: Sequence[Rule]) -> List[str]:
    """Return the names whose first matching rule does not give what they want (empty when all fit)."""
    wrong = []
    for name in names:
        want = wants.get(name)
        if want is None:
            continue
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None:
            if not want.default_ok:
                wrong.append(name)
        elif not want.accepts(Assignment.from_rule(rule)):
            wrong.append(name)
    return wrong


# -- the --auto plan -----------------------------------------------------------------------------


@dataclass
class InferredPlan:
    """The result of `infer_plan`: the plan, what was inferred per parameter and what was not."""

    plan: Plan
    inferences: Dict[str, Inference]
    undecided: List[str] = field(default_factory=list)
    problems: Dict[str, str] = field(default_factory=dict)


def _default_for(name: str, inferences: Mapping[str, Inference], names: Set[str]) -> Assignment:
    parent = parameter_of(name, names)
    if parent is not None:
        parent_inference = inferences.get(parent)
        if parent_inference is not None and parent_inference.assignment is not None and parent_inference.assignment.strategy != "replicate":
            return Assignment.make("mirror", {}, parent_inference.assignment.replicas)
    return REPLICATE


def infer_plan(
    source: Source,
    like: Union[None, Path, str, Source] = None,
    *,
    leave_undecided_replicated: bool = False,
    check_bytes: bool = True,
    progress: Optional[Callable[[int, int, str], None]] = None,
    registry: Optional[StrategyRegistry] = None,
) -> InferredPlan:
    """Infer a compact plan for a rank set (see the module docstring for the evidence used).

    Undecided parameters get no rule; with `leave_undecided_replicated` they are replicated
    instead (an explicit rule where the default would mirror a parameter). The plan is then
    resolved against the rank set, and any parameter it does not lay out is in `problems`.
    """
    registry = registry or get_registry()
    inferences = infer_layouts(source, like, check_bytes=check_bytes, progress=progress, registry=registry)
    names = list(source.names)
    name_set = set(names)
    wants: Dict[str, Optional[Want]] = {}
    undecided = []
    for name in names:
        inference = inferences[name]
        info = source.info(name)
        if info is None or is_scalar(info.dtype, tuple(info.shape)):
            wants[name] = DONT_CARE
            continue
        default = _default_for(name, inferences, name_set)
        if not inference.decided:
            undecided.append(name)
            wants[name] = Want(REPLICATE, default == REPLICATE)
        elif inference.assignment is None:
            # A state that follows its parameter: only the default lays it out that way.
            wants[name] = Want(None, True)
        else:
            wants[name] = Want(inference.assignment, inference.assignment == default)
    rules = compact_rules(names, wants)
    wrong = check_rules(names, wants, rules)
    if wrong:  # compact_rules guarantees this; a failure here is a bug, not bad input
        raise AssertionError(f"compact rules do not lay out {wrong[:5]} as inferred")
    plan = Plan(source.world_size, tuple(rules))
    problems = _check_plan(plan, source, inferences, registry)
    if not leave_undecided_replicated:
        for name in undecided:
            problems.pop(name, None)
    return InferredPlan(plan, inferences, undecided, problems)


def _check_plan(plan: Plan, source: Source, inferences: Mapping[str, Inference], registry: StrategyRegistry) -> Dict[str, str]:
    """Resolve the plan against the rank set; return {name: message} for every parameter it fails on."""
    names = list(source.names)
    dtypes = {name: source.info(name).dtype for name in names}
    resolved, errors = resolve_each(plan, names, dtypes, slice_shapes=SliceShapes(source), registry=registry)
    problems = {name: exc.format() for name, exc in errors.items()}
    for name, param in resolved.items():
        expected = inferences[name].full_shape
        if expected is not None and tuple(expected) != tuple(param.full_shape):
            problems[name] = f"the plan gives full shape {list(param.full_shape)}, the inference {list(expected)}"
    return problems


class SliceShapes(Mapping[str, List[Shape]]):
    """`source.slice_shapes` as a lazy mapping; a name missing from some rank raises RankSetError on lookup."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __getitem__(self, name: str) -> List[Shape]:
        return self.source.slice_shapes(name)

    def __iter__(self):
        return iter(self.source.names)

    def __len__(self) -> int:
        return len(self.source.names)


def make_resolver(
    plan: Plan,
    names: Sequence[str],
    dtypes: Mapping[str, str],
    *,
    slice_shapes: Optional[Mapping[str, Sequence[Shape]]] = None,
    full_shapes: Optional[Mapping[str, Shape]] = None,
    known: Optional[Mapping[str, ParamLayout]] = None,
    registry: Optional[StrategyRegistry] = None,
):
    """Return a resolver for `resolve_with`: by slice shapes (a rank set) or full shapes.

    `known` seeds layouts computed earlier that still hold, so they are not computed again.
    """
    from .plan import FullResolver, SliceResolver

    registry = registry or get_registry()
    if slice_shapes is not None:
        resolver = SliceResolver(plan, names, dtypes, slice_shapes, registry)
    elif full_shapes is not None:
        resolver = FullResolver(plan, names, dtypes, full_shapes, registry)
    else:
        raise TypeError("make_resolver needs slice_shapes or full_shapes")
    if known:
        resolver.done.update(known)
    return resolver


def resolve_with(resolver, names: Iterable[str]) -> Tuple[Dict[str, ParamLayout], Dict[str, ShardsmithError]]:
    """Lay out each of `names` on its own, collecting the error of each one that fails.

    An error raised by the parameter a state mirrors is reported on the state as well, naming
    that parameter. An exception other than a ShardsmithError, from a plugin's strategy,
    becomes a LayoutError naming it.
    """
    results: Dict[str, ParamLayout] = {}
    errors: Dict[str, ShardsmithError] = {}
    for name in names:
        try:
            results[name] = resolver.get(name)
        except ShardsmithError as exc:
            if exc.param is not None and exc.param != name:
                exc = LayoutError(f"follows '{exc.param}', which fails: {exc.format()}", param=name)
            errors[name] = exc
        except Exception as exc:  # a plugin strategy may raise anything; report it on its parameter
            errors[name] = LayoutError(f"the strategy raised {type(exc).__name__}: {exc}", param=name)
    return results, errors


def resolve_each(
    plan: Plan,
    names: Sequence[str],
    dtypes: Mapping[str, str],
    *,
    slice_shapes: Optional[Mapping[str, Sequence[Shape]]] = None,
    full_shapes: Optional[Mapping[str, Shape]] = None,
    only: Optional[Iterable[str]] = None,
    known: Optional[Mapping[str, ParamLayout]] = None,
    registry: Optional[StrategyRegistry] = None,
) -> Tuple[Dict[str, ParamLayout], Dict[str, ShardsmithError]]:
    """Lay out each parameter (or each of `only`) on its own, collecting every error.

    `resolve_slices` and `resolve_full` stop at the first error; an editor and a report need
    all of them. Give `slice_shapes` for a rank set or `full_shapes` for a full checkpoint.
    """
    resolver = make_resolver(
        plan, names, dtypes, slice_shapes=slice_shapes, full_shapes=full_shapes, known=known, registry=registry
    )
    return resolve_with(resolver, names if only is None else only)
