"""Round trips over random layouts: split then merge, merge then split, reshard against both.

Hypothesis draws the world size, the device matrix, the strategy, the shapes and the dtypes
(BFloat16 and Bool included). The rank files a merge starts from are cut from the full tensor by
an oracle written here from MindSpore's tensor_map convention, independent of shardsmith's
layout code, and saved with mindspore.save_checkpoint. The budget is small so CI stays fast;
raise it with HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_support import bfloat16_words, load, rank_file, save, save_rank_set
from shardsmith import jobs

pytest.importorskip("mindspore")

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

DTYPES = ["Float32", "Float16", "BFloat16", "Float64", "Bool", "Int8", "UInt8", "Int32", "Int64"]


@dataclass(frozen=True)
class Layout:
    """One parameter's layout as a plan rule and as MindSpore's (dev_matrix, tensor_map)."""

    rule: str  # the [[param]] options, without match
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[int, ...]


def oracle_slice(full: np.ndarray, layout: Layout, rank: int) -> np.ndarray:
    """Cut rank's slice as MindSpore's tensor_map convention defines it (0 = last device axis)."""
    coordinate = []
    remainder = rank
    for size in reversed(layout.dev_matrix):
        coordinate.append(remainder % size)
        remainder //= size
    coordinate.reverse()
    index = []
    for dim, axis in enumerate(layout.tensor_map):
        if axis == -1:
            index.append(slice(None))
            continue
        position = len(layout.dev_matrix) - 1 - axis
        parts = layout.dev_matrix[position]
        block = full.shape[dim] // parts
        index.append(slice(coordinate[position] * block, (coordinate[position] + 1) * block))
    return np.ascontiguousarray(full[tuple(index)])


@st.composite
def layouts(draw, world_size: int, ndim: int):
    """A strategy and the same layout as MindSpore would write it, for a tensor of `ndim` dims."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    kinds = ["replicate", "row", "tensor_map"] + (["column", "grid"] if ndim >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "replicate":
        return Layout('strategy = "replicate"', (world_size,), (-1,) * ndim)
    if kind in ("row", "column"):
        parts = draw(st.sampled_from(divisors))
        tensor_map = [-1] * ndim
        tensor_map[0 if kind == "row" else 1] = 0
        return Layout(f'strategy = "{kind}"\nparts = {parts}', (world_size // parts, parts), tuple(tensor_map))
    if kind == "grid":
        a = draw(st.sampled_from(divisors))
        b = draw(st.sampled_from([d for d in divisors if (world_size // a) % d == 0]))
        return Layout(f"strategy = \"grid\"\ngrid = [{a}, {b}]", (world_size // (a * b), a, b), (1, 0) + (-1,) * (ndim - 2))
    # tensor_map: factor the world size into a device matrix, map some of its axes onto dims.
    dev_matrix: List[int] = []
    remaining = world_size
    while remaining > 1:
        factor = draw(st.sampled_from([d for d in range(2, remaining + 1) if remaining % d == 0]))
        dev_matrix.append(factor)
        remaining //= factor
    dev_matrix = dev_matrix or [1]
    axes = list(range(len(dev_matrix))) + [-1] * ndim
    chosen = draw(st.permutations(axes))[:ndim]
    tensor_map = tuple(chosen)
    rule = f"strategy = \"tensor_map\"\ndev_matrix = {list(dev_matrix)}\ntensor_map = {list(tensor_map)}"
    return Layout(rule, tuple(dev_matrix), tensor_map)


def split_counts(layout: Layout, ndim: int) -> List[int]:
    return [1 if m == -1 else layout.dev_matrix[len(layout.dev_matrix) - 1 - m] for m in layout.tensor_map][:ndim]


def random_values(dtype: str, shape: Sequence[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "Bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype == "BFloat16":
        # Values that bfloat16 represents exactly, so the trip through MindSpore's float32 input is exact.
        return bfloat16_words(rng.integers(-512, 512, size=shape) / 8)
    storage = np.dtype({"Float32": "<f4", "Float16": "<f2", "Float64": "<f8", "Int8": "<i1", "UInt8": "<u1", "Int32": "<i4", "Int64": "<i8"}[dtype])
    if storage.kind == "f":
        return rng.standard_normal(size=shape).astype(storage)
    info = np.iinfo(storage)
    return rng.integers(info.min, info.max, size=shape, dtype=storage, endpoint=True)


@dataclass
class Model:
    world_size: int
    params: List[Tuple[str, str, np.ndarray, Layout]]  # name, dtype, full array, layout

    def plan_text(self) -> str:
        text = f"world_size = {self.world_size}\n"
        for name, _, _, layout in self.params:
            if not name.startswith("moments."):
                text += f'\n[[param]]\nmatch = "{name}"\n{layout.rule}\n'
        return text

    def full_entries(self):
        return [(name, dtype, array) for name, dtype, array, _ in self.params]

    def rank_entries(self, rank: int):
        return [(name, dtype, oracle_slice(array, layout, rank)) for name, dtype, array, layout in self.params]


@st.composite
def models(draw, world_size=None):
    """Two or three parameters with a layout each, and the optimizer state of the first."""
    world_size = world_size or draw(st.sampled_from([1, 2, 4, 6, 8]))
    params = []
    for index in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 3))
        layout = draw(layouts(world_size, ndim))
        counts = split_counts(layout, ndim)
        shape = tuple(count * draw(st.integers(1, 3)) for count in counts)
        dtype = draw(st.sampled_from(DTYPES))
        params.append((f"p{index}", dtype, random_values(dtype, shape, draw(st.integers(0, 2**32 - 1))), layout))
    name, dtype, array, layout = params[0]
    # A state of the first parameter follows its layout without a rule of its own (mirror).
    params.append((f"moments.{name}", "Float32", random_values("Float32", array.shape, 7), layout))
    return Model(world_size, params)


def _plan(directory: Path, name: str, model: Model) -> Path:
    path = directory / name
    path.write_text(model.plan_text())
    return path


def _same_rank_sets(a: Path, b: Path, world_size: int) -> None:
    for rank in range(world_size):
        assert load(rank_file(a, rank)) == load(rank_file(b, rank)), f"rank {rank}"


@settings(settings.get_profile(PROFILE))
@given(models())
def test_split_then_merge_is_identity(model):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        full = save(root / "full.ckpt", model.full_entries())
        plan = _plan(root, "plan.toml", model)
        jobs.split(full, plan, root / "split")
        for rank in range(model.world_size):
            assert load(rank_file(root / "split", rank)) == {
                name: (dtype, array.shape, array.tobytes()) for name, dtype, array in model.rank_entries(rank)
            }
        jobs.merge([root / "split"], plan, root / "merged.ckpt")
        assert load(root / "merged.ckpt") == load(full)


@settings(settings.get_profile(PROFILE))
@given(models())
def test_merge_then_split_is_identity(model):
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        src = save_rank_set(root / "src", [model.rank_entries(rank) for rank in range(model.world_size)])
        plan = _plan(root, "plan.toml", model)
        jobs.merge([src], plan, root / "merged.ckpt")
        assert load(root / "merged.ckpt") == {name: (dtype, array.shape, array.tobytes()) for name, dtype, array in model.full_entries()}
        jobs.split(root / "merged.ckpt", plan, root / "split")
        _same_rank_sets(src, root / "split", model.world_size)


@st.composite
def model_pairs(draw):
    """The same parameters under two plans, possibly of different world sizes."""
    source = draw(models())
    target_world = draw(st.sampled_from([1, 2, 3, 4, 8]))
    params = []
    for name, dtype, array, _ in source.params:
        ndim = array.ndim
        layout = draw(layouts(target_world, ndim)) if not name.startswith("moments.") else params[0][3]
        if any(size % count for size, count in zip(array.shape, split_counts(layout, ndim))):
            layout = Layout('strategy = "replicate"', (target_world,), (-1,) * ndim)
        params.append((name, dtype, array, layout))
    return source, Model(target_world, params)


@settings(settings.get_profile(PROFILE))
@given(model_pairs())
def test_reshard_equals_merge_then_split(pair):
    source, target = pair
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        src = save_rank_set(root / "src", [source.rank_entries(rank) for rank in range(source.world_size)])
        plan = _plan(root, "plan.toml", source)
        to_plan = _plan(root, "to.toml", target)
        jobs.reshard([src], plan, to_plan, root / "resharded")
        jobs.merge([src], plan, root / "merged.ckpt")
        jobs.split(root / "merged.ckpt", to_plan, root / "split")
        for rank in range(target.world_size):
            resharded = rank_file(root / "resharded", rank).read_bytes()
            assert resharded == rank_file(root / "split", rank).read_bytes(), f"rank {rank}"
            assert load(rank_file(root / "resharded", rank)) == {
                name: (dtype, array.shape, array.tobytes()) for name, dtype, array in target.rank_entries(rank)
            }


def test_oracle_matches_mindspore_tutorial():
    # MindSpore's own example: a [2, 4] tensor on a 2 x 2 device matrix, tensor_map [1, 0].
    tensor = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    layout = Layout("", (2, 2), (1, 0))
    assert [oracle_slice(tensor, layout, r).tolist() for r in range(4)] == [[[1, 2]], [[3, 4]], [[5, 6]], [[7, 8]]]
    assert math.prod(layout.dev_matrix) == 4
