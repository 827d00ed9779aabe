"""`shardsmith verify`, the `--verify` read-back, and the coverage check by index ranges."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pytest
from typer.testing import CliRunner

from reliability_support import listing, rank_file, save, save_rank_set, write_plan
from shardsmith import jobs
from shardsmith.cli import app
from shardsmith.engine import prepare_merge
from shardsmith.errors import ValidationError
from shardsmith.layout import Box, Layout, Piece, Shape
from shardsmith.plan import load_plan
from shardsmith.plugins import get_registry, reset_registry
from shardsmith.rankset import open_source
from shardsmith.strategies.base import LayoutContext, Strategy

pytest.importorskip("mindspore")

runner = CliRunner()

W = np.arange(32, dtype=np.float32).reshape(8, 4)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# -- verify A B -------------------------------------------------------------------------------


def test_verify_identical_files(tmp_path):
    a = save(tmp_path / "a.ckpt", [("w", "Float32", W)])
    b = save(tmp_path / "b.ckpt", [("w", "Float32", W)])
    result = invoke("verify", a, b)
    assert result.exit_code == 0, result.output
    assert "identical" in result.stdout


def test_verify_reports_every_difference(tmp_path):
    a = save(tmp_path / "a.ckpt", [("w", "Float32", W), ("b", "Float32", W[0]), ("s", "Int32", np.arange(3, dtype=np.int32)),
                                   ("d", "Float32", W[1]), ("only_a", "Int8", np.zeros(1, np.int8))])
    changed = W.copy()
    changed[3, 1] += 1
    b = save(tmp_path / "b.ckpt", [("w", "Float32", changed), ("b", "Float16", W[0].astype(np.float16)), ("s", "Int32", np.arange(4, dtype=np.int32)),
                                   ("d", "Float32", W[1]), ("only_b", "Int8", np.zeros(1, np.int8))])
    result = invoke("verify", a, b)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"only_a: only in {a}" in lines
    assert f"only_b: only in {b}" in lines
    assert "b: Float32 vs Float16" in lines
    assert "s: [3] vs [4]" in lines
    assert "w: bytes differ (1 of 32 elements, the first at index [3, 1])" in lines
    assert not any(line.startswith("d:") for line in lines)
    assert "5 difference(s)" in result.stderr


def test_verify_json_lists_kinds(tmp_path):
    a = save(tmp_path / "a.ckpt", [("w", "Float32", W)])
    b = save(tmp_path / "b.ckpt", [("w", "Float32", W + 1)])
    result = invoke("verify", a, b, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["equal"] is False
    assert [(d["name"], d["kind"]) for d in report["differences"]] == [("w", "bytes")]


def test_verify_tolerance(tmp_path):
    a = save(tmp_path / "a.ckpt", [("w", "Float32", W)])
    near = W.copy()
    near[2, 2] += 1e-4
    b = save(tmp_path / "b.ckpt", [("w", "Float32", near)])
    assert invoke("verify", a, b).exit_code == 1
    assert invoke("verify", a, b, "--atol", "1e-3").exit_code == 0
    assert invoke("verify", a, b, "--rtol", "1e-3").exit_code == 0
    result = invoke("verify", a, b, "--atol", "1e-6")
    assert result.exit_code == 1
    assert "largest difference 0.0001" in result.stdout
    assert "at index [2, 2]" in result.stdout


def test_verify_bfloat16_tolerance(tmp_path):
    from reliability_support import bfloat16_words

    a = save(tmp_path / "a.ckpt", [("w", "BFloat16", bfloat16_words([1.0, 2.0]))])
    b = save(tmp_path / "b.ckpt", [("w", "BFloat16", bfloat16_words([1.0, 2.015625]))])
    assert invoke("verify", a, b).exit_code == 1
    assert invoke("verify", a, b, "--atol", "0.02").exit_code == 0


def test_verify_rank_sets_per_rank(tmp_path):
    a = save_rank_set(tmp_path / "a", [[("w", "Float32", W[:4])], [("w", "Float32", W[4:])]])
    b = save_rank_set(tmp_path / "b", [[("w", "Float32", W[:4])], [("w", "Float32", W[4:] * 2)]])
    result = invoke("verify", a, b)
    assert result.exit_code == 1
    assert result.stdout.startswith("rank 1: w: bytes differ")
    c = save_rank_set(tmp_path / "c", [[("w", "Float32", W)]] * 3)
    result = invoke("verify", a, c)
    assert result.exit_code == 2
    assert "cannot compare 2 rank file(s) with 3" in result.stderr


# -- --verify reads the output back ----------------------------------------------------------


@pytest.mark.parametrize("command", ["merge", "split", "reshard"])
def test_verify_flag_passes_on_good_output(tmp_path, command):
    plan = write_plan(tmp_path / "plan.toml", 2, '[[param]]\nmatch = "w"\nstrategy = "row"\n')
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", W[:4])], [("w", "Float32", W[4:])]])
    full = save(tmp_path / "full.ckpt", [("w", "Float32", W)])
    args = {
        "merge": ["merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt"],
        "split": ["split", full, "--plan", plan, "-o", tmp_path / "out"],
        "reshard": ["reshard", src, "--plan", plan, "--to-plan", plan, "-o", tmp_path / "out"],
    }[command]
    result = invoke(*args, "--verify", "-q")
    assert result.exit_code == 0, result.output


def test_read_back_catches_a_damaged_write(tmp_path):
    plan_path = write_plan(tmp_path / "plan.toml", 2, '[[param]]\nmatch = "w"\nstrategy = "row"\n')
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", W[:4]), ("b", "Float32", W[0])], [("w", "Float32", W[4:]), ("b", "Float32", W[0])]])
    out = tmp_path / "out.ckpt"
    jobs.merge([src], plan_path, out)
    # Flip one bit of w's last element, as a bad disk or a buggy writer would.
    data = bytearray(out.read_bytes())
    position = data.rindex(W[-1, -1].tobytes())
    data[position] ^= 1
    out.chmod(0o644)
    out.write_bytes(bytes(data))
    with open_source([src]) as source:
        job = prepare_merge(source, load_plan(plan_path))
        with pytest.raises(ValidationError, match="parameter 'w': the written bytes differ from the source"):
            jobs.verify_written(job, source, [out], "ckpt")


# -- coverage by index ranges ----------------------------------------------------------------


class _Rows(Strategy):
    """Rank r holds rows [r * step, r * step + block) of dim 0: a gap or an overlap unless step == block."""

    name = "test_rows"
    options = {}
    step = 0
    block = 0

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        rest = tuple(full_shape[1:])
        pieces = tuple(
            (Piece(Box.whole((self.block,) + rest), Box.at((r * self.step,) + (0,) * len(rest), (self.block,) + rest)),)
            for r in range(world_size)
        )
        return Layout(tuple(full_shape), ((self.block,) + rest,) * world_size, pieces, self.name)

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        return (self.step * (world_size - 1) + self.block,) + tuple(slice_shapes[0][1:]) if self.step else tuple(slice_shapes[0])


class _Gap(_Rows):
    name = "test_gap"
    step, block = 3, 2  # [8, 4] over 3 ranks: rows 0-1, 3-4, 6-7


class _Overlap(_Rows):
    name = "test_overlap"
    step, block = 2, 3  # [7, 4] over 3 ranks: rows 0-2, 2-4, 4-6


@pytest.fixture
def broken_strategies():
    registry = get_registry()
    registry.add(_Gap, "tests")
    registry.add(_Overlap, "tests")
    try:
        yield
    finally:
        reset_registry()


@pytest.mark.parametrize("strategy, message", [("test_gap", "cover 24 of 32 elements"), ("test_overlap", "overlap without being copies")])
def test_coverage_checked_by_ranges(tmp_path, broken_strategies, strategy, message):
    block = 2 if strategy == "test_gap" else 3
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", np.zeros((block, 4), np.float32))]] * 3)
    plan = write_plan(tmp_path / "plan.toml", 3, f'[[param]]\nmatch = "w"\nstrategy = "{strategy}"\n')
    for extra in ([], ["--dry-run"]):
        result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q", *extra)
        assert result.exit_code == 1, result.output
        assert "parameter 'w'" in result.stderr
        assert message in result.stderr
    assert "out.ckpt" not in listing(tmp_path)


def test_partial_replicas_compared(tmp_path):
    # row with parts=2 over 4 ranks: ranks 0 and 2 hold rows 0-3, ranks 1 and 3 rows 4-7.
    blocks = [W[:4], W[4:], W[:4].copy(), W[4:]]
    blocks[2][1, 1] = -1
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", b)] for b in blocks])
    plan = write_plan(tmp_path / "plan.toml", 4, '[[param]]\nmatch = "w"\nstrategy = "row"\nparts = 2\n')
    result = invoke("merge", src, "--plan", plan, "-o", tmp_path / "out.ckpt", "-q")
    assert result.exit_code == 1
    assert "parameter 'w'" in result.stderr
    assert "rank 0 and rank 2" in result.stderr
    assert "largest difference 6 at index [1, 1]" in result.stderr
    assert not (tmp_path / "out.ckpt").exists()


def test_reshard_dry_run_writes_nothing(tmp_path):
    src = save_rank_set(tmp_path / "src", [[("w", "Float32", W[:4])], [("w", "Float32", W[4:])]])
    plan = write_plan(tmp_path / "plan.toml", 2, '[[param]]\nmatch = "w"\nstrategy = "row"\n')
    to_plan = write_plan(tmp_path / "to.toml", 4, '[[param]]\nmatch = "w"\nstrategy = "row"\n')
    before = listing(tmp_path)
    result = invoke("reshard", src, "--plan", plan, "--to-plan", to_plan, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert [f["path"] for f in json.loads(result.stdout)["files"]] == [f"rank_{r}/checkpoint_{r}.ckpt" for r in range(4)]
    assert listing(tmp_path) == before
    assert rank_file(src, 0).exists()


def test_verify_tolerance_across_chunks(tmp_path, monkeypatch):
    import shardsmith.verify

    monkeypatch.setattr(shardsmith.verify, "_CHUNK_ELEMENTS", 5)
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    other = base.copy()
    other[0, 1] += 0.5
    other[3, 4] += 2.0  # element 22, in the fifth chunk
    other[2, 0] = np.nextafter(np.float32(12.0), np.float32(13.0))  # within atol, but other bytes
    a = save(tmp_path / "a.ckpt", [("w", "Float32", base)])
    b = save(tmp_path / "b.ckpt", [("w", "Float32", other)])
    result = invoke("verify", a, b, "--atol", "1e-3")
    assert result.exit_code == 1
    assert "in 2 of 24 elements" in result.stdout
    assert "largest difference 2 at index [3, 4]" in result.stdout
    result = invoke("verify", a, b)
    assert "bytes differ (3 of 24 elements, the first at index [0, 1])" in result.stdout


def test_verify_nan_against_number(tmp_path):
    a = save(tmp_path / "a.ckpt", [("w", "Float32", np.array([1.0, np.nan, 3.0], np.float32))])
    b = save(tmp_path / "b.ckpt", [("w", "Float32", np.array([1.0, 2.0, 3.0], np.float32))])
    result = invoke("verify", a, b, "--atol", "10")
    assert result.exit_code == 1
    assert "largest difference inf at index [1]" in result.stdout
    assert invoke("verify", a, a, "--atol", "0").exit_code == 0


def test_coverage_of_thousands_of_slices_is_fast():
    import time

    from shardsmith.layout import from_tensor_map

    layout = from_tensor_map((8192, 8), (4096,), (0, -1))
    started = time.monotonic()
    layout.check_coverage("w")
    # Comparing every pair of 4096 boxes took 20 s on a 2-core machine; counting cells takes ms.
    assert time.monotonic() - started < 2


def test_overlap_found_among_many_boxes():
    from shardsmith.errors import LayoutError

    pieces = [(Piece(Box.whole((1, 4)), Box.at((r, 0), (1, 4))),) for r in range(64)]
    pieces[40] = (Piece(Box.whole((1, 4)), Box.at((41, 0), (1, 4))),)
    layout = Layout((64, 4), ((1, 4),) * 64, tuple(pieces))
    # Rank 40 now holds a copy of rank 41's rows, so row 40 is held by nobody.
    with pytest.raises(LayoutError, match=r"cover 252 of 256"):
        layout.check_coverage("w")
    pieces[40] = (Piece(Box.whole((2, 4)), Box.at((40, 0), (2, 4))),)
    layout = Layout((64, 4), ((1, 4),) * 40 + ((2, 4),) + ((1, 4),) * 23, tuple(pieces))
    with pytest.raises(LayoutError, match=r"parameter 'w': slice boxes \[40:42, 0:4\] and \[41:42, 0:4\] overlap"):
        layout.check_coverage("w")
