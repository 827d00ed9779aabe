"""MindSpore strategy files: read one as a plan, write a plan as one.

A strategy file is the `ParallelStrategyMap` protobuf message of
`mindspore/train/node_strategy_pb2.py` (what `strategy_ckpt_save_file` writes), or the JSON form
MindSpore's `build_searched_strategy` also reads when the name ends in `.json`. Each
`parallel_layout_item` gives one parameter's `dev_matrix` and `tensor_map` in the same convention
as the `tensor_map` strategy, so an imported file becomes one exact-name `tensor_map` rule per
parameter, and an exported plan drives MindSpore's own `transform_checkpoints` and
`load_distributed_checkpoint`.

The protobuf module is loaded from the installed MindSpore package by file path, without
importing `mindspore` itself, which takes over a second and 400 MB. Loading it needs only the
protobuf runtime that MindSpore depends on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import LayoutError, PlanError, ShardsmithError
from .layout import Layout, from_tensor_map
from .plan import ParamLayout, Plan, is_scalar, plan_from_dict, resolve_full, resolve_slices

TensorMapEntry = Union[int, List[int]]

# Suffixes taken as strategy files wherever a plan is expected; anything else is read as TOML
# unless its first bytes are not text.
STRATEGY_SUFFIXES = (".ckpt", ".pb", ".json")

_PB2_MODULE = "mindspore.train.node_strategy_pb2"


@dataclass(frozen=True)
class StrategyItem:
    """One `parallel_layout_item`, with the fields shardsmith reads or writes."""

    name: str
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[TensorMapEntry, ...]
    field: int = 0
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0
    param_split_shape: Tuple[int, ...] = ()
    indices_offset: Tuple[int, ...] = ()


@dataclass(frozen=True)
class StrategyFile:
    """The parts of a strategy file that describe layouts: the items and the pipeline stages."""

    items: Tuple[StrategyItem, ...]
    stages: Tuple[int, ...] = ()  # the `stage` of every parallel_strategy_item


# -- the protobuf module -----------------------------------------------------------------------


def node_strategy_pb2() -> Any:
    """Return MindSpore's `node_strategy_pb2` module, loading it from its file when mindspore is not imported."""
    if _PB2_MODULE in sys.modules:
        return sys.modules[_PB2_MODULE]
    if "mindspore" in sys.modules:
        import mindspore.train.node_strategy_pb2 as module

        return module
    private_name = "_shardsmith_node_strategy_pb2"
    if private_name in sys.modules:
        return sys.modules[private_name]
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        raise ShardsmithError(
            "reading or writing a protobuf strategy file needs MindSpore's node_strategy_pb2, and "
            "MindSpore is not installed",
            hint="Install it (pip install 'shardsmith[mindspore]'), or use the JSON form of the strategy file",
        )
    location = Path(list(spec.submodule_search_locations)[0]) / "train" / "node_strategy_pb2.py"
    module_spec = importlib.util.spec_from_file_location(private_name, location)
    if module_spec is None or module_spec.loader is None or not location.is_file():
        raise ShardsmithError(f"MindSpore's strategy file schema is missing from {location}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[private_name] = module
    return module


# -- reading -----------------------------------------------------------------------------------


def is_strategy_file(path: Any) -> bool:
    """Return whether `path` should be read as a strategy file rather than a TOML plan.

    The suffix decides first (`.ckpt`, `.pb`, `.json`). A file with another suffix counts when its
    first bytes are not text, because a serialized `ParallelStrategyMap` starts with binary field tags.
    """
    path = Path(path)
    if path.suffix.lower() in STRATEGY_SUFFIXES:
        return True
    if path.suffix.lower() == ".toml":
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return False
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the sample is still text.
        return error.start < len(head) - 3
    return any(ord(c) < 32 and c not in "\t\n\r\f" for c in text)


def read_strategy_file(path: Any) -> StrategyFile:
    """Parse a strategy file (protobuf, or JSON for a `.json` name) into its layout items."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PlanError("strategy file not found", path=path) from None
    except OSError as error:
        raise PlanError(f"cannot read the strategy file: {error.strerror or error}", path=path) from None
    if not data:
        raise PlanError("the strategy file is empty", path=path)
    if path.suffix.lower() == ".json":
        return _parse_json(data, path)
    return _parse_protobuf(data, path)


def _parse_protobuf(data: bytes, path: Path) -> StrategyFile:
    pb2 = node_strategy_pb2()
    message = pb2.ParallelStrategyMap()
    try:
        message.ParseFromString(data)
    except Exception as error:  # protobuf raises DecodeError, or RuntimeError from upb
        raise PlanError(
            f"not a MindSpore strategy file: {error}",
            path=path,
            hint="Give the file strategy_ckpt_save_file wrote, a .json strategy file, or a TOML plan",
        ) from None
    stages = tuple(int(item.parallel_strategys.stage) for item in message.parallel_strategy_item)
    items = []
    for item in message.parallel_layout_item:
        layouts = item.parallel_layouts
        name = item.param_name
        if not layouts.dev_matrix:
            raise PlanError("its parallel_layouts has no dev_matrix", path=path, param=name)
        if len(layouts.tensor_map) > 1:
            # A dimension split by several axes: one TensorMap per tensor dimension, as
            # MindSpore's `_convert_to_list` reads them (empty ones are padding and dropped).
            entries = [list(tm.dim) for tm in layouts.tensor_map if list(tm.dim)]
            tensor_map: Tuple[TensorMapEntry, ...] = tuple(e[0] if len(e) == 1 else e for e in entries)
        elif layouts.tensor_map:
            tensor_map = tuple(int(m) for m in layouts.tensor_map[0].dim)
        else:
            tensor_map = ()
        items.append(
            StrategyItem(
                name=name,
                dev_matrix=tuple(int(n) for n in layouts.dev_matrix[0].dim),
                tensor_map=tensor_map,
                field=int(layouts.field),
                opt_weight_shard_step=int(layouts.opt_weight_shard_step),
                opt_weight_shard_size=int(layouts.opt_weight_shard_size),
                param_split_shape=tuple(int(n) for n in layouts.param_split_shape[0].dim) if layouts.param_split_shape else (),
                indices_offset=tuple(int(n) for n in layouts.indices_offset[0].dim) if layouts.indices_offset else (),
            )
        )
    return StrategyFile(tuple(items), stages)


def _parse_json(data: bytes, path: Path) -> StrategyFile:
    try:
        content = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise PlanError(f"the JSON strategy file is not valid JSON: {error}", path=path) from None
    if not isinstance(content, dict):
        raise PlanError("the JSON strategy file must hold an object with 'parallel_layout_item'", path=path)
    strategy_items = content.get("parallel_strategy_item") or {}
    stages = []
    if isinstance(strategy_items, dict):
        for value in strategy_items.values():
            if isinstance(value, dict) and isinstance(value.get("stage"), int):
                stages.append(value["stage"])
    layout_items = content.get("parallel_layout_item") or {}
    if not isinstance(layout_items, dict):
        raise PlanError("'parallel_layout_item' must map parameter names to layouts", path=path)
    items = []
    for name, layout in layout_items.items():
        if not isinstance(layout, dict):
            raise PlanError("its layout must be an object", path=path, param=name)

        def ints(key: str, required: bool = False) -> Tuple[int, ...]:
            value = layout.get(key, None if required else [])
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise PlanError(f"field '{key}' must be a list of integers, got {value!r}", path=path, param=name)
            return tuple(value)

        def integer(key: str) -> int:
            value = layout.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"field '{key}' must be an integer, got {value!r}", path=path, param=name)
            return value

        raw_map = layout.get("tensor_map")
        if not isinstance(raw_map, list) or not all(
            (isinstance(m, int) and not isinstance(m, bool)) or (isinstance(m, list) and all(isinstance(x, int) for x in m))
            for m in raw_map
        ):
            raise PlanError(f"field 'tensor_map' must be a list of integers, got {raw_map!r}", path=path, param=name)
        items.append(
            StrategyItem(
                name=name,
                dev_matrix=ints("dev_matrix", required=True),
                tensor_map=tuple(m if isinstance(m, int) else list(m) for m in raw_map),
                field=integer("field"),
                opt_weight_shard_step=integer("opt_weight_shard_step"),
                opt_weight_shard_size=integer("opt_weight_shard_size"),
                param_split_shape=ints("param_split_shape"),
                indices_offset=ints("indices_offset"),
            )
        )
    return StrategyFile(tuple(items), tuple(stages))


def glob_for_name(name: str) -> str:
    """Return an fnmatch glob that matches exactly `name`: `*`, `?` and `[` go in brackets."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _flat_axes(tensor_map: Sequence[TensorMapEntry]) -> List[int]:
    axes = []
    for entry in tensor_map:
        for m in [entry] if isinstance(entry, int) else entry:
            if m != -1:
                axes.append(m)
    return axes


def expand_opt_shard(item: StrategyItem, path: Optional[Path] = None) -> Tuple[List[int], List[TensorMapEntry]]:
    """Return (dev_matrix, tensor_map) with parallel-optimizer sharding folded into dim 0.

    The parallel optimizer splits dim 0 of each slice once more over `opt_weight_shard_size`
    ranks that would otherwise hold copies. Following MindSpore's reading of these fields
    (`_construct_tensor_layout_helper` in mindspore/parallel/_tensor.py, 2.10), the split takes
    the unmapped device axes from the innermost outward. It cuts an axis in two when the axis is
    larger than the size still needed, and it sits inside the model-parallel split of dim 0. As a
    tensor_map, dim 0 is split by its model-parallel axes and then by those axes.
    """
    dev_matrix = list(item.dev_matrix)
    tensor_map = [m if isinstance(m, int) else list(m) for m in item.tensor_map]
    step, size = item.opt_weight_shard_step, item.opt_weight_shard_size
    if step == 0 or size == 0:
        return dev_matrix, tensor_map

    def fail(message: str) -> PlanError:
        return PlanError(
            f"parallel-optimizer sharding (opt_weight_shard_step {step}, opt_weight_shard_size {size}) on "
            f"dev_matrix {dev_matrix}, tensor_map {tensor_map}: {message}",
            path=path,
            param=item.name,
        )

    if step < 0 or size < -1:
        raise fail("negative values other than size -1 are invalid")
    if not tensor_map:
        raise fail("a 0-d tensor has no dim 0 to shard")
    ndev = len(dev_matrix)
    used = {ndev - 1 - m for m in _flat_axes(tensor_map)}
    repeated = [i for i, n in enumerate(dev_matrix) if i not in used and n > 1]
    if not repeated:
        raise fail("every device axis already splits the tensor, so no ranks hold copies to shard over")
    nested = any(not isinstance(entry, int) for entry in tensor_map)
    if not nested and repeated == [0] and ndev > 1:
        # With the outermost axis as the only copies, transform_checkpoints 2.10 renumbers the
        # split axes in dimension order (`_construct_tensor_layout_for_opt_shard`), which is the
        # general rule above only when they already are in that order.
        split_axes = [ndev - 1 - m for m in tensor_map if m != -1 and dev_matrix[ndev - 1 - m] > 1]
        if split_axes != sorted(split_axes):
            raise fail(
                "its split axes are not in dimension order, and for such a layout MindSpore 2.10's "
                "transform_checkpoints and its general rule give the ranks different slices, so the "
                "layout is ambiguous"
            )
    remaining = size if size != -1 else math.prod(dev_matrix[i] for i in repeated)

    # Walk the unmapped axes from the innermost out. The last one taken may be cut in two,
    # [n // r, r], and then its inner part r shards.
    opt_axes: List[int] = []  # left-based indices in dev_matrix, outermost first
    split: Optional[Tuple[int, int]] = None  # (axis, inner size) of the axis that is cut
    for i in reversed(repeated):
        n = dev_matrix[i]
        if remaining < n:
            if n % remaining:
                raise fail(f"device axis {ndev - 1 - i} of size {n} does not divide into {remaining} parts")
            split = (i, remaining)
            remaining = 1
        elif remaining % n:
            raise fail(f"the remaining shard size {remaining} is not a multiple of device axis {ndev - 1 - i} (size {n})")
        else:
            remaining //= n
        opt_axes.insert(0, i)
        if remaining == 1:
            break
    if remaining != 1:
        raise fail("it needs more ranks than there are copies of each slice")

    new_matrix = list(dev_matrix)
    new_index = list(range(ndev))  # old left-based axis index -> new left-based index
    if split is not None:
        axis, inner = split
        new_matrix[axis : axis + 1] = [dev_matrix[axis] // inner, inner]
        new_index = [j if j <= axis else j + 1 for j in range(ndev)]
    new_ndev = len(new_matrix)

    def renumber(m: int) -> int:
        return -1 if m == -1 else new_ndev - 1 - new_index[ndev - 1 - m]

    new_map: List[TensorMapEntry] = [
        renumber(entry) if isinstance(entry, int) else [renumber(m) for m in entry] for entry in tensor_map
    ]
    # The cut axis shards with its inner part, which sits right after the outer one.
    opt_new = [new_index[i] + (1 if split is not None and i == split[0] else 0) for i in opt_axes]
    opt_from_last = [new_ndev - 1 - j for j in opt_new]
    first = new_map[0]
    first_axes = [m for m in ([first] if isinstance(first, int) else first) if m != -1]
    dim0 = first_axes + opt_from_last
    new_map[0] = dim0[0] if len(dim0) == 1 else dim0

    innermost = opt_new[-1]
    stride = math.prod(new_matrix[innermost + 1 :])
    if step != stride:
        raise fail(
            f"the shard groups these axes form are {stride} ranks apart, but opt_weight_shard_step says {step}"
        )
    return new_matrix, new_map


def _check_item(item: StrategyItem, path: Optional[Path]) -> None:
    if item.field != 0:
        raise PlanError(
            f"field = {item.field}: the layout of a field-sliced embedding table (MultiFieldEmbeddingLookup) "
            "is not a tensor_map layout, so shardsmith cannot move it",
            path=path,
            param=item.name,
        )
    if item.param_split_shape:
        raise PlanError(
            f"param_split_shape {list(item.param_split_shape)} splits it into uneven slices, which a "
            "tensor_map layout cannot describe",
            path=path,
            param=item.name,
        )
    if any(n < 1 for n in item.dev_matrix) or not item.dev_matrix:
        raise PlanError(f"dev_matrix {list(item.dev_matrix)} must be a non-empty list of positive sizes", path=path, param=item.name)


def import_strategy_file(path: Any, world_size: Optional[int] = None) -> Plan:
    """Read a MindSpore strategy file as a plan: one exact-name rule per parameter it lays out.

    Parameters whose tensor_map splits nothing become `replicate` rules, the others `tensor_map`
    rules (parallel-optimizer sharding folded into dim 0, see `expand_opt_shard`). Pipeline
    stages, field-sliced embeddings and uneven splits are rejected with a message naming the
    parameter. `world_size` defaults to the size of the device matrices, which must all agree.
    """
    path = Path(path)
    strategy = read_strategy_file(path)
    later_stages = sorted({s for s in strategy.stages if s != 0})
    if later_stages:
        first = strategy.items[0].name if strategy.items else None
        raise PlanError(
            f"the strategy file holds pipeline stage {', '.join(map(str, later_stages))}; a plan lays out "
            "every parameter over all ranks, so pipeline-parallel layouts are not supported",
            path=path,
            param=first,
            hint="Merge each stage's rank set with its own strategy file",
        )

    rules: List[Dict[str, Any]] = []
    sizes: Dict[int, str] = {}
    for item in strategy.items:
        _check_item(item, path)
        dev_matrix, tensor_map = expand_opt_shard(item, path)
        sizes.setdefault(math.prod(dev_matrix), item.name)
        rule: Dict[str, Any] = {"match": glob_for_name(item.name)}
        if not _flat_axes(tensor_map):
            rule["strategy"] = "replicate"
        else:
            rule.update(strategy="tensor_map", dev_matrix=list(dev_matrix), tensor_map=list(tensor_map))
        rules.append(rule)

    if len(sizes) > 1:
        described = ", ".join(f"{size} (parameter '{name}')" for size, name in sorted(sizes.items()))
        raise PlanError(f"the device matrices lay out different numbers of ranks: {described}", path=path)
    file_world = next(iter(sizes), None)
    if world_size is None:
        if file_world is None:
            raise PlanError("the strategy file lays out no parameter, so the world size is unknown", path=path, hint="Pass the world size")
        world_size = file_world
    elif file_world is not None and file_world != world_size:
        raise PlanError(
            f"the device matrices lay out {file_world} ranks but the world size is {world_size}",
            path=path,
            param=sizes[file_world],
            hint="A strategy file of one pipeline stage covers only that stage's ranks, which shardsmith does not support",
        )
    return plan_from_dict({"world_size": world_size, "param": rules}, path=path)


def load_plan_or_strategy(path: Any, world_size: Optional[int] = None) -> Plan:
    """Read `path` as a strategy file when `is_strategy_file` returns True, else as a TOML plan."""
    from .plan import load_plan

    if is_strategy_file(path):
        return import_strategy_file(path, world_size)
    return load_plan(path)


# -- writing -----------------------------------------------------------------------------------


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _segments(index: np.ndarray, parts: int, world_size: int) -> Optional[List[Tuple[int, int]]]:
    """Write a per-rank block index as mixed-radix digits of the rank: [(stride, size)], outermost first.

    `index[r]` must equal the digits `(r // stride) % size` read as one number; None when no such
    decomposition exists (the layout is not one MindSpore can describe).
    """
    if parts == 1:
        return [] if not index.any() else None
    ranks = np.arange(world_size)
    for size in reversed(_divisors(parts)):
        if size == 1:
            continue
        inner = parts // size
        outer_digit = index // inner
        for stride in _divisors(world_size):
            if world_size % (stride * size):
                continue
            if np.array_equal((ranks // stride) % size, outer_digit):
                rest = _segments(index % inner, inner, world_size)
                if rest is not None:
                    return [(stride, size)] + rest
    return None


def tensor_map_of(layout: Layout, name: str = "") -> Tuple[List[int], List[TensorMapEntry]]:
    """Find a (dev_matrix, tensor_map) pair whose `from_tensor_map` layout equals `layout`.

    Raise LayoutError when there is none: a strategy whose slices are not one box per rank
    (a fused QKV weight, padding) cannot be written to a strategy file.
    """
    param = name or None
    world = layout.world_size
    shape = layout.full_shape

    def not_expressible(reason: str) -> LayoutError:
        return LayoutError(
            f"its layout ({layout.description or 'from a plugin'}) cannot be written as a MindSpore "
            f"dev_matrix and tensor_map: {reason}",
            param=param,
        )

    block = layout.slice_shapes[0]
    for rank, pieces in enumerate(layout.pieces):
        if layout.slice_shapes[rank] != block:
            raise not_expressible(f"rank 0 holds a slice of {list(block)} but rank {rank} one of {list(layout.slice_shapes[rank])}")
        if len(pieces) != 1 or pieces[0].local.shape != tuple(block):
            raise not_expressible(f"rank {rank}'s slice is not one box of the full tensor")
    segments_per_dim: List[List[Tuple[int, int]]] = []
    for k, (size, b) in enumerate(zip(shape, block)):
        if b == 0 or size % b:
            raise not_expressible(f"dim {k} of size {size} is not cut into equal blocks of {b}")
        starts = np.array([pieces[0].full.start[k] for pieces in layout.pieces])
        if np.any(starts % b):
            raise not_expressible(f"dim {k} is not cut at multiples of its block size {b}")
        found = _segments(starts // b, size // b, world)
        if found is None:
            raise not_expressible(f"the ranks do not take the blocks of dim {k} in device-matrix order")
        segments_per_dim.append(found)

    # Lay the segments out as device axes, innermost (stride 1) first; gaps hold copies.
    all_segments = sorted((stride, size, k) for k, segments in enumerate(segments_per_dim) for stride, size in segments)
    axes: List[Tuple[int, Optional[Tuple[int, int]]]] = []  # (size, (stride, dim) or None), innermost first
    position = 1
    for stride, size, k in all_segments:
        if stride < position or stride % position:
            raise not_expressible(f"two dimensions are split by overlapping groups of ranks (at stride {stride})")
        if stride > position:
            axes.append((stride // position, None))
        axes.append((size, (stride, k)))
        position = stride * size
    if world % position:
        raise not_expressible(f"the splits span {position} ranks, which does not divide the world size {world}")
    if world > position or not axes:
        axes.append((world // position, None))

    dev_matrix = [size for size, _ in reversed(axes)]
    axis_of = {seg: number for number, (_, seg) in enumerate(axes) if seg is not None}  # counted from the last
    tensor_map: List[TensorMapEntry] = []
    for k, segments in enumerate(segments_per_dim):
        numbers = [axis_of[(stride, k)] for stride, _ in segments]
        if not numbers:
            tensor_map.append(-1)
        elif len(numbers) == 1:
            tensor_map.append(numbers[0])
        else:
            tensor_map.append(numbers)

    rebuilt = from_tensor_map(shape, dev_matrix, tensor_map, name=name)
    if rebuilt.slice_shapes != layout.slice_shapes or any(
        a[0].full != b[0].full for a, b in zip(rebuilt.pieces, layout.pieces)
    ):
        raise not_expressible(f"the nearest match, dev_matrix {dev_matrix} and tensor_map {tensor_map}, differs")
    return dev_matrix, tensor_map


def strategy_items(layouts: Mapping[str, ParamLayout], *, only_split: bool = False) -> List[StrategyItem]:
    """Return the strategy-file items of resolved parameter layouts, in their order.

    Scalars and str entries are left out; replicated tensors are included (dev_matrix
    [world size], tensor_map all -1) unless `only_split`, because `load_distributed_checkpoint`
    loads only the parameters a strategy file names.
    """
    items = []
    for name, param in layouts.items():
        if is_scalar(param.dtype, param.full_shape):
            continue
        layout = param.layout
        if layout.is_replicated:
            if only_split:
                continue
            dev_matrix, tensor_map = [layout.world_size], [-1] * len(layout.full_shape)
        else:
            dev_matrix, tensor_map = tensor_map_of(layout, name)
        items.append(StrategyItem(name, tuple(dev_matrix), tuple(tensor_map)))
    return items


def strategy_file_bytes(items: Sequence[StrategyItem], format: str = "protobuf") -> bytes:
    """Serialize items as MindSpore writes a strategy file: `protobuf`, or `json` for build_searched_strategy."""
    if format == "json":
        layout_items: Dict[str, Any] = {}
        for item in items:
            if any(not isinstance(m, int) for m in item.tensor_map):
                raise LayoutError(
                    f"tensor_map {list(item.tensor_map)} splits one dimension over several device axes, which "
                    "MindSpore reads only from a protobuf strategy file",
                    param=item.name,
                    hint="Write a .ckpt strategy file instead",
                )
            layout_items[item.name] = {
                "dev_matrix": list(item.dev_matrix),
                "tensor_map": list(item.tensor_map),
                "param_split_shape": list(item.param_split_shape),
                "indices_offset": list(item.indices_offset),
                "field": item.field,
                "opt_weight_shard_step": item.opt_weight_shard_step,
                "opt_weight_shard_size": item.opt_weight_shard_size,
            }
        content = {"current_stage": 0, "parallel_strategy_item": {}, "parallel_layout_item": layout_items}
        return (json.dumps(content, indent=2) + "\n").encode("utf-8")

    pb2 = node_strategy_pb2()
    message = pb2.ParallelStrategyMap()
    message.current_stage = 0
    for item in items:
        entry = message.parallel_layout_item.add()
        entry.param_name = item.name
        layouts = entry.parallel_layouts
        layouts.dev_matrix.add().dim.extend(item.dev_matrix)
        nested = any(not isinstance(m, int) for m in item.tensor_map)
        if nested:
            for m in item.tensor_map:
                layouts.tensor_map.add().dim.extend([m] if isinstance(m, int) else m)
            if len(item.tensor_map) == 1:
                # One TensorMap would be read as a flat list; MindSpore drops an empty one.
                layouts.tensor_map.add()
        else:
            layouts.tensor_map.add().dim.extend(item.tensor_map)
        # MindSpore's readers index param_split_shape[0] and indices_offset[0], so both are
        # present even when empty; the three ints are proto2 `required`.
        layouts.param_split_shape.add().dim.extend(item.param_split_shape)
        layouts.indices_offset.add().dim.extend(item.indices_offset)
        layouts.field = item.field
        layouts.opt_weight_shard_step = item.opt_weight_shard_step
        layouts.opt_weight_shard_size = item.opt_weight_shard_size
    return message.SerializeToString()


def resolve_for_export(plan: Plan, source: Any) -> Dict[str, ParamLayout]:
    """Lay out every parameter of an open `rankset.Source` under `plan`.

    A single file is taken as the full checkpoint; a rank set as slices laid out by `plan`.
    """
    dtypes = {info.name: info.dtype for info in source.infos()}
    if source.world_size == 1:
        shapes = {info.name: info.shape for info in source.infos()}
        return resolve_full(plan, source.names, dtypes, shapes)
    if source.world_size != plan.world_size:
        raise PlanError(
            f"the rank set has {source.world_size} ranks but the plan has world_size {plan.world_size}", path=plan.path
        )
    return resolve_slices(plan, source.names, dtypes, {n: source.slice_shapes(n) for n in source.names})


def export_strategy_file(
    plan: Plan,
    sources: Sequence[Any],
    output: Any,
    *,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    only_split: bool = False,
    force: bool = False,
) -> int:
    """Write `plan`, applied to a checkpoint or rank set, as a MindSpore strategy file at `output`.

    The format follows the suffix: `.json` writes JSON, anything else protobuf. Returns the number
    of parameters written. The file is written atomically.
    """
    from .output import atomic_output
    from .rankset import open_source

    output = Path(output)
    with open_source([Path(s) for s in sources], select, input_format) as source:
        layouts = resolve_for_export(plan, source)
    items = strategy_items(layouts, only_split=only_split)
    data = strategy_file_bytes(items, "json" if output.suffix.lower() == ".json" else "protobuf")
    inputs = [Path(s) for s in sources] + ([plan.path] if plan.path is not None else [])
    with atomic_output(output, directory=False, force=force, inputs=inputs) as out:
        out.open().write(data)
        out.commit()
    return len(items)


def import_to_toml(path: Any, output: Any, *, world_size: Optional[int] = None, force: bool = False) -> Plan:
    """Write the plan a strategy file describes as a TOML plan file at `output`, atomically."""
    from .output import atomic_output
    from .plan import dumps_plan

    path, output = Path(path), Path(output)
    plan = import_strategy_file(path, world_size)
    text = dumps_plan(plan, header=[f"Imported from the MindSpore strategy file {path.name}."])
    with atomic_output(output, directory=False, force=force, inputs=[path]) as out:
        out.open().write(text.encode("utf-8"))
        out.commit()
    return plan
