"""`shardsmith plan --auto` and the inference behind it, on rank sets written by MindSpore.

Every rank set is sliced by hand here with numpy (the oracle), one case per built-in strategy,
then saved with `mindspore.save_checkpoint`. Given the full checkpoint (`--like`), the inferred
plan must be exactly the strategy the slices were cut by. Without it, the inference must decide
what slices and bytes show, and list as undecided exactly what they cannot show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import load_ms, row_blocks, save_ms, write_rank_set
from shardsmith.infer import (
    REPLICATE,
    Assignment,
    Want,
    check_rules,
    compact_rules,
    infer_layouts,
    infer_plan,
    layout_candidates,
)
from shardsmith.plan import load_plan, resolve_slices
from shardsmith.rankset import open_source

pytestmark = pytest.mark.usefixtures("builtin_only")

W = 4


def column_blocks(array: np.ndarray, parts: int, world_size: int) -> List[np.ndarray]:
    size = array.shape[1] // parts
    return [array[:, (r % parts) * size : (r % parts + 1) * size] for r in range(world_size)]


def grid_tiles(array: np.ndarray, a: int, b: int, world_size: int) -> List[np.ndarray]:
    """Rank r holds tile (i, j) with r % (a*b) = i*b + j: row-major tiles."""
    rows, cols = array.shape[0] // a, array.shape[1] // b
    tiles = []
    for r in range(world_size):
        i, j = divmod(r % (a * b), b)
        tiles.append(array[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols])
    return tiles


def column_major_tiles(array: np.ndarray, a: int, b: int) -> List[np.ndarray]:
    """Rank r holds tile (i, j) with r = j*a + i: the grid's tiles numbered down the columns."""
    rows, cols = array.shape[0] // a, array.shape[1] // b
    tiles = []
    for r in range(a * b):
        j, i = divmod(r, a)
        tiles.append(array[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols])
    return tiles


def interleaved_rows(array: np.ndarray, parts: int, world_size: int) -> List[np.ndarray]:
    """Rank r holds block r // (world_size / parts): copies on adjacent ranks, blocks outermost."""
    size = array.shape[0] // parts
    copies = world_size // parts
    return [array[(r // copies) * size : (r // copies + 1) * size] for r in range(world_size)]


def random(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# name -> (full array, per-rank slices, the rule --auto must write given the full checkpoint)
def cases() -> Dict[str, tuple]:
    full = {
        "row.weight": random((8, 6), 1),
        "row2.weight": random((8, 6), 2),
        "column.weight": random((6, 8), 3),
        "grid.weight": random((8, 12), 4),
        "colmajor.weight": random((8, 12), 5),
        "interleaved.weight": random((8, 6), 6),
        "norm.gamma": random((6,), 7),
        "bias": random((8,), 8),
    }
    return {
        "row.weight": (full["row.weight"], row_blocks(full["row.weight"], 4, W), Assignment.make("row")),
        "row2.weight": (full["row2.weight"], row_blocks(full["row2.weight"], 2, W), Assignment.make("row", {"parts": 2})),
        "column.weight": (full["column.weight"], column_blocks(full["column.weight"], 4, W), Assignment.make("column")),
        "grid.weight": (full["grid.weight"], grid_tiles(full["grid.weight"], 2, 2, W), Assignment.make("grid", {"grid": [2, 2]})),
        "colmajor.weight": (
            full["colmajor.weight"],
            column_major_tiles(full["colmajor.weight"], 2, 2),
            Assignment.make("tensor_map", {"dev_matrix": [2, 2], "tensor_map": [0, 1]}),
        ),
        "interleaved.weight": (
            full["interleaved.weight"],
            interleaved_rows(full["interleaved.weight"], 2, W),
            Assignment.make("tensor_map", {"dev_matrix": [2, 2], "tensor_map": [1, -1]}),
        ),
        "norm.gamma": (full["norm.gamma"], [full["norm.gamma"]] * W, REPLICATE),
        "bias": (full["bias"], row_blocks(full["bias"], 4, W), Assignment.make("row")),
    }


@pytest.fixture()
def network(tmp_path: Path, ms):
    """A 4-rank set with one parameter per layout, Momentum states, and the full checkpoint."""
    per_rank = [{} for _ in range(W)]
    full = {}
    for name, (array, slices, _) in cases().items():
        full[name] = array
        for rank in range(W):
            per_rank[rank][name] = slices[rank]
    # Momentum states: a random one that must follow its parameter, and a zero one whose equal
    # bytes prove nothing.
    moments = random((8, 6), 9)
    full["moments.row.weight"] = moments
    full["moments.grid.weight"] = np.zeros((8, 12), np.float32)
    for rank, block in enumerate(row_blocks(moments, 4, W)):
        per_rank[rank]["moments.row.weight"] = block
        per_rank[rank]["moments.grid.weight"] = np.zeros((4, 6), np.float32)
    # BatchNorm running statistics drift apart on data-parallel ranks; merge keeps rank 0's.
    for rank in range(W):
        per_rank[rank]["bn.moving_mean"] = random((6,), 100 + rank)
    full["bn.moving_mean"] = per_rank[0]["bn.moving_mean"]
    for rank in range(W):
        per_rank[rank]["learning_rate"] = np.array(0.01, np.float32)
        per_rank[rank]["global_step"] = np.array([5], np.int32)
    full["learning_rate"] = np.array(0.01, np.float32)
    full["global_step"] = np.array([5], np.int32)
    root = write_rank_set(tmp_path / "ranks", per_rank)
    reference = save_ms(tmp_path / "full.ckpt", full)
    return root, reference, full


def test_like_infers_every_builtin(network):
    root, reference, _ = network
    with open_source([root]) as source:
        result = infer_plan(source, reference)
    inferences = result.inferences
    assert result.undecided == []
    assert result.problems == {}
    for name, (_, _, expected) in cases().items():
        assert inferences[name].assignment == expected, (name, inferences[name].reason)
    assert inferences["moments.row.weight"].summary == "mirror of 'row.weight'"
    assert inferences["moments.row.weight"].assignment is None
    assert inferences["moments.grid.weight"].summary == "mirror of 'grid.weight'"
    assert inferences["learning_rate"].summary == "replicate"
    assert inferences["bn.moving_mean"].assignment == Assignment("replicate", (), "first")


def test_like_certainty(network):
    root, reference, _ = network
    with open_source([root]) as source:
        inferences = infer_layouts(source, reference)
    for name in ("row.weight", "column.weight", "bias", "norm.gamma", "interleaved.weight", "colmajor.weight"):
        assert inferences[name].certain, (name, inferences[name].reason)
    # Copies on ranks 0,2 and 1,3 decide row(parts=2) over the interleaved order.
    assert inferences["row2.weight"].certain
    assert "copies on ranks 0,2 | 1,3" in inferences["row2.weight"].reason
    # Row-major and column-major tiles have the same shapes and copies; the reference's values decide.
    assert "the reference's values match" in inferences["grid.weight"].reason
    assert inferences["grid.weight"].certain


def test_like_plan_is_compact_and_resolves(network, tmp_path):
    root, reference, full = network
    with open_source([root]) as source:
        result = infer_plan(source, reference)
        names = list(source.names)
        dtypes = {n: source.info(n).dtype for n in names}
        shapes = {n: source.slice_shapes(n) for n in names}
    matches = [rule.match for rule in result.plan.rules]
    # States follow their parameters by default, and replicated parameters need no rule.
    assert not any(m.startswith("moments.") for m in matches)
    assert "norm.gamma" not in matches
    resolved = resolve_slices(result.plan, names, dtypes, shapes)
    for name, array in full.items():
        assert resolved[name].full_shape == array.shape, name


def test_auto_plan_merges_bit_exactly(network, tmp_path, cli):
    root, reference, full = network
    plan = tmp_path / "plan.toml"
    result = cli("plan", root, "--auto", "--like", reference, "-o", plan)
    assert result.exit_code == 0, result.output
    assert plan.exists()
    text = plan.read_text()
    assert text.startswith("# Inferred by shardsmith")
    assert f"# full shapes from: {reference}" in text
    out = tmp_path / "merged.ckpt"
    merged = cli("merge", root, "--plan", plan, "-o", out)
    assert merged.exit_code == 0, merged.output
    loaded = load_ms(out)
    assert list(loaded) == list(full)
    for name, array in full.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].tobytes() == array.tobytes(), name


def test_without_like_lists_what_it_cannot_tell(network):
    root, _, _ = network
    with open_source([root]) as source:
        result = infer_plan(source)
    inferences = result.inferences
    # 2-D slices whose ranks hold different bytes: split, but along which dim only full shapes show.
    two_d_splits = ["row.weight", "row2.weight", "column.weight", "grid.weight", "colmajor.weight", "interleaved.weight"]
    # A state cannot follow an undecided parameter, and the zero state's equal bytes prove nothing.
    assert result.undecided == two_d_splits + ["moments.row.weight"]
    assert inferences["moments.grid.weight"].summary == "replicate"
    assert not inferences["moments.grid.weight"].certain
    assert "one repeated value" in inferences["moments.grid.weight"].reason
    # A 1-D slice can only be split along dim 0, but unsynchronized copies look the same.
    assert inferences["bias"].assignment == Assignment.make("row")
    assert not inferences["bias"].certain
    assert "unsynchronized copies" in inferences["bias"].reason
    assert inferences["bn.moving_mean"].assignment == Assignment("replicate", (), "first")
    assert "BatchNorm" in inferences["bn.moving_mean"].reason
    # Equal bytes everywhere mean replicated.
    assert inferences["norm.gamma"].assignment == REPLICATE
    assert inferences["norm.gamma"].certain
    assert inferences["global_step"].assignment == REPLICATE
    # What is undecided says why and what would decide it.
    reason = inferences["row.weight"].reason
    assert "split in 4 parts" in reason
    assert "row -> [8, 6]" in reason
    assert "column -> [2, 24]" in reason
    assert "grid(grid=[2, 2]) -> [4, 12]" in reason
    assert "--like" in reason
    assert "copies on ranks 0,2 | 1,3" in inferences["row2.weight"].reason
    assert "copies on ranks 0,1 | 2,3" in inferences["interleaved.weight"].reason


def test_without_bytes_everything_equal_shaped_is_undecided(network):
    root, _, _ = network
    with open_source([root]) as source:
        inferences = infer_layouts(source, check_bytes=False)
    assert not inferences["norm.gamma"].decided
    assert "cannot tell" in inferences["norm.gamma"].reason
    assert inferences["learning_rate"].decided


def test_cli_auto_undecided_fails_and_writes_nothing(network, tmp_path, cli):
    root, _, _ = network
    plan = tmp_path / "plan.toml"
    result = cli("plan", root, "--auto", "-o", plan)
    assert result.exit_code == 1
    assert not plan.exists()
    assert "cannot decide the layout of row.weight" in result.stderr
    assert "No plan was written" in result.stderr
    assert "undecided" in result.stdout


def test_cli_auto_replicate_undecided(network, tmp_path, cli):
    root, _, _ = network
    plan = tmp_path / "plan.toml"
    result = cli("plan", root, "--auto", "--replicate-undecided", "-o", plan)
    assert result.exit_code == 0, result.output
    loaded = load_plan(plan)
    assert [rule.match for rule in loaded.rules] == ["bias", "bn.moving_mean"]
    assert "# undecided, left replicated: row.weight, row2.weight" in plan.read_text()
    assert "7 undecided" in result.stderr


def test_cli_auto_json(network, tmp_path, cli):
    root, reference, _ = network
    result = cli("plan", root, "--auto", "--like", reference, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["world_size"] == W
    assert data["undecided"] == []
    assert data["output"] is None
    by_name = {p["name"]: p for p in data["params"]}
    assert by_name["grid.weight"]["inferred"] == "grid(grid=[2, 2])"
    assert by_name["grid.weight"]["rule"] == {"strategy": "grid", "grid": [2, 2]}
    assert by_name["grid.weight"]["full_shape"] == [8, 12]
    assert by_name["grid.weight"]["slice_shape"] == [4, 6]
    assert by_name["moments.row.weight"]["follows"] == "row.weight"
    assert by_name["moments.row.weight"]["rule"] is None
    assert 'strategy = "grid"' in data["plan"]
    assert "No -o PLAN given" in result.stderr


def test_cli_auto_existing_output_needs_force(network, tmp_path, cli):
    root, reference, _ = network
    plan = tmp_path / "plan.toml"
    plan.write_text("keep")
    result = cli("plan", root, "--auto", "--like", reference, "-o", plan)
    assert result.exit_code != 0
    assert plan.read_text() == "keep"
    assert "exists" in result.stderr
    forced = cli("plan", root, "--auto", "--like", reference, "-o", plan, "--force")
    assert forced.exit_code == 0, forced.output
    assert load_plan(plan).world_size == W


def test_cli_auto_on_full_checkpoint_is_rejected(network, cli):
    _, reference, _ = network
    result = cli("plan", reference, "--auto")
    assert result.exit_code != 0
    assert "--auto infers the layout of a rank set" in result.stderr


def test_like_must_be_one_checkpoint(network, cli):
    root, _, _ = network
    result = cli("plan", root, "--auto", "--like", root)
    assert result.exit_code != 0
    assert "--like needs one full checkpoint" in result.stderr


# -- candidates and compaction, without files --------------------------------------------------


def test_candidates_order_builtin_first():
    summaries = [c.summary for c in layout_candidates((8, 12), (4, 6), 8, "w")]
    assert summaries[0] == "grid(grid=[2, 2])"
    assert all(s.startswith("tensor_map") for s in summaries[1:])
    assert len(summaries) == 6  # the 3! orders of (copies, dim 0, dim 1)


def test_candidates_reject_shapes_that_do_not_fit():
    assert layout_candidates((8, 6), (3, 6), 4, "w") == []  # 8 is no multiple of 3
    assert layout_candidates((24, 6), (8, 6), 4, "w") == []  # 3 parts do not divide 4 ranks
    assert layout_candidates((8, 6), (8, 6, 1), 4, "w") == []


def _wants(**needs):
    return {name: (None if want == "scalar" else want) for name, want in needs.items()}


def test_compact_uses_numeric_globs():
    parts = ("wq.weight", "wo.weight", "w1.weight", "w2.weight", "norm")
    names = [f"layers.{i}.{p}" for i in range(12) for p in parts]
    row, column = Assignment.make("row"), Assignment.make("column")
    wants = {}
    for name in names:
        if name.endswith(("wq.weight", "w1.weight")):
            wants[name] = Want(row, False)
        elif name.endswith(("wo.weight", "w2.weight")):
            wants[name] = Want(column, False)
        else:
            wants[name] = Want(None, True)
    # One norm of one layer is split too: no glob may reach the other norms.
    wants["layers.3.norm"] = Want(row, False)
    rules = compact_rules(names, wants)
    assert [(r.match, r.strategy) for r in rules] == [
        ("layers.*.wq.weight", "row"),
        ("layers.*.wo.weight", "column"),
        ("layers.*.w1.weight", "row"),
        ("layers.*.w2.weight", "column"),
        ("layers.3.norm", "row"),
    ]
    assert check_rules(names, wants, rules) == []


def test_compact_glob_never_catches_another_group():
    names = ["fc1.weight", "fc2.weight", "fc3.weight", "moments.fc1.weight"]
    row = Assignment.make("row")
    wants = {
        "fc1.weight": Want(row, False),
        "fc2.weight": Want(row, False),
        "fc3.weight": Want(Assignment.make("column"), False),
        "moments.fc1.weight": Want(None, True),
    }
    rules = compact_rules(names, wants)
    assert check_rules(names, wants, rules) == []
    assert [r.match for r in rules] == ["fc1.weight", "fc2.weight", "fc3.weight"]


def test_compact_prefers_given_glob_and_escapes_names():
    names = ["a[0].w", "a[1].w", "b*"]
    row = Assignment.make("row")
    wants = {"a[0].w": Want(row, False), "a[1].w": Want(row, False), "b*": Want(REPLICATE, True)}
    rules = compact_rules(names, wants, candidates=["a*"])
    assert [r.match for r in rules] == ["a*"]
    wants["b*"] = Want(Assignment.make("column"), False)
    rules = compact_rules(names, wants)
    assert "b[*]" in [r.match for r in rules]
    assert check_rules(names, wants, rules) == []


def test_compact_leaves_scalars_alone():
    names = ["w.0", "w.1", "w.step"]
    row = Assignment.make("row")
    wants = {"w.0": Want(row, False), "w.1": Want(row, False), "w.step": None}
    rules = compact_rules(names, wants)
    assert [r.match for r in rules] == ["w.*"]


def test_auto_recovers_example_plan(tmp_path, ms):
    """The hybrid-parallel example's 4-rank layout, sliced by its own hand-written `slice_of` with
    Adam states: --auto --like must infer exactly the layouts of its plan_4.toml."""
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "hybrid_parallel"
    sys.path.insert(0, str(example))
    try:
        import model as example_model
    finally:
        sys.path.remove(str(example))
    layout = example_model.LAYOUTS[4]
    full = dict(example_model.initial_weights())
    for seed, name in enumerate(list(full)):
        full[f"moment1.{name}"] = random(full[name].shape, 200 + seed)
        full[f"moment2.{name}"] = np.abs(random(full[name].shape, 300 + seed))
    per_rank = [
        {name: example_model.slice_of(name.split(".", 1)[1] if name.startswith("moment") else name, array, layout, rank)
         for name, array in full.items()}
        for rank in range(W)
    ]
    for rank in range(W):
        per_rank[rank]["global_step"] = np.array([5], np.int32)
        per_rank[rank]["learning_rate"] = np.array(0.01, np.float32)
    root = write_rank_set(tmp_path / "ranks", per_rank)
    reference = save_ms(tmp_path / "full.ckpt", full)

    with open_source([root]) as source:
        result = infer_plan(source, reference)
        names = list(source.names)
        dtypes = {n: source.info(n).dtype for n in names}
        shapes = {n: source.slice_shapes(n) for n in names}
    assert result.undecided == []
    expected = load_plan(example / "plan_4.toml")
    inferred = resolve_slices(result.plan, names, dtypes, shapes)
    wanted = resolve_slices(expected, names, dtypes, shapes)
    for name in names:
        assert inferred[name].layout.pieces == wanted[name].layout.pieces, name
        assert inferred[name].full_shape == wanted[name].full_shape, name
    assert result.inferences["fc3.bias"].assignment == Assignment.make(
        "tensor_map", {"dev_matrix": [2, 2], "tensor_map": [1]}
    )
    assert result.inferences["moment1.fc3.weight"].summary == "mirror of 'fc3.weight'"
    assert [rule.match for rule in result.plan.rules] == ["fc1.*", "fc2.weight", "fc3.weight", "fc3.bias"]
