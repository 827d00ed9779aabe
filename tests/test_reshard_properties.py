"""Reshard against merge-then-split over random layouts, cluster sizes, chunk sizes and budgets.

The engine streams every slice in chunks: runs that are contiguous in a source slice go out
as views of it, other bands are copied from every source box that overlaps them. Hypothesis
draws the cluster change (non-dividing ones such as 8 -> 7 and 6 -> 4 included), layouts with
replicated and data-parallel copies, dtypes without a numpy equivalent (BFloat16) or with one
byte per element (Bool, Int8), and chunk sizes and in-flight budgets down to a single byte, so
that bands cut rows, boxes and records at every place. The reshard must equal a merge followed
by a split byte for byte. Every slice must equal the one cut from the full tensor by the
tensor_map convention, which is written out here apart from shardsmith's layout code. The
merge must contain what mindspore.load_checkpoint reads from the original.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_support import bfloat16_words, load, rank_file, save
from shardsmith import engine, jobs
from shardsmith.engine import contiguous_blocks

pytest.importorskip("mindspore")

# (source world size, target world size): the first two are cluster changes that
# transform_checkpoints cannot make, because neither size divides the other.
CLUSTER_CHANGES = [(8, 7), (6, 4), (7, 8), (4, 6), (8, 4), (2, 3), (3, 1)]
DTYPES = ["BFloat16", "Bool", "Int8", "Float32", "Float16"]
# Bytes per chunk, and bytes in flight; None keeps the default.
CHUNK_SIZES = [1, 3, 64, 1000, 4096, None]
BUDGETS = [1, 200, 100_000, None]


@dataclass(frozen=True)
class Split:
    """One parameter's layout on one cluster: the plan rule and its (dev_matrix, tensor_map)."""

    rule: str
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[int, ...]


def oracle_slice(full: np.ndarray, split: Split, rank: int) -> np.ndarray:
    """Cut rank's slice by MindSpore's convention: row-major rank coordinate, axis 0 = last."""
    coordinate = []
    remainder = rank
    for size in reversed(split.dev_matrix):
        coordinate.append(remainder % size)
        remainder //= size
    coordinate.reverse()
    index = []
    for dim, axis in enumerate(split.tensor_map):
        if axis == -1:
            index.append(slice(None))
            continue
        position = len(split.dev_matrix) - 1 - axis
        block = full.shape[dim] // split.dev_matrix[position]
        index.append(slice(coordinate[position] * block, (coordinate[position] + 1) * block))
    return np.ascontiguousarray(full[tuple(index)])


@st.composite
def splits(draw, world_size: int, ndim: int) -> Split:
    """A layout of an `ndim`-dim tensor over `world_size` ranks, often with data-parallel copies."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    kind = draw(st.sampled_from(["replicate", "row", "tensor_map"] + (["column", "grid"] if ndim >= 2 else [])))
    if kind == "replicate":
        return Split('strategy = "replicate"', (world_size,), (-1,) * ndim)
    if kind in ("row", "column"):
        parts = draw(st.sampled_from(divisors))
        tensor_map = [-1] * ndim
        tensor_map[0 if kind == "row" else 1] = 0
        return Split(f'strategy = "{kind}"\nparts = {parts}', (world_size // parts, parts), tuple(tensor_map))
    if kind == "grid":
        a = draw(st.sampled_from(divisors))
        b = draw(st.sampled_from([d for d in divisors if (world_size // a) % d == 0]))
        return Split(f"strategy = \"grid\"\ngrid = [{a}, {b}]", (world_size // (a * b), a, b), (1, 0) + (-1,) * (ndim - 2))
    # A device matrix of the world size's factors; axes no dim uses hold copies.
    dev_matrix: List[int] = []
    remaining = world_size
    while remaining > 1:
        factor = draw(st.sampled_from([d for d in range(2, remaining + 1) if remaining % d == 0]))
        dev_matrix.append(factor)
        remaining //= factor
    dev_matrix = dev_matrix or [1]
    tensor_map = tuple(draw(st.permutations(list(range(len(dev_matrix))) + [-1] * ndim))[:ndim])
    rule = f"strategy = \"tensor_map\"\ndev_matrix = {dev_matrix}\ntensor_map = {list(tensor_map)}"
    return Split(rule, tuple(dev_matrix), tensor_map)


def split_counts(split: Split) -> List[int]:
    """Return into how many parts the layout cuts each dim."""
    return [1 if axis == -1 else split.dev_matrix[len(split.dev_matrix) - 1 - axis] for axis in split.tensor_map]


def random_values(dtype: str, shape: Sequence[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "Bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype == "BFloat16":
        # Values that bfloat16 represents exactly, so MindSpore's float32 input keeps the words.
        return bfloat16_words(rng.integers(-512, 512, size=shape) / 8)
    if dtype == "Int8":
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    return rng.standard_normal(size=shape).astype({"Float32": "<f4", "Float16": "<f2"}[dtype])


@dataclass
class Case:
    source_world: int
    target_world: int
    params: List[Tuple[str, str, np.ndarray, Split, Split]]  # name, dtype, full tensor, source, target
    chunk_bytes: int
    max_inflight: int

    def plan(self, path: Path, which: int) -> Path:
        world = self.source_world if which == 0 else self.target_world
        text = f"world_size = {world}\n"
        for name, _, _, *layouts in self.params:
            text += f'\n[[param]]\nmatch = "{name}"\n{layouts[which].rule}\n'
        path.write_text(text)
        return path


@st.composite
def cases(draw) -> Case:
    source_world, target_world = draw(st.sampled_from(CLUSTER_CHANGES))
    params = []
    for index in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(1, 3))
        source, target = draw(splits(source_world, ndim)), draw(splits(target_world, ndim))
        # Each dim divides into the parts of both layouts.
        shape = tuple(
            math.lcm(a, b) * draw(st.integers(1, 3)) for a, b in zip(split_counts(source), split_counts(target))
        )
        dtype = draw(st.sampled_from(DTYPES))
        full = random_values(dtype, shape, draw(st.integers(0, 2**32 - 1)))
        params.append((f"layer{index}.weight", dtype, full, source, target))
    chunk = draw(st.sampled_from(CHUNK_SIZES))
    budget = draw(st.sampled_from(BUDGETS))
    return Case(source_world, target_world, params, chunk or engine.CHUNK_BYTES, budget or jobs.DEFAULT_MAX_INFLIGHT)


def _expected(case: Case, rank: int, which: int):
    """Return rank's slices of the target (which=1) or source (which=0) cluster as load() reports them."""
    result = {}
    for name, dtype, full, *layouts in case.params:
        piece = oracle_slice(full, layouts[which], rank)
        result[name] = (dtype, piece.shape, piece.tobytes())
    return result


# About 20 s: five jobs per example, each fsyncing its output.
@pytest.mark.slow
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=cases())
def test_reshard_equals_merge_then_split(ms, tmp_path, case):
    default_chunk = engine.CHUNK_BYTES
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        root = Path(scratch)
        original = save(root / "full.ckpt", [(name, dtype, full) for name, dtype, full, *_ in case.params])
        plan = case.plan(root / "source.toml", 0)
        to_plan = case.plan(root / "target.toml", 1)
        jobs.split(original, plan, root / "source")

        engine.CHUNK_BYTES = case.chunk_bytes
        try:
            jobs.reshard([root / "source"], plan, to_plan, root / "resharded", max_inflight=case.max_inflight)
            jobs.reshard([root / "resharded"], to_plan, plan, root / "back", max_inflight=case.max_inflight)
        finally:
            engine.CHUNK_BYTES = default_chunk
        jobs.merge([root / "source"], plan, root / "merged.ckpt")
        jobs.split(root / "merged.ckpt", to_plan, root / "split")

        assert load(root / "merged.ckpt") == load(original)
        for rank in range(case.target_world):
            resharded = rank_file(root / "resharded", rank).read_bytes()
            assert resharded == rank_file(root / "split", rank).read_bytes(), f"rank {rank}"
            assert load(rank_file(root / "resharded", rank)) == _expected(case, rank, 1), f"rank {rank}"
        for rank in range(case.source_world):
            back = rank_file(root / "back", rank).read_bytes()
            assert back == rank_file(root / "source", rank).read_bytes(), f"rank {rank}"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=0, max_size=4),
    st.sampled_from([1, 2, 4]),
    st.integers(1, 300),
)
def test_contiguous_blocks_tile_in_order(shape, itemsize, chunk_bytes):
    shape = tuple(shape)
    position = 0
    for block in contiguous_blocks(shape, itemsize, chunk_bytes):
        first = int(np.ravel_multi_index(block.start, shape)) if shape else 0
        last = int(np.ravel_multi_index([b - 1 for b in block.stop], shape)) if shape else 0
        assert first == position
        assert last - first + 1 == block.size  # one run of the C-order content
        assert block.size * itemsize <= chunk_bytes or block.size == 1
        position += block.size
    assert position == math.prod(shape)
