"""`fused_qkv` end to end: MindSpore-saved rank files through `shardsmith merge/split/reshard`.

The rank files are written with `mindspore.save_checkpoint` from slices cut by hand (not by the
plugin), and the results are read back with `mindspore.load_checkpoint`, so MindSpore is the
oracle on both sides. The strategy is found through the installed entry point.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

ms = pytest.importorskip("mindspore")

from shardsmith.cli import app  # noqa: E402
from shardsmith.plugins import PLUGINS_ENV, reset_registry  # noqa: E402

runner = CliRunner()

WEIGHT = "attn.qkv.weight"
BIAS = "attn.qkv.bias"
STATE_PREFIXES = ("adam_m.", "adam_v.")

PLAN = """\
world_size = {world_size}

[[param]]
match = "attn.qkv.*"
strategy = "fused_qkv"
{options}
"""


@pytest.fixture(autouse=True)
def installed_plugins(monkeypatch):
    """Load every installed plugin, as a user's shell would, and forget the registry after."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


def canonical(heads=2, head_dim=2, hidden=2):
    """The full tensors in [Q; K; V] order: weight, float16 bias, AdamWeightDecay states, scalars."""
    rows = 3 * heads * head_dim
    weight = np.arange(rows * hidden, dtype=np.float32).reshape(rows, hidden)
    bias = (np.arange(rows) + 100).astype(np.float16)
    tensors = {WEIGHT: weight, BIAS: bias}
    for number, prefix in enumerate(STATE_PREFIXES, start=1):
        tensors[prefix + WEIGHT] = weight + 1000 * number
        tensors[prefix + BIAS] = bias + 1000 * number
    tensors["global_step"] = np.array([5], dtype=np.int32)
    tensors["learning_rate"] = np.array(0.001, dtype=np.float32)
    return tensors


def head_rows(rank, ranks, heads, head_dim):
    """Rows of the full tensor that `rank` holds: its heads' rows of Q, then K, then V."""
    per_rank = heads // ranks * head_dim
    rows = []
    for section in range(3):
        start = section * heads * head_dim + rank * per_rank
        rows.extend(range(start, start + per_rank))
    return rows


def save(tensors, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(value)} for name, value in tensors.items()], str(path))


def save_rank_set(directory, ranks, heads, head_dim=2, hidden=2):
    """Write the rank set a training job with `ranks` tensor-parallel ranks saves."""
    full = canonical(heads, head_dim, hidden)
    for rank in range(ranks):
        rows = head_rows(rank, ranks, heads, head_dim)
        tensors = {name: (value[rows] if "attn.qkv." in name else value) for name, value in full.items()}
        save(tensors, directory / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
    return full


def write_plan(path, world_size, options="heads = 2"):
    path.write_text(PLAN.format(world_size=world_size, options=options))
    return path


def load(path):
    return {name: param.asnumpy() for name, param in ms.load_checkpoint(str(path)).items()}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_merge_gives_canonical_order(tmp_path):
    full = save_rank_set(tmp_path / "ranks", 2, heads=2)
    plan = write_plan(tmp_path / "plan.toml", 2)

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code == 0, result.output
    merged = load(tmp_path / "full.ckpt")
    assert list(merged) == list(full)
    for name, value in full.items():
        assert merged[name].dtype == value.dtype, name
        assert merged[name].tobytes() == value.tobytes(), name


def test_split_again_reproduces_rank_files(tmp_path):
    save_rank_set(tmp_path / "ranks", 2, heads=2)
    plan = write_plan(tmp_path / "plan.toml", 2)
    merged = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")
    assert merged.exit_code == 0, merged.output

    result = run("split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "again", "--quiet")

    assert result.exit_code == 0, result.output
    for rank in range(2):
        original = (tmp_path / "ranks" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").read_bytes()
        again = (tmp_path / "again" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").read_bytes()
        assert again == original, f"rank {rank}"


def test_states_move_like_weight(tmp_path):
    save_rank_set(tmp_path / "ranks", 2, heads=2)
    plan = write_plan(tmp_path / "plan.toml", 2)
    merged = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")
    assert merged.exit_code == 0, merged.output
    split = run("split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "again", "--quiet")
    assert split.exit_code == 0, split.output

    for rank in range(2):
        slices = load(tmp_path / "again" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
        for number, prefix in enumerate(STATE_PREFIXES, start=1):
            np.testing.assert_array_equal(slices[prefix + WEIGHT], slices[WEIGHT] + 1000 * number)
            np.testing.assert_array_equal(slices[prefix + BIAS], slices[BIAS] + 1000 * number)


def test_split_to_four_ranks_fails(tmp_path):
    save(canonical(), tmp_path / "full.ckpt")
    plan = write_plan(tmp_path / "plan4.toml", 4)

    result = run("split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "four", "--quiet")

    assert result.exit_code != 0
    assert f"parameter '{WEIGHT}'" in result.stderr
    assert "2 heads not divisible by 4 ranks" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "four").exists()


def test_reshard_two_to_four_ranks(tmp_path):
    full = save_rank_set(tmp_path / "ranks", 2, heads=4)
    plan2 = write_plan(tmp_path / "plan2.toml", 2, "heads = 4")
    plan4 = write_plan(tmp_path / "plan4.toml", 4, "heads = 4")

    result = run(
        "reshard", tmp_path / "ranks", "--plan", plan2, "--to-plan", plan4, "-o", tmp_path / "four", "--quiet"
    )

    assert result.exit_code == 0, result.output
    for rank in range(4):
        slices = load(tmp_path / "four" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
        rows = head_rows(rank, 4, heads=4, head_dim=2)
        for name in (WEIGHT, BIAS, "adam_m." + WEIGHT, "adam_v." + BIAS):
            assert slices[name].tobytes() == full[name][rows].tobytes(), (rank, name)
        assert slices["global_step"].tobytes() == full["global_step"].tobytes()


def test_reshard_grouped_query_to_row(tmp_path):
    # 4 query heads and 2 KV groups of size 2: dim 0 is (4 + 2 + 2) * 2 = 16 rows.
    full = {WEIGHT: np.arange(32, dtype=np.float32).reshape(16, 2)}
    gqa_rows = {0: [0, 1, 2, 3, 8, 9, 12, 13], 1: [4, 5, 6, 7, 10, 11, 14, 15]}
    for rank, rows in gqa_rows.items():
        save({WEIGHT: full[WEIGHT][rows]}, tmp_path / "ranks" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
    gqa_plan = write_plan(tmp_path / "gqa.toml", 2, "query_heads = 4\nkv_groups = 2")
    row_plan = tmp_path / "row.toml"
    row_plan.write_text('world_size = 2\n\n[[param]]\nmatch = "*"\nstrategy = "row"\n')

    result = run(
        "reshard", tmp_path / "ranks", "--plan", gqa_plan, "--to-plan", row_plan, "-o", tmp_path / "rows", "--quiet"
    )

    assert result.exit_code == 0, result.output
    for rank in range(2):
        slices = load(tmp_path / "rows" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
        np.testing.assert_array_equal(slices[WEIGHT], full[WEIGHT][rank * 8 : (rank + 1) * 8])


def test_split_to_safetensors(tmp_path):
    full = canonical()
    save(full, tmp_path / "full.ckpt")
    plan = write_plan(tmp_path / "plan.toml", 2)

    result = run(
        "split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "ranks", "--format", "safetensors", "--quiet"
    )

    assert result.exit_code == 0, result.output
    for rank in range(2):
        path = tmp_path / "ranks" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"
        slices = {name: p.asnumpy() for name, p in ms.load_checkpoint(str(path), format="safetensors").items()}
        rows = head_rows(rank, 2, heads=2, head_dim=2)
        assert slices[WEIGHT].tobytes() == full[WEIGHT][rows].tobytes()
        assert slices[BIAS].tobytes() == full[BIAS][rows].tobytes()


def test_dry_run_writes_nothing(tmp_path):
    save_rank_set(tmp_path / "ranks", 2, heads=2)
    plan = write_plan(tmp_path / "plan.toml", 2)

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--dry-run", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["parameters"] == len(canonical())
    assert not (tmp_path / "full.ckpt").exists()
