"""The `padded_vocab` layout, resolved through a real plan and moved with numpy by its pieces.

The field case: a true vocabulary of 10 with hidden size 4, padded to 12 rows over 4 ranks, so
each rank holds [3, 4] and the last 2 rows of rank 3 are padding. The arrays are moved here by the
same rule the engine follows (every piece of a slice is one box of the full tensor; slice rows no
piece covers are zeros on split and ignored on merge), so these tests pin the layout, not the
engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from shardsmith.errors import LayoutError, PlanError
from shardsmith.plan import loads_plan, resolve_full, resolve_slices
from shardsmith.plugins import load_registry
from shardsmith_padded_vocab import padded_rows, register_strategies

EMBEDDING = "embedding.word_embeddings.embedding_table"
STATES = ("moment1." + EMBEDDING, "moment2." + EMBEDDING)


@pytest.fixture
def registry():
    """The built-ins plus this plugin, registered through its own hook and without entry points."""
    registry = load_registry(entry_points=False)
    register_strategies(register=lambda cls: registry.add(cls, "shardsmith-padded-vocab (test)"))
    return registry


def plan(registry, world_size, options="vocab_size = 10"):
    text = f"""
world_size = {world_size}

[[param]]
match = "{EMBEDDING}"
strategy = "padded_vocab"
{options}
"""
    return loads_plan(text, registry=registry)


def checkpoint(rows=10, hidden=4):
    """A full checkpoint: the embedding, its Adam states and Adam's scalars."""
    table = np.arange(rows * hidden, dtype=np.float32).reshape(rows, hidden) + 1
    return {
        EMBEDDING: table,
        STATES[0]: table * 10,
        STATES[1]: table * 100,
        "beta1_power": np.array(0.9, dtype=np.float32),
        "global_step": np.array([3], dtype=np.int32),
    }


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


def resolve_ranks(the_plan, ranks, registry):
    names = list(ranks[0])
    dtypes = {n: "Float32" for n in names}
    slice_shapes = {n: [tuple(r[n].shape) for r in ranks] for n in names}
    return resolve_slices(the_plan, names, dtypes, slice_shapes, registry=registry)


def split_checkpoint(the_plan, tensors, registry):
    layouts = resolve_checkpoint(the_plan, tensors, registry)
    ranks = [{} for _ in range(the_plan.world_size)]
    for name, tensor in tensors.items():
        for rank, part in enumerate(split_by_layout(tensor, layouts[name].layout)):
            ranks[rank][name] = part
    return ranks


def merge_checkpoint(the_plan, ranks, registry):
    layouts = resolve_ranks(the_plan, ranks, registry)
    return {n: merge_by_layout([r[n] for r in ranks], layouts[n].layout) for n in ranks[0]}


def padded_field_ranks(registry):
    """Rank files as the training job writes them: 12 rows over 4 ranks, padding rows of any value."""
    table = checkpoint(rows=12)[EMBEDDING]
    table[10:] = -1  # the trainer's padding rows need not be zeros
    tensors = {EMBEDDING: table, STATES[0]: table * 10, STATES[1]: table * 100}
    row_plan = loads_plan(f'world_size = 4\n[[param]]\nmatch = "{EMBEDDING}"\nstrategy = "row"\n', registry=registry)
    return split_checkpoint(row_plan, tensors, registry)


def test_padded_rows():
    assert padded_rows(10, 4) == 12
    assert padded_rows(12, 4) == 12
    assert padded_rows(1, 8) == 8


def test_split_pads_last_rank_with_zeros(registry):
    tensors = checkpoint()
    ranks = split_checkpoint(plan(registry, 4), tensors, registry)

    for rank in range(4):
        assert ranks[rank][EMBEDDING].shape == (3, 4)
    np.testing.assert_array_equal(ranks[2][EMBEDDING], tensors[EMBEDDING][6:9])
    np.testing.assert_array_equal(ranks[3][EMBEDDING][0], tensors[EMBEDDING][9])
    np.testing.assert_array_equal(ranks[3][EMBEDDING][1:], np.zeros((2, 4), dtype=np.float32))


def test_states_padded_like_embedding(registry):
    tensors = checkpoint()
    ranks = split_checkpoint(plan(registry, 4), tensors, registry)

    for state in STATES:
        assert ranks[3][state].shape == (3, 4)
        np.testing.assert_array_equal(ranks[3][state][0], tensors[state][9])
        np.testing.assert_array_equal(ranks[3][state][1:], np.zeros((2, 4), dtype=np.float32))


def test_merge_strips_padding(registry):
    ranks = padded_field_ranks(registry)

    merged = merge_checkpoint(plan(registry, 4), ranks, registry)

    expected = checkpoint(rows=12)[EMBEDDING][:10]
    assert merged[EMBEDDING].shape == (10, 4)
    np.testing.assert_array_equal(merged[EMBEDDING], expected)
    for state, factor in zip(STATES, (10, 100)):
        assert merged[state].shape == (10, 4)
        np.testing.assert_array_equal(merged[state], expected * factor)


def test_merge_keeps_padding(registry):
    ranks = padded_field_ranks(registry)

    merged = merge_checkpoint(plan(registry, 4, "vocab_size = 10\nkeep_padding = true"), ranks, registry)

    assert merged[EMBEDDING].shape == (12, 4)
    np.testing.assert_array_equal(merged[EMBEDDING][10:], np.full((2, 4), -1, dtype=np.float32))
    for state in STATES:
        assert merged[state].shape == (12, 4)


def test_round_trip_reproduces_real_rows(registry):
    tensors = checkpoint()
    ranks = split_checkpoint(plan(registry, 4), tensors, registry)

    merged = merge_checkpoint(plan(registry, 4), ranks, registry)
    again = split_checkpoint(plan(registry, 4), merged, registry)

    for name, tensor in tensors.items():
        np.testing.assert_array_equal(merged[name], tensor, err_msg=name)
    for rank in range(4):
        for name in ranks[rank]:
            assert again[rank][name].tobytes() == ranks[rank][name].tobytes(), (rank, name)


def test_split_accepts_padded_full_tensor(registry):
    tensors = {EMBEDDING: checkpoint(rows=12)[EMBEDDING]}
    layout = resolve_checkpoint(plan(registry, 4), tensors, registry)[EMBEDDING].layout

    # A full tensor that still has its padding rows is a plain row split: every slice row is covered.
    assert layout.full_shape == (12, 4)
    assert [len(pieces) for pieces in layout.pieces] == [1, 1, 1, 1]
    assert layout.pieces[3][0].full.stop == (12, 4)


def test_padding_pieces(registry):
    layout = resolve_checkpoint(plan(registry, 4), {EMBEDDING: checkpoint()[EMBEDDING]}, registry)[EMBEDDING].layout

    assert layout.slice_shapes == ((3, 4),) * 4
    assert layout.pieces[3][0].local.shape == (1, 4)
    assert layout.pieces[3][0].full.start == (9, 0)


def test_rank_with_only_padding(registry):
    # vocab 5 over 8 parts: 8 rows of 1, so ranks 5-7 hold nothing but padding.
    tensors = {EMBEDDING: np.arange(10, dtype=np.float32).reshape(5, 2)}
    the_plan = plan(registry, 8, "vocab_size = 5")
    layout = resolve_checkpoint(the_plan, tensors, registry)[EMBEDDING].layout

    assert [len(pieces) for pieces in layout.pieces] == [1, 1, 1, 1, 1, 0, 0, 0]
    ranks = split_checkpoint(the_plan, tensors, registry)
    np.testing.assert_array_equal(ranks[7][EMBEDDING], np.zeros((1, 2), dtype=np.float32))
    np.testing.assert_array_equal(merge_checkpoint(the_plan, ranks, registry)[EMBEDDING], tensors[EMBEDDING])


def test_bias_of_lm_head(registry):
    # A 1-D tensor over the vocabulary (an LM head's bias) pads the same way.
    tensors = {EMBEDDING: np.arange(10, dtype=np.float32) + 1}
    ranks = split_checkpoint(plan(registry, 4), tensors, registry)

    np.testing.assert_array_equal(ranks[3][EMBEDDING], np.array([10, 0, 0], dtype=np.float32))
    np.testing.assert_array_equal(merge_checkpoint(plan(registry, 4), ranks, registry)[EMBEDDING], tensors[EMBEDDING])


def test_parts_smaller_than_world_size(registry):
    the_plan = plan(registry, 8, "vocab_size = 10\nparts = 4")
    ranks = split_checkpoint(the_plan, checkpoint(), registry)

    for rank in range(4, 8):
        np.testing.assert_array_equal(ranks[rank][EMBEDDING], ranks[rank - 4][EMBEDDING])
    merged = merge_checkpoint(the_plan, ranks, registry)
    np.testing.assert_array_equal(merged[EMBEDDING], checkpoint()[EMBEDDING])


def test_slices_adding_to_wrong_size(registry):
    shapes = {EMBEDDING: [(4, 4)] * 4}
    with pytest.raises(LayoutError) as info:
        resolve_slices(plan(registry, 4), [EMBEDDING], {EMBEDDING: "Float32"}, shapes, registry=registry)

    message = str(info.value)
    assert info.value.param == EMBEDDING
    assert "the slices of ranks 0-3 add up to 16 rows" in message
    assert "vocab_size 10 padded to a multiple of 4 parts is 12 rows" in message


def test_unequal_slices_rejected(registry):
    shapes = {EMBEDDING: [(3, 4), (3, 4), (4, 4), (2, 4)]}
    with pytest.raises(LayoutError, match=r"rank 0 holds \[3, 4\] and rank 2 holds \[4, 4\]"):
        resolve_slices(plan(registry, 4), [EMBEDDING], {EMBEDDING: "Float32"}, shapes, registry=registry)


def test_full_tensor_of_wrong_size(registry):
    tensors = {EMBEDDING: np.zeros((11, 4), dtype=np.float32)}
    with pytest.raises(LayoutError) as info:
        resolve_checkpoint(plan(registry, 4), tensors, registry)

    assert "dim 0 has 11 rows" in str(info.value)
    assert "expected 10 or 12 rows" in str(info.value)


def test_reshard_four_to_three_ranks(registry):
    # 10 rows over 3 parts pad to 12 again, but as 4 rows a rank: rank 2 holds 2 real rows.
    tensors = {EMBEDDING: checkpoint()[EMBEDDING]}
    source = resolve_checkpoint(plan(registry, 4), tensors, registry)[EMBEDDING].layout
    target = resolve_checkpoint(plan(registry, 3), tensors, registry)[EMBEDDING].layout

    resharded = reshard_by_layouts(split_by_layout(tensors[EMBEDDING], source), source, target)

    assert [part.shape for part in resharded] == [(4, 4)] * 3
    np.testing.assert_array_equal(resharded[2][:2], tensors[EMBEDDING][8:])
    np.testing.assert_array_equal(resharded[2][2:], np.zeros((2, 4), dtype=np.float32))
    np.testing.assert_array_equal(resharded[0], tensors[EMBEDDING][:4])


def test_padded_full_to_other_parts_fails(registry):
    # A merge that kept 12 rows for 4 parts cannot be split over 8, which pads 10 rows to 16.
    with pytest.raises(LayoutError, match="expected 10 or 16 rows"):
        resolve_checkpoint(plan(registry, 8), {EMBEDDING: np.zeros((12, 4), dtype=np.float32)}, registry)


@pytest.mark.parametrize(
    "options, message",
    [
        ("", "strategy 'padded_vocab' needs option 'vocab_size'"),
        ("vocab_size = 0", "option 'vocab_size' of strategy 'padded_vocab': expected values of at least 1"),
        ('vocab_size = 10\nkeep_padding = "yes"', "option 'keep_padding' of strategy 'padded_vocab': expected a boolean"),
        ("vocab_size = 10.5", "option 'vocab_size' of strategy 'padded_vocab'"),
    ],
)
def test_invalid_options_name_rule(registry, options, message):
    with pytest.raises(PlanError) as info:
        plan(registry, 4, options)

    assert f"rule 1 (match = '{EMBEDDING}')" in str(info.value)
    assert message in str(info.value)
