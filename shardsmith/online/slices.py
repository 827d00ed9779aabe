"""Building one target slice whole from source slices, by the layout's copy plan."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import dtypes as dt
from ..engine import ParamMove
from ..layout import Box


def build_slice(move: ParamMove, arrays: Any, rank: int) -> np.ndarray:
    """Return target `rank`'s slice of `move`, from `arrays[source_rank]` storage arrays.

    Each region comes from the lowest source rank holding it (`Layout.copies_into`); what no
    target piece covers (padding) is zeros. When one source box is the whole slice and is
    contiguous, the result is a view of that source and nothing is copied.
    """
    copies = move.source.copies_into(move.target, rank)
    shape = move.target.slice_shapes[rank]
    if len(copies) == 1 and copies[0].target == Box.whole(shape):
        # np.asarray: indexing a 0-d array with () gives a numpy scalar.
        view = np.asarray(arrays[copies[0].source_rank][copies[0].source.slices()])
        if view.flags.c_contiguous:
            return view
    storage = dt.storage_dtype(move.dtype)
    covered = sum(copy.target.size for copy in copies)
    buffer = np.empty(shape, storage) if covered == int(np.prod(shape)) else np.zeros(shape, storage)
    for copy in copies:
        buffer[copy.target.slices()] = arrays[copy.source_rank][copy.source.slices()]
    return buffer
