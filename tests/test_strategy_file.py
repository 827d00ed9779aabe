"""Strategy files: what shardsmith writes, MindSpore's own readers read back the same; what MindSpore
describes, shardsmith imports as the same layouts."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pytest

from shardsmith.errors import LayoutError, OutputExistsError, PlanError
from shardsmith.layout import Box, Layout, Piece, from_tensor_map
from shardsmith.plan import loads_plan, resolve_full
from shardsmith.strategy_file import (
    StrategyItem,
    expand_opt_shard,
    export_strategy_file,
    glob_for_name,
    import_strategy_file,
    is_strategy_file,
    load_plan_or_strategy,
    node_strategy_pb2,
    read_strategy_file,
    strategy_file_bytes,
    tensor_map_of,
)

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor  # noqa: E402
from mindspore.parallel._parallel_serialization import _build_searched_strategy, _convert_to_list  # noqa: E402

PLAN = """
world_size = 4

[[param]]
match = "fc1.weight"
strategy = "row"
parts = 2

[[param]]
match = "fc2.weight"
strategy = "grid"
grid = [2, 2]

[[param]]
match = "emb.table"
strategy = "tensor_map"
dev_matrix = [2, 2]
tensor_map = [[0, 1], -1]
"""

SHAPES = {
    "fc1.weight": (8, 6),
    "fc1.bias": (6,),
    "fc2.weight": (4, 8),
    "emb.table": (8, 3),
    "moments.fc1.weight": (8, 6),
    "learning_rate": (),
}


def _full_checkpoint(path: Path) -> Path:
    params = [
        {"name": name, "data": Parameter(Tensor(np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)), name)}
        for name, shape in SHAPES.items()
    ]
    ms.save_checkpoint(params, str(path))
    return path


def _layouts(plan_text: str = PLAN):
    plan = loads_plan(plan_text)
    dtypes = {name: "Float32" for name in SHAPES}
    return resolve_full(plan, list(SHAPES), dtypes, SHAPES)


def _write_items(path: Path, items) -> Path:
    path.write_bytes(strategy_file_bytes(items))
    return path


def test_glob_for_name_matches_only_the_name():
    for name in ["fc.weight", "a*b", "layer[0].w", "x?y", "odd]name"]:
        glob = glob_for_name(name)
        assert fnmatch.fnmatchcase(name, glob), glob
    assert not fnmatch.fnmatchcase("aXb", glob_for_name("a*b"))
    assert not fnmatch.fnmatchcase("layer0.w", glob_for_name("layer[0].w"))


@pytest.mark.parametrize(
    ("dev_matrix", "tensor_map", "shape"),
    [
        ([2, 2], [1, 0], (8, 8)),
        ([2, 4], [0, -1], (8, 4)),
        ([2, 2, 2], [0, 1], (4, 4)),
        ([2, 2, 2], [[2, 0], -1], (8, 4)),
        ([2, 2], [[0, 1]], (8,)),
        ([3, 2], [1, -1], (6, 2)),
    ],
)
def test_tensor_map_of_rebuilds_layout(dev_matrix, tensor_map, shape):
    layout = from_tensor_map(shape, dev_matrix, tensor_map)
    found_matrix, found_map = tensor_map_of(layout, "p")
    rebuilt = from_tensor_map(shape, found_matrix, found_map)
    assert rebuilt.pieces == layout.pieces
    assert (found_matrix, found_map) == (dev_matrix, tensor_map)


def test_tensor_map_of_rejects_two_boxes_per_rank():
    # Rank r holds rows r and r + 2 of a [4, 2] tensor: two boxes, as a fused weight would.
    pieces = []
    for rank in range(2):
        pieces.append(
            (
                Piece(Box((0, 0), (1, 2)), Box((rank, 0), (rank + 1, 2))),
                Piece(Box((1, 0), (2, 2)), Box((rank + 2, 0), (rank + 3, 2))),
            )
        )
    layout = Layout((4, 2), ((2, 2), (2, 2)), tuple(pieces), "fused")
    with pytest.raises(LayoutError, match=r"parameter 'qkv'.*cannot be written as a MindSpore dev_matrix"):
        tensor_map_of(layout, "qkv")


def test_export_read_by_mindspore(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(PLAN)
    out = tmp_path / "strategy.ckpt"

    count = export_strategy_file(load_plan_or_strategy(plan_path), [full], out)

    strategy = _build_searched_strategy(str(out))
    as_lists = _convert_to_list(strategy)
    assert count == 5  # every tensor; learning_rate is 0-d
    assert list(as_lists) == ["fc1.weight", "fc1.bias", "fc2.weight", "emb.table", "moments.fc1.weight"]
    # [dev_matrix, tensor_map, param_split_shape, field, opt step, opt size, pipeline stages]
    assert as_lists["fc1.weight"] == [[2, 2], [0, -1], [], 0, 0, 0, [0]]
    assert as_lists["moments.fc1.weight"] == [[2, 2], [0, -1], [], 0, 0, 0, [0]]
    assert as_lists["fc2.weight"] == [[2, 2], [1, 0], [], 0, 0, 0, [0]]
    assert as_lists["fc1.bias"] == [[4], [-1], [], 0, 0, 0, [0]]
    assert as_lists["emb.table"][:2] == [[2, 2], [[0, 1], [-1]]]


def test_export_only_split(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    out = tmp_path / "strategy.pb"

    export_strategy_file(loads_plan(PLAN), [full], out, only_split=True)

    names = [item.name for item in read_strategy_file(out).items]
    assert names == ["fc1.weight", "fc2.weight", "emb.table", "moments.fc1.weight"]


def test_export_json_read_by_mindspore(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    plan = PLAN.split("[[param]]\nmatch = \"emb.table\"")[0]
    out = tmp_path / "strategy.json"

    export_strategy_file(loads_plan(plan), [full], out)

    as_lists = _convert_to_list(_build_searched_strategy(str(out)))
    assert as_lists["fc2.weight"][:2] == [[2, 2], [1, 0]]
    assert json.loads(out.read_text())["parallel_layout_item"]["fc1.weight"]["tensor_map"] == [0, -1]


def test_export_json_rejects_nested_tensor_map(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    with pytest.raises(LayoutError, match=r"parameter 'emb.table'.*only from a protobuf strategy file"):
        export_strategy_file(loads_plan(PLAN), [full], tmp_path / "strategy.json")
    assert not (tmp_path / "strategy.json").exists()


def test_export_refuses_existing_output(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    out = tmp_path / "strategy.ckpt"
    out.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="output exists"):
        export_strategy_file(loads_plan(PLAN), [full], out)
    assert out.read_bytes() == b"keep"


def test_round_trip_gives_same_layouts(tmp_path):
    full = _full_checkpoint(tmp_path / "full.ckpt")
    out = tmp_path / "strategy.ckpt"
    export_strategy_file(loads_plan(PLAN), [full], out)

    plan = import_strategy_file(out)

    assert plan.world_size == 4
    original = _layouts()
    imported = resolve_full(plan, list(SHAPES), {n: "Float32" for n in SHAPES}, SHAPES)
    for name in SHAPES:
        assert imported[name].layout.pieces == original[name].layout.pieces, name
    assert [rule.strategy for rule in plan.rules] == ["tensor_map", "replicate", "tensor_map", "tensor_map", "tensor_map"]


def test_import_escapes_glob_characters(tmp_path):
    path = _write_items(tmp_path / "s.ckpt", [StrategyItem("blocks[0].w*", (2,), (0, -1))])
    plan = import_strategy_file(path)
    assert plan.rules[0].match == "blocks[[]0].w[*]"
    assert plan.rule_for("blocks[0].w*") is plan.rules[0]
    assert plan.rule_for("blocks0.wx") is None


def test_import_opt_shard_folds_into_dim0(tmp_path):
    # dev_matrix [4, 2]: 4 data-parallel ranks, 2 model-parallel; the optimizer shards dim 0
    # over 2 of the 4 copies, adjacent in the data-parallel axis (2 ranks apart).
    item = StrategyItem("w", (4, 2), (-1, 0), opt_weight_shard_step=2, opt_weight_shard_size=2)
    plan = import_strategy_file(_write_items(tmp_path / "s.ckpt", [item]))
    rule = plan.rules[0]
    assert dict(rule.options) == {"dev_matrix": [2, 2, 2], "tensor_map": [1, 0]}
    layout = resolve_full(plan, ["w"], {"w": "Float32"}, {"w": (8, 4)})["w"].layout
    # Rank 2 is the second member of rank 0's shard group: rows 4-7, columns 0-1.
    assert layout.pieces[2][0].full == Box((4, 0), (8, 2))
    assert layout.pieces[4][0].full == Box((0, 0), (4, 2))


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (StrategyItem("w", (2, 2, 2), (-1, 0), 0, 2, -1), ([2, 2, 2], [[2, 1], 0])),
        (StrategyItem("w", (2, 2, 2), (1, -1), 0, 1, 2), ([2, 2, 2], [[1, 0], -1])),
        (StrategyItem("w", (8, 2), (-1, 0), 0, 2, 4), ([2, 4, 2], [1, 0])),
        (StrategyItem("w", (4, 2), (0, -1), 0, 0, 0), ([4, 2], [0, -1])),
    ],
)
def test_expand_opt_shard_cases(item, expected):
    assert expand_opt_shard(item) == expected


def test_expand_opt_shard_rejects_wrong_step():
    item = StrategyItem("w", (4, 2), (-1, 0), opt_weight_shard_step=1, opt_weight_shard_size=2)
    with pytest.raises(PlanError, match=r"parameter 'w'.*2 ranks apart, but opt_weight_shard_step says 1"):
        expand_opt_shard(item)


def test_expand_opt_shard_rejects_ambiguous_order():
    item = StrategyItem("w", (2, 2, 2), (0, 1), opt_weight_shard_step=4, opt_weight_shard_size=2)
    with pytest.raises(PlanError, match=r"parameter 'w'.*split axes are not in dimension order"):
        expand_opt_shard(item)


def test_expand_opt_shard_rejects_too_large_size():
    item = StrategyItem("w", (2, 2), (-1, 0), opt_weight_shard_step=2, opt_weight_shard_size=4)
    with pytest.raises(PlanError, match=r"parameter 'w'.*needs more ranks than there are copies"):
        expand_opt_shard(item)


def test_import_rejects_pipeline_stage(tmp_path):
    pb2 = node_strategy_pb2()
    message = pb2.ParallelStrategyMap()
    message.ParseFromString(strategy_file_bytes([StrategyItem("w", (2,), (0,))]))
    op = message.parallel_strategy_item.add()
    op.node_name = "MatMul-op0"
    op.parallel_strategys.stage = 1
    path = tmp_path / "stage1.ckpt"
    path.write_bytes(message.SerializeToString())

    with pytest.raises(PlanError, match=r"parameter 'w': the strategy file holds pipeline stage 1"):
        import_strategy_file(path)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (StrategyItem("emb", (2,), (0, -1), field=4), r"parameter 'emb': field = 4"),
        (StrategyItem("emb", (2,), (0, -1), param_split_shape=(3, 5)), r"parameter 'emb': param_split_shape \[3, 5\]"),
    ],
)
def test_import_rejects_unmovable_layouts(tmp_path, item, message):
    path = _write_items(tmp_path / "s.ckpt", [item])
    with pytest.raises(PlanError, match=message):
        import_strategy_file(path)


def test_import_rejects_mixed_device_counts(tmp_path):
    path = _write_items(tmp_path / "s.ckpt", [StrategyItem("a", (2,), (0,)), StrategyItem("b", (4,), (0,))])
    with pytest.raises(PlanError, match=r"2 \(parameter 'a'\), 4 \(parameter 'b'\)"):
        import_strategy_file(path)


def test_import_world_size_mismatch(tmp_path):
    path = _write_items(tmp_path / "s.ckpt", [StrategyItem("a", (2, 2), (1, 0))])
    with pytest.raises(PlanError, match=r"parameter 'a': the device matrices lay out 4 ranks but the world size is 8"):
        import_strategy_file(path, world_size=8)
    assert import_strategy_file(path, world_size=4).world_size == 4


def test_import_empty_needs_world_size(tmp_path):
    path = _write_items(tmp_path / "s.ckpt", [])
    # An empty message serializes to current_stage alone.
    with pytest.raises(PlanError, match="the world size is unknown"):
        import_strategy_file(path)
    assert import_strategy_file(path, world_size=2).rules == ()


def test_import_garbage(tmp_path):
    path = tmp_path / "s.ckpt"
    path.write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(PlanError, match="not a MindSpore strategy file"):
        import_strategy_file(path)


def test_import_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "current_stage": 1,
                "parallel_strategy_item": {"MatMul-op0": {"stage": 0, "parallel_strategy": [[2, 1]]}},
                "parallel_layout_item": {
                    "w": {"dev_matrix": [2, 2], "tensor_map": [1, -1], "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
                },
            }
        )
    )
    plan = import_strategy_file(path)
    assert dict(plan.rules[0].options) == {"dev_matrix": [2, 2], "tensor_map": [1, -1]}


def test_is_strategy_file(tmp_path):
    toml = tmp_path / "plan"
    toml.write_text(PLAN)
    binary = tmp_path / "strategy"
    binary.write_bytes(strategy_file_bytes([StrategyItem("w", (2,), (0,))]))
    assert not is_strategy_file(toml)
    assert is_strategy_file(binary)
    assert is_strategy_file(tmp_path / "x.ckpt")
    assert not is_strategy_file(tmp_path / "x.toml")
    assert load_plan_or_strategy(binary).world_size == 2
    assert load_plan_or_strategy(toml).world_size == 4


def test_import_to_toml_loads_back(tmp_path):
    from shardsmith.plan import load_plan
    from shardsmith.strategy_file import import_to_toml

    strategy = _write_items(tmp_path / "s.ckpt", [StrategyItem("a*", (2, 2), (1, 0)), StrategyItem("b", (4,), (-1,))])

    imported = import_to_toml(strategy, tmp_path / "plan.toml")

    loaded = load_plan(tmp_path / "plan.toml")
    assert loaded.rules == imported.rules
    assert (tmp_path / "plan.toml").read_text().startswith("# Imported from the MindSpore strategy file s.ckpt.")
    with pytest.raises(OutputExistsError):
        import_to_toml(strategy, tmp_path / "plan.toml")
