"""The `fused_qkv` layout, resolved through a real plan and moved with numpy by its pieces.

The field case: 2 heads of size 2 and hidden size 2, so the full weight is [12, 2] in
[Q; K; V] order and each of 2 ranks holds [6, 2], its head's rows of Q, K and V. The arrays are
moved here by the same rule the engine follows (every piece of a slice is one box of the full
tensor; uncovered slice rows are zeros), so these tests pin the layout, not the engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from shardsmith.errors import LayoutError, PlanError
from shardsmith.plan import loads_plan, resolve_full, resolve_slices
from shardsmith.plugins import load_registry
from shardsmith_fused_qkv import register_strategies

WEIGHT = "attn.qkv.weight"
BIAS = "attn.qkv.bias"


@pytest.fixture
def registry():
    """The built-ins plus this plugin, registered through its own hook and without entry points."""
    registry = load_registry(entry_points=False)
    register_strategies(register=lambda cls: registry.add(cls, "shardsmith-fused-qkv (test)"))
    return registry


def plan(registry, world_size, options="heads = 2"):
    text = f"""
world_size = {world_size}

[[param]]
match = "attn.qkv.*"
strategy = "fused_qkv"
{options}
"""
    return loads_plan(text, registry=registry)


def checkpoint(weight_rows=12, hidden=2):
    """A full checkpoint: the fused weight and bias, their AdamWeightDecay states and two scalars."""
    weight = np.arange(weight_rows * hidden, dtype=np.float32).reshape(weight_rows, hidden)
    bias = np.arange(weight_rows, dtype=np.float32) + 100
    tensors = {
        WEIGHT: weight,
        BIAS: bias,
        "adam_m." + WEIGHT: weight + 1000,
        "adam_v." + WEIGHT: weight + 2000,
        "adam_m." + BIAS: bias + 1000,
        "adam_v." + BIAS: bias + 2000,
        "global_step": np.array([7], dtype=np.int32),
        "learning_rate": np.array(0.01, dtype=np.float32),
    }
    return tensors


def split_by_layout(full, layout):
    slices = []
    for shape, pieces in zip(layout.slice_shapes, layout.pieces):
        part = np.zeros(shape, full.dtype)
        for piece in pieces:
            part[piece.local.slices()] = full[piece.full.slices()]
        slices.append(part)
    return slices


def merge_by_layout(slices, layout):
    full = np.empty(layout.full_shape, slices[0].dtype)
    for rank, piece in layout.main_pieces():
        full[piece.full.slices()] = slices[rank][piece.local.slices()]
    return full


def reshard_by_layouts(slices, source, target):
    result = []
    for rank in range(target.world_size):
        part = np.zeros(target.slice_shapes[rank], slices[0].dtype)
        for copy in source.copies_into(target, rank):
            part[copy.target.slices()] = slices[copy.source_rank][copy.source.slices()]
        result.append(part)
    return result


def resolve_checkpoint(the_plan, tensors, registry):
    names = list(tensors)
    dtypes = {n: "Float32" for n in names}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    return resolve_full(the_plan, names, dtypes, shapes, registry=registry)


def split_checkpoint(the_plan, tensors, registry):
    layouts = resolve_checkpoint(the_plan, tensors, registry)
    ranks = [{} for _ in range(the_plan.world_size)]
    for name, tensor in tensors.items():
        for rank, part in enumerate(split_by_layout(tensor, layouts[name].layout)):
            ranks[rank][name] = part
    return ranks


def merge_checkpoint(the_plan, ranks, registry):
    names = list(ranks[0])
    dtypes = {n: "Float32" for n in names}
    slice_shapes = {n: [tuple(r[n].shape) for r in ranks] for n in names}
    layouts = resolve_slices(the_plan, names, dtypes, slice_shapes, registry=registry)
    return {n: merge_by_layout([r[n] for r in ranks], layouts[n].layout) for n in names}


def test_split_gives_each_rank_its_heads(registry):
    ranks = split_checkpoint(plan(registry, 2), checkpoint(), registry)

    # Q is rows 0-3, K rows 4-7, V rows 8-11; head h owns rows 2h and 2h+1 of each.
    expected_rows = {0: [0, 1, 4, 5, 8, 9], 1: [2, 3, 6, 7, 10, 11]}
    weight = checkpoint()[WEIGHT]
    for rank, rows in expected_rows.items():
        assert ranks[rank][WEIGHT].shape == (6, 2)
        np.testing.assert_array_equal(ranks[rank][WEIGHT], weight[rows])
        np.testing.assert_array_equal(ranks[rank][BIAS], np.array(rows, dtype=np.float32) + 100)


def test_rank_zero_weight_values(registry):
    ranks = split_checkpoint(plan(registry, 2), checkpoint(), registry)

    np.testing.assert_array_equal(
        ranks[0][WEIGHT], np.array([[0, 1], [2, 3], [8, 9], [10, 11], [16, 17], [18, 19]], dtype=np.float32)
    )


def test_merge_restores_canonical_order(registry):
    tensors = checkpoint()
    ranks = split_checkpoint(plan(registry, 2), tensors, registry)

    merged = merge_checkpoint(plan(registry, 2), ranks, registry)

    assert list(merged) == list(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(merged[name], tensor, err_msg=name)


def test_split_again_reproduces_rank_bytes(registry):
    ranks = split_checkpoint(plan(registry, 2), checkpoint(), registry)
    merged = merge_checkpoint(plan(registry, 2), ranks, registry)

    again = split_checkpoint(plan(registry, 2), merged, registry)

    for rank in range(2):
        for name in ranks[rank]:
            assert again[rank][name].tobytes() == ranks[rank][name].tobytes(), (rank, name)


def test_optimizer_states_follow_weight(registry):
    layouts = resolve_checkpoint(plan(registry, 2), checkpoint(), registry)

    for parameter in (WEIGHT, BIAS):
        for prefix in ("adam_m.", "adam_v."):
            state = layouts[prefix + parameter]
            assert state.strategy == "mirror"
            assert state.layout.pieces == layouts[parameter].layout.pieces
            assert state.layout.slice_shapes == layouts[parameter].layout.slice_shapes


def test_adafactor_states_follow_weight(registry):
    # AdaFactor's factored second moment of a [12, 2] weight: one entry per row, one per column,
    # and a (1,) placeholder. The plan's glob does not match them, so `mirror` lays them out.
    weight = checkpoint()[WEIGHT]
    tensors = {
        WEIGHT: weight,
        "exp_avg_sq_row_" + WEIGHT: np.arange(12, dtype=np.float32),
        "exp_avg_sq_col_" + WEIGHT: np.arange(2, dtype=np.float32),
        "exp_avg_sq_" + WEIGHT: np.zeros(1, dtype=np.float32),
    }

    ranks = split_checkpoint(plan(registry, 2), tensors, registry)
    merged = merge_checkpoint(plan(registry, 2), ranks, registry)

    np.testing.assert_array_equal(ranks[1]["exp_avg_sq_row_" + WEIGHT], np.array([2, 3, 6, 7, 10, 11], dtype=np.float32))
    np.testing.assert_array_equal(ranks[1]["exp_avg_sq_col_" + WEIGHT], tensors["exp_avg_sq_col_" + WEIGHT])
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(merged[name], tensor, err_msg=name)


def test_split_to_four_ranks_names_parameter(registry):
    with pytest.raises(LayoutError) as info:
        resolve_checkpoint(plan(registry, 4), checkpoint(), registry)

    assert info.value.param == WEIGHT
    assert "2 heads not divisible by 4 ranks" in str(info.value)
    assert f"parameter '{WEIGHT}'" in str(info.value)


def test_merge_from_four_ranks_fails(registry):
    names = [WEIGHT]
    with pytest.raises(LayoutError, match="2 heads not divisible by 4 ranks"):
        resolve_slices(plan(registry, 4), names, {WEIGHT: "Float32"}, {WEIGHT: [(3, 2)] * 4}, registry=registry)


def test_parts_smaller_than_world_size(registry):
    the_plan = plan(registry, 4, "heads = 2\nparts = 2")
    ranks = split_checkpoint(the_plan, checkpoint(), registry)

    # Ranks 0 and 1 are the model-parallel pair; ranks 2 and 3 hold copies of them.
    for rank in range(4):
        np.testing.assert_array_equal(ranks[rank][WEIGHT], ranks[rank % 2][WEIGHT])
    layout = resolve_checkpoint(the_plan, checkpoint(), registry)[WEIGHT].layout
    assert layout.replica_groups() == [[0, 2], [1, 3]]


def test_parts_error_mentions_world_size(registry):
    with pytest.raises(LayoutError, match=r"2 heads not divisible by 4 ranks \(parts = 4 of world size 8\)"):
        resolve_checkpoint(plan(registry, 8, "heads = 2\nparts = 4"), checkpoint(), registry)


def test_grouped_query_attention_pieces(registry):
    # 4 query heads and 2 KV groups of size 3: Q is rows 0-11, K rows 12-17, V rows 18-23.
    the_plan = plan(registry, 2, "query_heads = 4\nkv_groups = 2")
    tensors = {WEIGHT: np.arange(48, dtype=np.float32).reshape(24, 2)}
    layout = resolve_checkpoint(the_plan, tensors, registry)[WEIGHT].layout

    assert layout.slice_shapes == ((12, 2), (12, 2))
    rank_one_rows = [[p.full.start[0], p.full.stop[0]] for p in layout.pieces[1]]
    assert rank_one_rows == [[6, 12], [15, 18], [21, 24]]
    rank_one_local = [[p.local.start[0], p.local.stop[0]] for p in layout.pieces[1]]
    assert rank_one_local == [[0, 6], [6, 9], [9, 12]]


def test_grouped_query_round_trip(registry):
    the_plan = plan(registry, 2, "query_heads = 4\nkv_groups = 2")
    tensors = {WEIGHT: np.arange(48, dtype=np.float32).reshape(24, 2), BIAS: np.arange(24, dtype=np.float32)}

    merged = merge_checkpoint(the_plan, split_checkpoint(the_plan, tensors, registry), registry)

    for name, tensor in tensors.items():
        np.testing.assert_array_equal(merged[name], tensor)


def test_grouped_query_groups_not_divisible(registry):
    tensors = {WEIGHT: np.zeros((32, 2), dtype=np.float32)}
    with pytest.raises(LayoutError, match="2 KV groups not divisible by 4 ranks"):
        resolve_checkpoint(plan(registry, 4, "query_heads = 4\nkv_groups = 2"), tensors, registry)


def test_reshard_two_to_four_ranks(registry):
    tensors = {WEIGHT: np.arange(48, dtype=np.float32).reshape(24, 2)}
    source_plan = plan(registry, 2, "heads = 4")
    target_plan = plan(registry, 4, "heads = 4")
    source = resolve_checkpoint(source_plan, tensors, registry)[WEIGHT].layout
    target = resolve_checkpoint(target_plan, tensors, registry)[WEIGHT].layout

    resharded = reshard_by_layouts(split_by_layout(tensors[WEIGHT], source), source, target)

    direct = split_by_layout(tensors[WEIGHT], target)
    for rank in range(4):
        np.testing.assert_array_equal(resharded[rank], direct[rank])


def test_reshard_to_row_plan(registry):
    tensors = {WEIGHT: np.arange(24, dtype=np.float32).reshape(12, 2)}
    source = resolve_checkpoint(plan(registry, 2), tensors, registry)[WEIGHT].layout
    row_plan = loads_plan('world_size = 2\n[[param]]\nmatch = "*"\nstrategy = "row"\n', registry=registry)
    target = resolve_checkpoint(row_plan, tensors, registry)[WEIGHT].layout

    resharded = reshard_by_layouts(split_by_layout(tensors[WEIGHT], source), source, target)

    np.testing.assert_array_equal(resharded[0], tensors[WEIGHT][:6])
    np.testing.assert_array_equal(resharded[1], tensors[WEIGHT][6:])


def test_rows_not_multiple_of_heads(registry):
    tensors = {WEIGHT: np.zeros((14, 2), dtype=np.float32)}
    with pytest.raises(LayoutError, match=r"dim 0 of size 14 is not a multiple of the 6 heads of Q, K and V \(2 \+ 2 \+ 2\)"):
        resolve_checkpoint(plan(registry, 2), tensors, registry)


def test_unequal_slices_rejected(registry):
    with pytest.raises(LayoutError, match=r"rank 0 holds \[6, 2\] and rank 1 holds \[4, 2\]"):
        resolve_slices(plan(registry, 2), [WEIGHT], {WEIGHT: "Float32"}, {WEIGHT: [(6, 2), (4, 2)]}, registry=registry)


@pytest.mark.parametrize(
    "options, message",
    [
        ("", "needs option 'heads' (multi-head attention) or both 'query_heads' and 'kv_groups'"),
        ("query_heads = 4", "needs option 'heads'"),
        ("heads = 2\nkv_groups = 1", "takes either 'heads' or 'query_heads' with 'kv_groups', not both"),
        ("query_heads = 4\nkv_groups = 3", "query_heads 4 is not a multiple of kv_groups 3"),
        ("heads = 0", "option 'heads' of strategy 'fused_qkv': expected values of at least 1"),
        ("heads = 2\nhead_dim = 2", "unknown option 'head_dim' for strategy 'fused_qkv'"),
    ],
)
def test_invalid_options_name_rule(registry, options, message):
    with pytest.raises(PlanError) as info:
        plan(registry, 2, options)

    assert "rule 1 (match = 'attn.qkv.*')" in str(info.value)
    assert message in str(info.value)
