"""Built-in strategies and the plan file: layouts, defaults and the errors that name the rule."""

from __future__ import annotations

import pytest

from shardsmith.errors import LayoutError, PlanError
from shardsmith.plan import Plan, dumps_plan, loads_plan, resolve_full, resolve_slices
from shardsmith.strategies.mirror import OPTIMIZER_STATE_PREFIXES, parameter_of

pytestmark = pytest.mark.usefixtures("builtin_only")


def resolve(plan_text: str, shapes: dict, dtypes: dict | None = None):
    plan = loads_plan(plan_text)
    names = list(shapes)
    dtypes = dtypes or {n: "Float32" for n in names}
    return resolve_full(plan, names, dtypes, shapes)


def boxes(param_layout):
    return [", ".join(str(p.full) for p in pieces) for pieces in param_layout.layout.pieces]


def test_row_default_parts_is_world_size():
    result = resolve('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "row"\n', {"w": (8, 4)})
    assert boxes(result["w"]) == ["[0:2, 0:4]", "[2:4, 0:4]", "[4:6, 0:4]", "[6:8, 0:4]"]


def test_row_with_fewer_parts_has_adjacent_model_parallel_ranks():
    result = resolve('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "row"\nparts = 2\n', {"w": (8, 4)})
    assert boxes(result["w"]) == ["[0:4, 0:4]", "[4:8, 0:4]", "[0:4, 0:4]", "[4:8, 0:4]"]


def test_column_splits_dim_1():
    result = resolve('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "column"\n', {"w": (2, 4, 3)})
    assert boxes(result["w"]) == ["[0:2, 0:2, 0:3]", "[0:2, 2:4, 0:3]"]


def test_grid_tile_order_is_row_major_with_copies():
    result = resolve('world_size = 8\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2, 2]\n', {"w": (4, 4)})
    tiles = ["[0:2, 0:2]", "[0:2, 2:4]", "[2:4, 0:2]", "[2:4, 2:4]"]
    assert boxes(result["w"]) == tiles + tiles


def test_grid_that_does_not_fit_world_size():
    with pytest.raises(LayoutError, match=r"grid \[2, 3\] has 6 tiles, which does not divide world size 4"):
        resolve('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2, 3]\n', {"w": (6, 6)})


def test_tensor_map_strategy_matches_grid():
    plan = 'world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "tensor_map"\ndev_matrix = [2, 2]\ntensor_map = [1, 0]\n'
    grid = 'world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2, 2]\n'
    assert resolve(plan, {"w": (4, 4)})["w"].layout.pieces == resolve(grid, {"w": (4, 4)})["w"].layout.pieces


def test_tensor_map_dev_matrix_must_hold_world_size():
    plan = 'world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "tensor_map"\ndev_matrix = [2]\ntensor_map = [0, -1]\n'
    with pytest.raises(LayoutError, match=r"dev_matrix \[2\] holds 2 ranks but the world size is 4"):
        resolve(plan, {"w": (4, 4)})


def test_uneven_row_split_names_parameter_dim_and_counts():
    with pytest.raises(LayoutError) as info:
        resolve('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "row"\n', {"w": (6, 8)})
    assert info.value.param == "w"
    assert "dim 0 of size 6 does not divide into 4 parts" in str(info.value)


def test_unmatched_parameter_is_replicated_and_scalars_ignore_rules():
    result = resolve(
        'world_size = 2\n[[param]]\nmatch = "*"\nstrategy = "row"\n',
        {"w": (4, 2), "step": ()},
        {"w": "Float32", "step": "Int64"},
    )
    assert result["step"].origin == "scalar"
    assert result["step"].layout.is_replicated
    none_match = resolve('world_size = 2\n[[param]]\nmatch = "x"\nstrategy = "row"\n', {"w": (4, 2)})
    assert none_match["w"].strategy == "replicate"
    assert none_match["w"].origin == "default"


def test_glob_matches_whole_name_with_dots():
    plan = loads_plan('world_size = 2\n[[param]]\nmatch = "*weight"\nstrategy = "row"\n')
    assert plan.rule_for("moments.fc.weight") is not None
    assert plan.rule_for("fc.weight.x") is None


def test_first_matching_rule_wins():
    result = resolve(
        'world_size = 2\n[[param]]\nmatch = "fc1.*"\nstrategy = "column"\n[[param]]\nmatch = "fc*"\nstrategy = "row"\n',
        {"fc1.weight": (4, 4), "fc2.weight": (4, 4)},
    )
    assert result["fc1.weight"].strategy == "column"
    assert result["fc2.weight"].strategy == "row"


def test_optimizer_state_mirrors_its_parameter_by_default():
    result = resolve(
        'world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "column"\n',
        {"w": (4, 4), "moments.w": (4, 4), "adam_m.b": (4,), "b": (4,)},
    )
    assert result["moments.w"].origin == "mirror of 'w'"
    assert result["moments.w"].layout == result["w"].layout
    assert result["adam_m.b"].strategy == "replicate"


def test_adafactor_factored_states_follow_kept_dims():
    shapes = {"w": (4, 6), "exp_avg_sq_row_w": (4,), "exp_avg_sq_col_w": (6,), "exp_avg_sq_w": (1,), "exp_avg.w": (4, 6)}
    result = resolve('world_size = 4\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2, 2]\n', shapes)
    assert boxes(result["exp_avg_sq_row_w"]) == ["[0:2]", "[0:2]", "[2:4]", "[2:4]"]
    assert boxes(result["exp_avg_sq_col_w"]) == ["[0:3]", "[3:6]", "[0:3]", "[3:6]"]
    assert result["exp_avg_sq_w"].layout.is_replicated
    assert result["exp_avg.w"].layout == result["w"].layout


def test_mirror_state_with_wrong_shape_names_both():
    with pytest.raises(LayoutError) as info:
        resolve('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n', {"w": (4, 4), "moments.w": (4, 3)})
    assert info.value.param == "moments.w"
    assert "does not fit parameter 'w'" in str(info.value)


def test_mirror_prefixes_extend_from_plan():
    text = 'world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n[mirror]\nprefixes = ["accu_grads."]\n'
    result = resolve(text, {"w": (4, 4), "accu_grads.w": (4, 4)})
    assert result["accu_grads.w"].origin == "mirror of 'w'"


def test_resolve_slices_recovers_full_shapes():
    plan = loads_plan('world_size = 4\n[[param]]\nmatch = "g"\nstrategy = "grid"\ngrid = [2, 2]\n[[param]]\nmatch = "w"\nstrategy = "row"\nparts = 2\n')
    slices = {"g": [(1, 2)] * 4, "w": [(4, 4)] * 4, "moments.w": [(4, 4)] * 4, "b": [(3,)] * 4}
    result = resolve_slices(plan, list(slices), {n: "Float32" for n in slices}, slices)
    assert {n: r.full_shape for n, r in result.items()} == {"g": (2, 4), "w": (8, 4), "moments.w": (8, 4), "b": (3,)}


def test_resolve_slices_rejects_disagreeing_slice_shapes():
    plan = loads_plan('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    with pytest.raises(LayoutError, match=r"rank 0 holds \[2, 4\] and rank 1 holds \[3, 4\]"):
        resolve_slices(plan, ["w"], {"w": "Float32"}, {"w": [(2, 4), (3, 4)]})


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[param]]\nmatch = "w"\nstrategy = "row"\n', "missing 'world_size'"),
        ("world_size = 0\n", "'world_size' must be a positive integer"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "diagonal"\n', r"rule 1 \(match = 'w'\): unknown strategy 'diagonal' \(installed: .*row"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\nrows = 2\n', r"rule 1 \(match = 'w'\): unknown option 'rows' for strategy 'row' \(its options: parts\)"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\nparts = "2"\n', r"rule 1 \(match = 'w'\): option 'parts' of strategy 'row': expected an integer, got '2'"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "grid"\n', r"strategy 'grid' needs option 'grid'"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "grid"\ngrid = [2]\n', r"option 'grid' must be two integers"),
        ('world_size = 2\n[[param]]\nstrategy = "row"\n', r"rule 1: missing field 'match'"),
        ('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\nreplicas = "last"\n', r"field 'replicas' must be \"check\" or \"first\""),
        ("world_size = 2\nworldsize = 3\n", "unknown top-level key 'worldsize'"),
        ("world_size = 2\n[mirror]\nprefixes = 3\n", "field 'prefixes' must be a list"),
        ("world_size = [", "invalid TOML"),
    ],
)
def test_plan_errors_name_rule_and_field(text, message):
    with pytest.raises(PlanError, match=message):
        loads_plan(text)


def test_dumps_plan_round_trips():
    text = (
        'world_size = 8\n[[param]]\nmatch = "w*"\nstrategy = "grid"\ngrid = [2, 2]\nreplicas = "first"\n'
        '[[param]]\nmatch = "b"\nstrategy = "tensor_map"\ndev_matrix = [2, 4]\ntensor_map = [[1, 0]]\n'
        '[mirror]\nprefixes = ["accu_grads."]\n'
    )
    plan = loads_plan(text)
    again = loads_plan(dumps_plan(plan, ["made by a test"]))
    assert again == plan
    assert dumps_plan(plan, ["made by a test"]).startswith("# made by a test\n")


def test_parameter_of_uses_known_prefixes_and_existing_names():
    names = {"w", "fc.weight", "b"}
    assert parameter_of("moments.w", names) == "w"
    assert parameter_of("moment.w", names | {"mean_square.w"}) == "w"
    assert parameter_of("exp_avg_sq_row_fc.weight", names) == "fc.weight"
    assert parameter_of("exp_avg_sq_b", names) == "b"
    assert parameter_of("global_step", names) is None
    assert parameter_of("moments.unknown", names) is None
    assert OPTIMIZER_STATE_PREFIXES.index("moments.") < OPTIMIZER_STATE_PREFIXES.index("moment.")


def test_module_named_like_a_state_prefix_is_not_a_state():
    # An nn.Dense attribute called `linear` saves linear.weight next to a top-level `weight`.
    names = {"weight", "linear.weight", "linear.bias"}
    assert parameter_of("linear.weight", names) is None
    assert parameter_of("linear.weight", names | {"moments.weight"}) == "weight"
