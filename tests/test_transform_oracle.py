"""Merge, split and reshard against MindSpore's own `transform_checkpoints` as the oracle.

Each plan is exported as a strategy file, so MindSpore and shardsmith move the same full checkpoint
by the same layouts. Their rank sets and merged checkpoints must contain the same bytes. The full
checkpoint mixes dtypes (BFloat16 included), replicated biases, Momentum states that follow their
weights, and scalars. It holds no str entry, because `transform_checkpoints` 2.10 fails on one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

from shardsmith import jobs
from shardsmith.formats import open_checkpoint
from shardsmith.plan import dumps_plan, loads_plan
from shardsmith.strategy_file import (
    StrategyItem,
    export_strategy_file,
    import_strategy_file,
    strategy_file_bytes,
)

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor, nn  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402

RNG = np.random.default_rng(7)

# name -> (MindSpore dtype, shape); states and scalars follow the weights as Momentum saves them.
WEIGHTS = {
    "embedding.table": ("Float32", (16, 8)),
    "fc1.weight": ("Float32", (8, 16)),
    "fc1.bias": ("Float32", (16,)),
    "fc2.weight": ("BFloat16", (16, 8)),
    "fc2.bias": ("Float16", (8,)),
    "blk.w3": ("Float32", (4, 8, 4)),
}
PARAMS = {
    **WEIGHTS,
    **{f"moments.{name}": spec for name, spec in WEIGHTS.items()},
    "learning_rate": ("Float32", ()),
    "momentum": ("Float32", ()),
    "global_step": ("Int32", (1,)),
}

PLANS = {
    "row": """
world_size = 4
[[param]]
match = "fc1.weight"
strategy = "row"
[[param]]
match = "embedding.table"
strategy = "row"
parts = 2
""",
    "column": """
world_size = 4
[[param]]
match = "fc*.weight"
strategy = "column"
parts = 2
[[param]]
match = "embedding.table"
strategy = "column"
""",
    "grid": """
world_size = 4
[[param]]
match = "fc*.weight"
strategy = "grid"
grid = [2, 2]
[[param]]
match = "blk.w3"
strategy = "grid"
grid = [2, 2]
""",
    # Copies on the inner axis for the table, on the outer axis for the weights.
    "tensor_map_dp": """
world_size = 4
[[param]]
match = "fc*.weight"
strategy = "tensor_map"
dev_matrix = [2, 2]
tensor_map = [-1, 0]
[[param]]
match = "embedding.table"
strategy = "tensor_map"
dev_matrix = [2, 2]
tensor_map = [1, -1]
""",
    "three_axis": """
world_size = 8
[[param]]
match = "blk.w3"
strategy = "tensor_map"
dev_matrix = [2, 2, 2]
tensor_map = [2, -1, 0]
[[param]]
match = "fc1.weight"
strategy = "tensor_map"
dev_matrix = [2, 2, 2]
tensor_map = [0, 1]
[[param]]
match = "embedding.table"
strategy = "tensor_map"
dev_matrix = [2, 2, 2]
tensor_map = [-1, 1]
""",
}

Contents = Dict[str, Tuple[str, Tuple[int, ...], bytes]]


def _array(dtype: str, shape) -> Tensor:
    values = RNG.standard_normal(size=shape).astype(np.float32)
    if dtype == "BFloat16":
        return Tensor(values, dtype=mstype.bfloat16)
    if dtype == "Int32":
        return Tensor(RNG.integers(-1000, 1000, size=shape).astype(np.int32))
    return Tensor(values.astype({"Float32": np.float32, "Float16": np.float16}[dtype]))


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> Path:
    """A full checkpoint saved by MindSpore, as `full/rank_0/full.ckpt` (transform_checkpoints' layout)."""
    root = tmp_path_factory.mktemp("full") / "full"
    (root / "rank_0").mkdir(parents=True)
    params = [{"name": name, "data": Parameter(_array(dtype, shape), name)} for name, (dtype, shape) in PARAMS.items()]
    ms.save_checkpoint(params, str(root / "rank_0" / "full.ckpt"))
    return root


def _full_file(full_dir: Path) -> Path:
    return full_dir / "rank_0" / "full.ckpt"


def _contents(path: Path) -> Contents:
    with open_checkpoint(path) as reader:
        return {info.name: (info.dtype, info.shape, reader.array(info.name).tobytes()) for info in reader}


def _only_file(directory: Path) -> Path:
    files = sorted(directory.glob("*.ckpt"))
    assert len(files) == 1, files
    return files[0]


def _rank_set(directory: Path, world_size: int):
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == sorted(f"rank_{r}" for r in range(world_size))
    return [_contents(_only_file(directory / f"rank_{r}")) for r in range(world_size)]


def _assert_same(ours: Contents, theirs: Contents, where: str) -> None:
    assert sorted(ours) == sorted(theirs), where
    for name in ours:
        assert ours[name][:2] == theirs[name][:2], f"{where}: {name} dtype/shape"
        assert ours[name][2] == theirs[name][2], f"{where}: {name} bytes"


def _transform(src: Path, dst: Path, prefix: str, src_strategy, dst_strategy) -> None:
    ms.transform_checkpoints(
        str(src), str(dst), prefix, str(src_strategy) if src_strategy else None, str(dst_strategy) if dst_strategy else None
    )


def _plan_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _export(tmp_path: Path, name: str, full_dir: Path) -> Path:
    strategy = tmp_path / f"{name}_strategy.ckpt"
    export_strategy_file(loads_plan(PLANS[name]), [_full_file(full_dir)], strategy)
    return strategy


@pytest.mark.parametrize("case", list(PLANS))
def test_split_matches_mindspore(tmp_path, full_dir, case):
    world_size = loads_plan(PLANS[case]).world_size
    strategy = _export(tmp_path, case, full_dir)

    _transform(full_dir, tmp_path / "theirs", "checkpoint_", None, strategy)
    jobs.split(_full_file(full_dir), _plan_file(tmp_path, case, PLANS[case]), tmp_path / "ours")

    ours = _rank_set(tmp_path / "ours", world_size)
    theirs = _rank_set(tmp_path / "theirs", world_size)
    for rank in range(world_size):
        _assert_same(ours[rank], theirs[rank], f"{case} rank {rank}")
    # The plan really splits something: rank 0's fc1.weight is not the full tensor in every case.
    assert any(ours[0][name][1] != PARAMS[name][1] for name in WEIGHTS)


@pytest.mark.parametrize("case", list(PLANS))
def test_merge_matches_mindspore(tmp_path, full_dir, case):
    strategy = _export(tmp_path, case, full_dir)
    plan_path = _plan_file(tmp_path, case, PLANS[case])
    full = _contents(_full_file(full_dir))
    _transform(full_dir, tmp_path / "their_split", "checkpoint_", None, strategy)
    jobs.split(_full_file(full_dir), plan_path, tmp_path / "our_split")

    # MindSpore merges our rank set; we merge MindSpore's, by the plan and by the imported strategy.
    _transform(tmp_path / "our_split", tmp_path / "their_merge", "merged_", strategy, None)
    jobs.merge([tmp_path / "their_split"], plan_path, tmp_path / "ours.ckpt")
    imported = _plan_file(tmp_path, "imported", dumps_plan(import_strategy_file(strategy)))
    jobs.merge([tmp_path / "their_split"], imported, tmp_path / "ours_imported.ckpt")

    theirs = _contents(_only_file(tmp_path / "their_merge" / "rank_0"))
    _assert_same(theirs, full, f"{case}: MindSpore's merge of our split")
    _assert_same(_contents(tmp_path / "ours.ckpt"), full, f"{case}: our merge")
    _assert_same(_contents(tmp_path / "ours_imported.ckpt"), theirs, f"{case}: our merge by the imported strategy")


@pytest.mark.parametrize(("source", "target"), [("grid", "tensor_map_dp"), ("row", "column"), ("three_axis", "grid")])
def test_reshard_matches_mindspore(tmp_path, full_dir, source, target):
    source_strategy = _export(tmp_path, source, full_dir)
    target_strategy = _export(tmp_path, target, full_dir)
    source_plan = _plan_file(tmp_path, source, PLANS[source])
    target_plan = _plan_file(tmp_path, target, PLANS[target])
    jobs.split(_full_file(full_dir), source_plan, tmp_path / "split")

    _transform(tmp_path / "split", tmp_path / "theirs", "checkpoint_", source_strategy, target_strategy)
    jobs.reshard([tmp_path / "split"], source_plan, target_plan, tmp_path / "ours")

    world_size = loads_plan(PLANS[target]).world_size
    ours = _rank_set(tmp_path / "ours", world_size)
    theirs = _rank_set(tmp_path / "theirs", world_size)
    for rank in range(world_size):
        _assert_same(ours[rank], theirs[rank], f"{source} -> {target} rank {rank}")


def test_nested_tensor_map_matches_mindspore(tmp_path, full_dir):
    # fc2.weight's dim 0 split by two device axes, outer axis 2 then axis 0.
    plan = """
world_size = 8
[[param]]
match = "fc2.weight"
strategy = "tensor_map"
dev_matrix = [2, 2, 2]
tensor_map = [[2, 0], -1]
"""
    strategy = tmp_path / "nested.ckpt"
    export_strategy_file(loads_plan(plan), [_full_file(full_dir)], strategy)

    _transform(full_dir, tmp_path / "theirs", "checkpoint_", None, strategy)
    jobs.split(_full_file(full_dir), _plan_file(tmp_path, "nested", plan), tmp_path / "ours")

    ours = _rank_set(tmp_path / "ours", 8)
    theirs = _rank_set(tmp_path / "theirs", 8)
    for rank in range(8):
        _assert_same(ours[rank], theirs[rank], f"nested rank {rank}")
    assert ours[1]["fc2.weight"][1] == (4, 8)


# (dev_matrix, tensor_map, opt_weight_shard_step, opt_weight_shard_size) that MindSpore's
# transform_checkpoints and shardsmith read the same way: copies on one or several axes, an axis
# cut in two, size -1 (every copy), and weights split or replicated by the model-parallel axes.
OPT_SHARD_CASES = [
    ((4, 2), (-1, 0), 2, 2),
    ((2, 2), (-1, -1), 1, 2),
    ((2, 2), (-1, -1), 1, -1),
    ((2, 2, 2), (1, -1), 1, 2),
    ((2, 2, 2), (0, -1), 2, -1),
    ((2, 2, 2), (-1, 0), 2, 4),
    ((2, 2, 2), (1, 0), 4, 2),
]


@pytest.mark.parametrize(("dev_matrix", "tensor_map", "step", "size"), OPT_SHARD_CASES)
def test_opt_shard_strategy_matches_mindspore(tmp_path, full_dir, dev_matrix, tensor_map, step, size):
    items = [
        StrategyItem(name, dev_matrix, tensor_map, opt_weight_shard_step=step, opt_weight_shard_size=size)
        for name in ("fc1.weight", "moments.fc1.weight", "embedding.table", "moments.embedding.table")
    ]
    strategy = tmp_path / "opt_shard.ckpt"
    strategy.write_bytes(strategy_file_bytes(items))
    plan_path = _plan_file(tmp_path, "imported", dumps_plan(import_strategy_file(strategy)))
    world_size = int(np.prod(dev_matrix))

    _transform(full_dir, tmp_path / "theirs", "checkpoint_", None, strategy)
    jobs.split(_full_file(full_dir), plan_path, tmp_path / "ours")
    jobs.merge([tmp_path / "theirs"], plan_path, tmp_path / "merged.ckpt")

    ours = _rank_set(tmp_path / "ours", world_size)
    theirs = _rank_set(tmp_path / "theirs", world_size)
    for rank in range(world_size):
        _assert_same(ours[rank], theirs[rank], f"opt shard rank {rank}")
    assert ours[0]["fc1.weight"][1] != PARAMS["fc1.weight"][1]
    _assert_same(_contents(tmp_path / "merged.ckpt"), _contents(_full_file(full_dir)), "merge of the opt-sharded set")


class _Net(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        for name, (dtype, shape) in WEIGHTS.items():
            ms_dtype = {"Float32": mstype.float32, "BFloat16": mstype.bfloat16, "Float16": mstype.float16}[dtype]
            setattr(self, name.replace(".", "_"), Parameter(Tensor(np.zeros(shape), ms_dtype), name=name))

    def construct(self, x):
        return x


def test_load_distributed_checkpoint_reads_our_split(tmp_path, full_dir):
    strategy = _export(tmp_path, "grid", full_dir)
    jobs.split(_full_file(full_dir), _plan_file(tmp_path, "grid", PLANS["grid"]), tmp_path / "split")
    net = _Net()
    files = [str(_only_file(tmp_path / "split" / f"rank_{r}")) for r in range(4)]

    ms.load_distributed_checkpoint(net, files, predict_strategy=None, train_strategy_filename=str(strategy))

    full = ms.load_checkpoint(str(_full_file(full_dir)))
    for param in net.get_parameters():
        loaded = param.float().asnumpy() if param.dtype == mstype.bfloat16 else param.asnumpy()
        expected = full[param.name]
        expected = expected.float().asnumpy() if expected.dtype == mstype.bfloat16 else expected.asnumpy()
        np.testing.assert_array_equal(loaded, expected, err_msg=param.name)


def _same_file_bytes(a: Path, b: Path, chunk: int = 64 * 1024 * 1024) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block_a, block_b = fa.read(chunk), fb.read(chunk)
            if block_a != block_b:
                return False
            if not block_a:
                return True


@pytest.mark.slow
def test_merged_600mib_parameter_loads_in_mindspore(tmp_path):
    # A 600 MiB Float32 parameter merged from two 300 MiB slices must be written as MindSpore
    # writes it, in records of 512 MiB and 88 MiB with the same tag, and load back.
    rows, columns = 150, 1024 * 1024
    full = np.arange(rows * columns, dtype=np.float32).reshape(rows, columns)
    for rank in range(2):
        (tmp_path / "set" / f"rank_{rank}").mkdir(parents=True)
        part = Tensor(full[rank * rows // 2 : (rank + 1) * rows // 2])
        ms.save_checkpoint([{"name": "big", "data": part}], str(tmp_path / "set" / f"rank_{rank}" / "net.ckpt"))
        del part
    ms.save_checkpoint([{"name": "big", "data": Tensor(full)}], str(tmp_path / "reference.ckpt"))
    del full
    plan = _plan_file(tmp_path, "row", 'world_size = 2\n[[param]]\nmatch = "big"\nstrategy = "row"\n')

    jobs.merge([tmp_path / "set"], plan, tmp_path / "merged.ckpt")

    assert _same_file_bytes(tmp_path / "merged.ckpt", tmp_path / "reference.ckpt")
    with open_checkpoint(tmp_path / "merged.ckpt") as reader:
        assert [length for _, length in reader._entry("big").content] == [512 * 1024 * 1024, 88 * 1024 * 1024]
    loaded = ms.load_checkpoint(str(tmp_path / "merged.ckpt"))["big"]
    assert loaded.shape == (rows, columns)
    with open_checkpoint(tmp_path / "reference.ckpt") as reference:
        assert np.array_equal(loaded.asnumpy(), reference.array("big"))
