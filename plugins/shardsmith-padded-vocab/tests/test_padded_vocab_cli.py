"""`padded_vocab` end to end: MindSpore-saved rank files through `shardsmith merge/split/reshard`.

The field case: a vocabulary of 10 rows with hidden size 4, padded to 12 rows over 4 ranks of
[3, 4]. The rank files are written with `mindspore.save_checkpoint`, their padding rows filled
with -7 as a training job may leave them, and every result is read back with
`mindspore.load_checkpoint`. The strategy is found through the installed entry point.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

ms = pytest.importorskip("mindspore")

from shardsmith.cli import app  # noqa: E402
from shardsmith.plugins import PLUGINS_ENV, reset_registry  # noqa: E402

runner = CliRunner()

EMBEDDING = "embedding.word_embeddings.embedding_table"
STATES = ("moment1." + EMBEDDING, "moment2." + EMBEDDING)
VOCAB, HIDDEN, RANKS, ROWS_PER_RANK = 10, 4, 4, 3
PADDING_VALUE = -7

PLAN = """\
world_size = {world_size}

[[param]]
match = "{name}"
strategy = "padded_vocab"
vocab_size = 10
{options}
"""


@pytest.fixture(autouse=True)
def installed_plugins(monkeypatch):
    """Load every installed plugin, as a user's shell would, and forget the registry after."""
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    reset_registry()
    yield
    reset_registry()


def true_vocabulary():
    """The unpadded tensors: the embedding, float16 Adam states and Adam's scalars."""
    table = np.arange(VOCAB * HIDDEN, dtype=np.float32).reshape(VOCAB, HIDDEN) + 1
    return {
        EMBEDDING: table,
        STATES[0]: (table / 8).astype(np.float16),
        STATES[1]: (table / 64).astype(np.float16),
        "beta1_power": np.array(0.9, dtype=np.float32),
        "beta2_power": np.array(0.999, dtype=np.float32),
        "global_step": np.array([11], dtype=np.int32),
    }


def padded(value, rows, fill):
    """`value` with rows appended up to `rows`, filled with `fill`."""
    extra = np.full((rows - value.shape[0],) + value.shape[1:], fill, dtype=value.dtype)
    return np.concatenate([value, extra])


def save(tensors, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(value)} for name, value in tensors.items()], str(path))


def rank_file(directory, rank):
    return directory / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"


def save_rank_set(directory, rows_per_rank=ROWS_PER_RANK, ranks=RANKS):
    """Write the rank set a vocabulary-parallel job saves; its padding rows hold PADDING_VALUE."""
    full = true_vocabulary()
    for rank in range(ranks):
        tensors = {}
        for name, value in full.items():
            if name == EMBEDDING or name in STATES:
                value = padded(value, rows_per_rank * ranks, PADDING_VALUE)
                value = value[rank * rows_per_rank : (rank + 1) * rows_per_rank]
            tensors[name] = value
        save(tensors, rank_file(directory, rank))
    return full


def write_plan(path, world_size=RANKS, options=""):
    path.write_text(PLAN.format(world_size=world_size, name=EMBEDDING, options=options))
    return path


def load(path):
    return {name: param.asnumpy() for name, param in ms.load_checkpoint(str(path)).items()}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_merge_strips_padding(tmp_path):
    full = save_rank_set(tmp_path / "ranks")
    plan = write_plan(tmp_path / "plan.toml")

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code == 0, result.output
    merged = load(tmp_path / "full.ckpt")
    assert list(merged) == list(full)
    assert merged[EMBEDDING].shape == (VOCAB, HIDDEN)
    for name, value in full.items():
        assert merged[name].dtype == value.dtype, name
        assert merged[name].tobytes() == value.tobytes(), name


def test_merge_keeps_padding(tmp_path):
    full = save_rank_set(tmp_path / "ranks")
    plan = write_plan(tmp_path / "plan.toml", options="keep_padding = true")

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code == 0, result.output
    merged = load(tmp_path / "full.ckpt")
    for name in (EMBEDDING,) + STATES:
        assert merged[name].shape == (12, HIDDEN), name
        assert merged[name].tobytes() == padded(full[name], 12, PADDING_VALUE).tobytes(), name


def test_split_pads_with_zeros(tmp_path):
    full = true_vocabulary()
    save(full, tmp_path / "full.ckpt")
    plan = write_plan(tmp_path / "plan.toml")

    result = run("split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "ranks", "--quiet")

    assert result.exit_code == 0, result.output
    for rank in range(RANKS):
        slices = load(rank_file(tmp_path / "ranks", rank))
        for name in (EMBEDDING,) + STATES:
            expected = padded(full[name], 12, 0)[rank * 3 : (rank + 1) * 3]
            assert slices[name].shape == (3, HIDDEN), (rank, name)
            assert slices[name].tobytes() == expected.tobytes(), (rank, name)
        assert slices["global_step"].tobytes() == full["global_step"].tobytes()


def test_last_rank_padding_rows(tmp_path):
    save(true_vocabulary(), tmp_path / "full.ckpt")
    plan = write_plan(tmp_path / "plan.toml")

    result = run("split", tmp_path / "full.ckpt", "--plan", plan, "-o", tmp_path / "ranks", "--quiet")

    assert result.exit_code == 0, result.output
    last = load(rank_file(tmp_path / "ranks", 3))
    np.testing.assert_array_equal(last[EMBEDDING][0], np.arange(36, 40, dtype=np.float32) + 1)
    np.testing.assert_array_equal(last[EMBEDDING][1:], np.zeros((2, HIDDEN), dtype=np.float32))
    for state in STATES:
        np.testing.assert_array_equal(last[state][1:], np.zeros((2, HIDDEN), dtype=np.float16))


def test_merge_wrong_padded_size_fails(tmp_path):
    save_rank_set(tmp_path / "ranks", rows_per_rank=4)
    plan = write_plan(tmp_path / "plan.toml")

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code != 0
    assert f"parameter '{EMBEDDING}'" in result.stderr
    assert "add up to 16 rows" in result.stderr
    assert "padded to a multiple of 4 parts is 12 rows" in result.stderr
    assert not (tmp_path / "full.ckpt").exists()


def test_reshard_four_to_three_ranks(tmp_path):
    full = save_rank_set(tmp_path / "ranks")
    plan4 = write_plan(tmp_path / "plan4.toml")
    plan3 = write_plan(tmp_path / "plan3.toml", world_size=3)

    result = run("reshard", tmp_path / "ranks", "--plan", plan4, "--to-plan", plan3, "-o", tmp_path / "three", "--quiet")

    assert result.exit_code == 0, result.output
    for rank in range(3):
        slices = load(rank_file(tmp_path / "three", rank))
        for name in (EMBEDDING,) + STATES:
            # 10 rows over 3 parts pad to 12 again, as 4 rows a rank; the old padding is not carried over.
            expected = padded(full[name], 12, 0)[rank * 4 : (rank + 1) * 4]
            assert slices[name].tobytes() == expected.tobytes(), (rank, name)


def test_reshard_to_row_plan(tmp_path):
    full = save_rank_set(tmp_path / "ranks")
    plan4 = write_plan(tmp_path / "plan4.toml")
    row_plan = tmp_path / "row.toml"
    row_plan.write_text(f'world_size = 2\n\n[[param]]\nmatch = "{EMBEDDING}"\nstrategy = "row"\n')

    result = run("reshard", tmp_path / "ranks", "--plan", plan4, "--to-plan", row_plan, "-o", tmp_path / "two", "--quiet")

    assert result.exit_code == 0, result.output
    for rank in range(2):
        slices = load(rank_file(tmp_path / "two", rank))
        np.testing.assert_array_equal(slices[EMBEDDING], full[EMBEDDING][rank * 5 : (rank + 1) * 5])


def test_padding_only_ranks_not_compared(tmp_path):
    # vocab 5 over 4 parts pads to 8 rows, 2 a rank, so part 3 is all padding. With world size 8,
    # ranks 3 and 7 both hold part 3: their different padding values are not copies to check,
    # while ranks 0-2 and 4-6 are, and hold the same rows.
    table = np.arange(5 * HIDDEN, dtype=np.float32).reshape(5, HIDDEN)
    rows = padded(table, 8, 0)
    for rank in range(8):
        part = rows[rank % 4 * 2 : rank % 4 * 2 + 2].copy()
        if rank % 4 == 3:
            part[:] = -rank
        elif rank % 4 == 2:
            part[1] = -rank  # row 5 is padding too
        save({EMBEDDING: part}, rank_file(tmp_path / "ranks", rank))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'world_size = 8\n\n[[param]]\nmatch = "{EMBEDDING}"\nstrategy = "padded_vocab"\nvocab_size = 5\nparts = 4\n')

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr
    assert load(tmp_path / "full.ckpt")[EMBEDDING].tobytes() == table.tobytes()


def test_differing_copies_rejected(tmp_path):
    # The real rows of data-parallel copies are still checked.
    table = np.arange(5 * HIDDEN, dtype=np.float32).reshape(5, HIDDEN)
    rows = padded(table, 8, 0)
    for rank in range(8):
        part = rows[rank % 4 * 2 : rank % 4 * 2 + 2].copy()
        if rank == 5:
            part[0, 0] += 1
        save({EMBEDDING: part}, rank_file(tmp_path / "ranks", rank))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'world_size = 8\n\n[[param]]\nmatch = "{EMBEDDING}"\nstrategy = "padded_vocab"\nvocab_size = 5\nparts = 4\n')

    result = run("merge", tmp_path / "ranks", "--plan", plan, "-o", tmp_path / "full.ckpt", "--quiet")

    assert result.exit_code != 0
    assert "copies that should be identical differ: rank 1 and rank 5" in result.stderr
    assert not (tmp_path / "full.ckpt").exists()
