"""The layout model against MindSpore's convention, worked out by hand."""

from __future__ import annotations

import pytest

from shardsmith.errors import LayoutError
from shardsmith.layout import Box, Layout, Piece, from_tensor_map, rank_coordinate


def full_boxes(layout: Layout):
    return [str(pieces[0].full) for pieces in layout.pieces]


def test_rank_coordinate_is_row_major():
    assert [rank_coordinate(r, [2, 3]) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_tensor_map_2x2_grid_matches_mindspore_tutorial():
    # dev_matrix [2, 2], tensor_map [1, 0] on [2, 4]: rank 1 holds row 0, columns 2-3.
    layout = from_tensor_map([2, 4], [2, 2], [1, 0])
    assert full_boxes(layout) == ["[0:1, 0:2]", "[0:1, 2:4]", "[1:2, 0:2]", "[1:2, 2:4]"]
    assert layout.slice_shapes == ((1, 2),) * 4


def test_tensor_map_unmapped_axis_makes_copies():
    # dev_matrix [2, 2], tensor_map [0, -1]: dim 0 split by the last axis, the first axis holds copies.
    layout = from_tensor_map([8, 4], [2, 2], [0, -1])
    assert full_boxes(layout) == ["[0:4, 0:4]", "[4:8, 0:4]", "[0:4, 0:4]", "[4:8, 0:4]"]
    assert layout.replica_groups() == [[0, 2], [1, 3]]
    assert [(m, c) for m, _, c, _ in layout.copies()] == [(0, 2), (1, 3)]


def test_tensor_map_three_axis_device_matrix():
    # dev_matrix [2, 2, 2]; dim 0 by axis 2 (outermost), dim 1 by axis 0 (innermost); axis 1 copies.
    layout = from_tensor_map([4, 4], [2, 2, 2], [2, 0])
    assert full_boxes(layout) == [
        "[0:2, 0:2]", "[0:2, 2:4]", "[0:2, 0:2]", "[0:2, 2:4]",
        "[2:4, 0:2]", "[2:4, 2:4]", "[2:4, 0:2]", "[2:4, 2:4]",
    ]


def test_tensor_map_entry_with_two_axes():
    layout = from_tensor_map([8], [2, 2], [[1, 0]])
    assert full_boxes(layout) == ["[0:2]", "[2:4]", "[4:6]", "[6:8]"]


def test_tensor_map_uneven_dim_names_dim_and_counts():
    with pytest.raises(LayoutError, match=r"dim 0 of size 6 does not divide into 4 parts"):
        from_tensor_map([6, 8], [4], [0, -1], name="w")


@pytest.mark.parametrize(
    "dev_matrix, tensor_map, message",
    [
        ([2, 2], [0], "has 1 entries but the tensor has 2 dimensions"),
        ([2, 2], [2, -1], "names no axis"),
        ([2, 2], [0, 0], "uses device axis 0 twice"),
    ],
)
def test_tensor_map_invalid(dev_matrix, tensor_map, message):
    with pytest.raises(LayoutError, match=message):
        from_tensor_map([4, 4], dev_matrix, tensor_map)


def test_coverage_detects_gap_and_overlap():
    half = Box((0,), (2,))
    gap = Layout((4,), ((2,), (2,)), ((Piece(half, half),), (Piece(half, Box((1,), (3,))),)))
    with pytest.raises(LayoutError, match="overlap"):
        gap.check_coverage("x")
    missing = Layout((4,), ((2,),), ((Piece(half, half),),))
    with pytest.raises(LayoutError, match="cover 2 of 4 elements"):
        missing.check_coverage("x")


def test_copies_into_reads_each_element_from_its_main_copy():
    source = from_tensor_map([8, 4], [2, 2], [0, -1])  # rows in 2, copies on ranks 2 and 3
    target = from_tensor_map([8, 4], [4], [-1, 0])  # columns in 4
    copies = source.copies_into(target, 1)
    assert [(c.source_rank, str(c.source), str(c.target)) for c in copies] == [
        (0, "[0:4, 1:2]", "[0:4, 0:1]"),
        (1, "[0:4, 1:2]", "[4:8, 0:1]"),
    ]


def test_project_keeps_split_of_kept_dims():
    layout = from_tensor_map([4, 6], [2, 2], [1, 0])
    rows = layout.project([0])
    assert rows.full_shape == (4,)
    assert [str(p[0].full) for p in rows.pieces] == ["[0:2]", "[0:2]", "[2:4]", "[2:4]"]
