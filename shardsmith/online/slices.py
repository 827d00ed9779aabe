"""Building one target slice whole from source slices, by the layout's copy plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

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


class MemoryReader:
    """One rank's gathered slices held in memory, with the content methods of a CheckpointReader.

    `engine._Arrays` reads source slices through these methods, so `engine.check_replicas` runs
    on gathered slices exactly as on files. There are no pages to map or drop here.
    """

    def __init__(self, label: str, arrays: Dict[str, np.ndarray]) -> None:
        self.path = Path(label)
        self._arrays = arrays

    def array(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def release(self, name: str) -> None:
        """Nothing to release: the arrays go when the caller drops them."""

    def populate(self, name: str, start: int, stop: int) -> None:
        """Nothing to read ahead: the bytes are in memory."""

    def release_content(self, name: str, start: int, stop: int) -> None:
        """Nothing to release: the arrays go when the caller drops them."""
