"""Validation before anything is written: the field cases that lose or corrupt checkpoints.

Each case builds its rank set with mindspore.save_checkpoint, runs the command line, and checks
both the message (what failed, on which parameter, rank and file) and that no output appeared.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from reliability_support import bfloat16_words, listing, load, rank_file, save, save_rank_set, write_plan
from shardsmith.cli import app

pytest.importorskip("mindspore")

runner = CliRunner()

ROW_W = '[[param]]\nmatch = "w"\nstrategy = "row"\n'


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_failed_cleanly(result, out_dir, *needles):
    """Exit 1, one message on stderr with every needle, no traceback, nothing new in `out_dir`."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ")
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert not [p for p in listing(out_dir) if p.startswith("out") or p.startswith(".out")]


# -- replicas and scalars ---------------------------------------------------------------------


def test_replicated_copy_differs_is_named(tmp_path):
    ln = np.ones(4, np.float32)
    src = save_rank_set(tmp_path / "src", [[("ln.weight", "Float32", ln)], [("ln.weight", "Float32", ln + np.float32([0, 1e-3, 0, 0]))]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'ln.weight'", "rank 0", "rank 1", "largest difference 0.001")


def test_replicated_large_copy_differs_names_box(tmp_path):
    norm = np.arange(64, dtype=np.float32)
    other = norm.copy()
    other[40] += 0.25
    src = save_rank_set(tmp_path / "src", [[("norm.weight", "Float32", norm)], [("norm.weight", "Float32", other)]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'norm.weight'", "rank 0 and rank 1", "largest difference 0.25 at index [40]")


def test_replicas_first_warns_and_keeps_rank_0(tmp_path):
    ln = np.ones(4, np.float32)
    src = save_rank_set(tmp_path / "src", [[("ln.weight", "Float32", ln)], [("ln.weight", "Float32", ln * 2)]])
    plan = write_plan(tmp_path / "plan.toml", 2)
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q", "--replicas", "first")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr
    assert "'ln.weight'" in result.stderr
    assert load(tmp_path / "out.ckpt")["ln.weight"][2] == ln.tobytes()


def test_plan_replicas_first_applies_to_its_rule(tmp_path):
    stat = np.arange(32, dtype=np.float32)
    src = save_rank_set(tmp_path / "src", [[("bn.moving_mean", "Float32", stat)], [("bn.moving_mean", "Float32", stat + 1)]])
    plan = write_plan(tmp_path / "plan.toml", 2, '[[param]]\nmatch = "bn.*"\nstrategy = "replicate"\nreplicas = "first"\n')
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr
    assert "bn.moving_mean" in result.stderr
    assert load(tmp_path / "out.ckpt")["bn.moving_mean"][2] == stat.tobytes()


def test_nan_copies_with_equal_bits_pass(tmp_path):
    values = np.array([np.nan, -0.0, np.inf, 1.0], np.float32)
    src = save_rank_set(tmp_path / "src", [[("v", "Float32", values)], [("v", "Float32", values.copy())]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "out.ckpt")["v"][2] == values.tobytes()


def test_signed_zero_copies_differ(tmp_path):
    # Strict means bytes: -0.0 and 0.0 compare equal as numbers but are not the same checkpoint.
    src = save_rank_set(tmp_path / "src", [[("v", "Float32", np.zeros(4, np.float32))], [("v", "Float32", -np.zeros(4, np.float32))]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'v'", "largest difference 0")


def test_global_step_equal_written_once(tmp_path):
    step = [("global_step", "Int32", np.array([1000], np.int32))]
    src = save_rank_set(tmp_path / "src", [step, step])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "out.ckpt") == {"global_step": ("Int32", (1,), np.int32(1000).tobytes())}


def test_global_step_differs_lists_values(tmp_path):
    src = save_rank_set(
        tmp_path / "src",
        [[("global_step", "Int32", np.array([1000], np.int32))], [("global_step", "Int32", np.array([999], np.int32))]],
    )
    plan = write_plan(tmp_path / "plan.toml", 2)
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'global_step'", "rank 0: [1000]", "rank 1: [999]")

    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q", "--replicas", "first")
    assert result.exit_code == 0, result.output
    assert "rank 0: [1000], rank 1: [999]" in result.stderr
    assert load(tmp_path / "out.ckpt")["global_step"][2] == np.int32(1000).tobytes()


def test_string_entries_differ_lists_values(tmp_path):
    w = [("w", "Float32", np.zeros(2, np.float32))]
    save(tmp_path / "src" / "rank_0" / "a.ckpt", w, append={"note": "run-a"})
    save(tmp_path / "src" / "rank_1" / "b.ckpt", w, append={"note": "run-b"})
    result = invoke("merge", tmp_path / "src", "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'note'", "rank 0: 'run-a'", "rank 1: 'run-b'")


# -- ranks and files --------------------------------------------------------------------------


def test_missing_ranks_listed_never_short_output(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[0:2]), ("b", "Float32", np.ones(4, np.float32))],
                                           [("w", "Float32", w[2:4]), ("b", "Float32", np.ones(4, np.float32))]])
    plan = write_plan(tmp_path / "plan.toml", 4, ROW_W)
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "missing ranks 2, 3", "rank 2 would hold w", "rank 3 would hold w", str(plan))
    # b is replicated, so ranks 0 and 1 already hold all of it.
    assert "hold w, b" not in result.stderr
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q", "--dry-run")
    assert result.exit_code == 1


def test_missing_ranks_of_huge_plan_fail_fast(tmp_path):
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", np.zeros((2, 4), np.float32))]] * 2)
    plan = write_plan(tmp_path / "plan.toml", 2**20, ROW_W)
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "world_size 1048576", "missing ranks 2, 3,", "1048575 (1048574 ranks)")
    plan = write_plan(tmp_path / "plan.toml", 10**12, ROW_W)
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, str(plan), "'world_size' 1000000000000 is larger than 1048576")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_rank_file_named(tmp_path, damage):
    w = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[8 * r : 8 * r + 8])] for r in range(4)])
    bad = rank_file(src, 2)
    bad.write_bytes(b"" if damage == "empty" else bad.read_bytes()[:100])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 4, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "rank 2", str(bad), damage)
    assert not (tmp_path / "out.ckpt.manifest.json").exists()


def test_param_missing_on_one_rank(tmp_path):
    w = np.zeros((4, 4), np.float32)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[:2]), ("b", "Float32", w[0])], [("w", "Float32", w[2:])]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'b'", "missing from rank 1")


def test_dtype_differs_across_ranks(tmp_path):
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", np.zeros((2, 4), np.float32))], [("w", "Float16", np.zeros((2, 4), np.float16))]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'w'", "Float32", "rank 1 as Float16")


def test_slice_shape_contradicts_layout(tmp_path):
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", np.zeros((2, 4), np.float32))], [("w", "Float32", np.zeros((3, 4), np.float32))]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'w'", "rank 0 holds [2, 4]", "rank 1 holds [3, 4]")


@pytest.mark.parametrize("state_shape", [(4, 3), (3, 4), (4,)])
def test_optimizer_state_shape_mismatch_names_both(tmp_path, state_shape):
    w = np.zeros((8, 4), np.float32)
    state = np.zeros(state_shape, np.float32)
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", w[:4]), ("moments.w", "Float32", state)], [("w", "Float32", w[4:]), ("moments.w", "Float32", state)]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'moments.w'", "'w'", str(list(state_shape)))


def test_optimizer_state_shape_mismatch_on_split(tmp_path):
    full = save(tmp_path / "full.ckpt", [("w", "Float32", np.zeros((8, 4), np.float32)), ("moments.w", "Float32", np.zeros((6, 4), np.float32))])
    result = invoke("split", full, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out", "-q")
    assert_failed_cleanly(result, tmp_path, "'moments.w'", "parameter 'w'", "[6, 4]", "[8, 4]")


def test_uneven_split_names_dim_and_parts(tmp_path):
    full = save(tmp_path / "full.ckpt", [("w", "Float32", np.zeros((6, 8), np.float32))])
    result = invoke("split", full, "--plan", write_plan(tmp_path / "plan.toml", 4, ROW_W), "-o", tmp_path / "out", "-q")
    assert_failed_cleanly(result, tmp_path, "'w'", "dim 0", "6", "4 parts")


def test_dry_run_validates_and_writes_nothing(tmp_path):
    ln = np.ones(4, np.float32)
    src = save_rank_set(tmp_path / "src", [[("ln.weight", "Float32", ln)], [("ln.weight", "Float32", ln + 1)]])
    before = listing(tmp_path)
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2), "-o", tmp_path / "out.ckpt", "--dry-run", "-q")
    assert_failed_cleanly(result, tmp_path, "'ln.weight'", "largest difference")
    good = save_rank_set(tmp_path / "good", [[("ln.weight", "Float32", ln)]] * 2)
    before = listing(tmp_path)
    result = invoke("merge", good, "--plan", tmp_path / "plan.toml", "-o", tmp_path / "out.ckpt", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["files"] == [{"path": "out.ckpt", "tensor_bytes": 16}]
    assert listing(tmp_path) == before


# -- core cases: what a merge or split must produce --------------------------------------------


def test_replicated_never_concatenated(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    norm = np.arange(4, dtype=np.float32)
    ranks = [[("s", "Float32", np.array([3.0], np.float32)), ("norm.weight", "Float32", norm), ("w", "Float32", w[r : r + 1])] for r in range(8)]
    src = save_rank_set(tmp_path / "src", ranks)
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 8, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 0, result.output
    merged = load(tmp_path / "out.ckpt")
    assert list(merged) == ["s", "norm.weight", "w"]
    assert merged["s"] == ("Float32", (1,), np.float32([3.0]).tobytes())
    assert merged["norm.weight"] == ("Float32", (4,), norm.tobytes())
    assert merged["w"] == ("Float32", (8, 4), w.tobytes())


def test_optimizer_states_follow_their_parameter(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    b = np.arange(4, dtype=np.float32)
    entries = [("w", "Float32", w), ("moments.w", "Float32", w * 2), ("b", "Float32", b), ("adam_m.b", "Float32", b + 1), ("adam_v.b", "Float32", b + 2)]
    full = save(tmp_path / "full.ckpt", entries)
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    result = invoke("split", full, "--plan", plan, "-o", tmp_path / "split", "-q")
    assert result.exit_code == 0, result.output
    for rank in range(2):
        got = load(rank_file(tmp_path / "split", rank))
        assert list(got) == ["w", "moments.w", "b", "adam_m.b", "adam_v.b"]
        assert got["w"][2] == w[4 * rank : 4 * rank + 4].tobytes()
        assert got["moments.w"][2] == (w * 2)[4 * rank : 4 * rank + 4].tobytes()
        assert got["adam_v.b"] == ("Float32", (4,), (b + 2).tobytes())
    result = invoke("merge", tmp_path / "split", "--plan", plan, "-o", tmp_path / "merged.ckpt", "-q")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "merged.ckpt") == load(full)


def test_dtypes_survive_merge_and_split(tmp_path):
    w = bfloat16_words(np.arange(16, dtype=np.float32).reshape(4, 4) / 8 - 0.75)
    mask = np.array([True, False, True, True])
    scale = np.array([0.5, -2.0], np.float16)
    entries = [("w", "BFloat16", w), ("mask", "Bool", mask), ("scale", "Float16", scale)]
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    src = save_rank_set(tmp_path / "src", [[("w", "BFloat16", w[:2]), ("mask", "Bool", mask), ("scale", "Float16", scale)],
                                           [("w", "BFloat16", w[2:]), ("mask", "Bool", mask), ("scale", "Float16", scale)]])
    assert invoke("merge", src, "--plan", plan, "-o", tmp_path / "merged.ckpt", "-q").exit_code == 0
    merged = load(tmp_path / "merged.ckpt")
    assert merged == {name: (dtype, array.shape, array.tobytes()) for name, dtype, array in entries}
    assert invoke("split", tmp_path / "merged.ckpt", "--plan", plan, "-o", tmp_path / "again", "-q").exit_code == 0
    for rank in range(2):
        assert load(rank_file(tmp_path / "again", rank)) == load(rank_file(src, rank))


def test_tutorial_grid_2x2(tmp_path):
    tensor = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    full = save(tmp_path / "full.ckpt", [("t", "Float32", tensor)])
    plan = write_plan(tmp_path / "plan.toml", 4, '[[param]]\nmatch = "t"\nstrategy = "grid"\ngrid = [2, 2]\n')
    assert invoke("split", full, "--plan", plan, "-o", tmp_path / "split", "-q").exit_code == 0
    expected = [[1, 2], [3, 4], [5, 6], [7, 8]]
    for rank in range(4):
        assert load(rank_file(tmp_path / "split", rank))["t"] == ("Float32", (1, 2), np.float32([expected[rank]]).tobytes())
    assert invoke("merge", tmp_path / "split", "--plan", plan, "-o", tmp_path / "merged.ckpt", "-q").exit_code == 0
    assert load(tmp_path / "merged.ckpt") == load(full)


def test_split_then_merge_safetensors(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    full = save(tmp_path / "full.safetensors", [("w", "Float32", w), ("b", "Int64", np.arange(3))], "safetensors")
    plan = write_plan(tmp_path / "plan.toml", 2, ROW_W)
    assert invoke("split", full, "--plan", plan, "-o", tmp_path / "split", "-q").exit_code == 0
    assert load(rank_file(tmp_path / "split", 1))["w"][2] == w[4:].tobytes()
    assert invoke("merge", tmp_path / "split", "--plan", plan, "-o", tmp_path / "merged.safetensors", "-q").exit_code == 0
    assert load(tmp_path / "merged.safetensors") == load(full)


def test_zero_dim_scalar_differs_lists_values(tmp_path):
    src = save_rank_set(tmp_path / "src", [[("learning_rate", "Float32", np.array(0.01, np.float32))],
                                           [("learning_rate", "Float32", np.array(0.02, np.float32))]])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ""), "-o", tmp_path / "out.ckpt", "-q")
    assert_failed_cleanly(result, tmp_path, "'learning_rate'", "rank 0: 0.01", "rank 1: 0.02")


def test_zero_dim_scalar_written_once(tmp_path):
    step = [("learning_rate", "Float32", np.array(0.01, np.float32)), ("w", "Float32", np.zeros((2, 2), np.float32))]
    src = save_rank_set(tmp_path / "src", [step, step])
    result = invoke("merge", src, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "out.ckpt")["learning_rate"] == ("Float32", (), np.float32(0.01).tobytes())
    assert load(tmp_path / "out.ckpt")["w"][1] == (4, 2)


def test_split_dry_run_checks_everything(tmp_path):
    full = save(tmp_path / "full.ckpt", [("w", "Float32", np.zeros((6, 8), np.float32))])
    write_plan(tmp_path / "plan.toml", 4, ROW_W)
    before = listing(tmp_path)
    result = invoke("split", full, "--plan", tmp_path / "plan.toml", "-o", tmp_path / "out", "--dry-run", "-q")
    assert_failed_cleanly(result, tmp_path, "'w'", "dim 0", "4 parts")
    result = invoke("split", full, "--plan", write_plan(tmp_path / "plan.toml", 2, ROW_W), "-o", tmp_path / "out", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == before
