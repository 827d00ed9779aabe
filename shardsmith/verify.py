"""Comparing two checkpoints or two rank sets: names, dtypes, shapes and bytes.

By default tensors must be identical bit for bit; with a tolerance they are compared as numbers
(`|a - b| <= atol + rtol * |b|`, NaN equal to NaN), which is what a check against a run on other
hardware needs. One parameter is read at a time from both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

from . import dtypes as dt
from .engine import same_bytes
from .errors import ShardsmithError
from .rankset import Source, open_source


@dataclass(frozen=True)
class Difference:
    rank: Optional[int]  # None for single checkpoints
    name: str
    kind: str  # "missing", "extra", "dtype", "shape", "bytes", "values", "order"
    detail: str

    def __str__(self) -> str:
        where = f"rank {self.rank}: " if self.rank is not None else ""
        return f"{where}{self.name}: {self.detail}"


# Elements compared at once: the float64 copies a tolerance needs cost 8 bytes per element on
# each side, so a 2 GB parameter is compared in pieces of a few tens of MB.
_CHUNK_ELEMENTS = 1 << 22


def _compare_tensors(a: np.ndarray, b: np.ndarray, dtype: str, rtol: Optional[float], atol: Optional[float]) -> Optional[str]:
    if rtol is None and atol is None:
        return _compare_bytes(a, b)
    return _compare_values(a, b, dtype, rtol or 0.0, atol or 0.0)


def _compare_bytes(a: np.ndarray, b: np.ndarray) -> Optional[str]:
    if same_bytes(a, b):
        return None
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return "bytes differ"
    unsigned = f"u{a.dtype.itemsize}"
    flat_a = a.reshape(-1).view(unsigned)
    flat_b = b.reshape(-1).view(unsigned)
    differing = 0
    first = None
    for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
        end = start + _CHUNK_ELEMENTS
        unequal = flat_a[start:end] != flat_b[start:end]
        count = int(np.count_nonzero(unequal))
        if count and first is None:
            first = start + int(np.argmax(unequal))
        differing += count
    index = [int(i) for i in np.unravel_index(first, a.shape)] if a.ndim else []
    return f"bytes differ ({differing} of {a.size} elements, the first at index {index})"


def _compare_values(a: np.ndarray, b: np.ndarray, dtype: str, rtol: float, atol: float) -> Optional[str]:
    flat_a = a.reshape(-1)
    flat_b = b.reshape(-1)
    # Int4 unpacks to two values per stored byte, so positions count unpacked values.
    per_element = 2 if dt.packed_last_dim(dtype) else 1
    differing = 0
    largest = -1.0
    worst = 0
    for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
        end = start + _CHUNK_ELEMENTS
        fa = dt.to_float64(np.ascontiguousarray(flat_a[start:end]), dtype).reshape(-1)
        fb = dt.to_float64(np.ascontiguousarray(flat_b[start:end]), dtype).reshape(-1)
        close = np.isclose(fa, fb, rtol=rtol, atol=atol, equal_nan=True)
        count = int(close.size - np.count_nonzero(close))
        if not count:
            continue
        differing += count

        with np.errstate(invalid="ignore"):
            diff = np.abs(fa - fb)
        diff[close] = 0
        diff[np.isnan(diff)] = np.inf  # a NaN against a number
        index = int(np.argmax(diff))
        if diff[index] > largest:
            largest, worst = float(diff[index]), start * per_element + index
    if not differing:
        return None

    shape = a.shape[:-1] + (a.shape[-1] * per_element,) if a.ndim else ()
    position = [int(i) for i in np.unravel_index(worst, shape)] if shape else []
    return (
        f"values differ beyond rtol={rtol} atol={atol} in {differing} of {a.size * per_element} elements; "
        f"largest difference {largest:.6g} at index {position}"
    )


def compare_files(a: Source, b: Source, rank: int, rtol: Optional[float], atol: Optional[float]) -> List[Difference]:
    label = rank if a.world_size > 1 else None
    ra, rb = a.readers[rank], b.readers[rank]
    names_a = [i.name for i in ra]
    names_b = [i.name for i in rb]
    set_b = set(names_b)
    diffs: List[Difference] = []
    for name in names_a:
        if name not in set_b:
            diffs.append(Difference(label, name, "missing", f"only in {ra.path}"))
    for name in names_b:
        if name not in set(names_a):
            diffs.append(Difference(label, name, "extra", f"only in {rb.path}"))
    common = [n for n in names_a if n in set_b]
    if [n for n in names_b if n in set(common)] != common:
        diffs.append(Difference(label, "(order)", "order", "the parameters common to both are in a different order"))
    for name in common:
        ia, ib = ra.info(name), rb.info(name)
        if ia.dtype != ib.dtype:
            diffs.append(Difference(label, name, "dtype", f"{ia.dtype} vs {ib.dtype}"))
            continue
        if tuple(ia.shape) != tuple(ib.shape):
            diffs.append(Difference(label, name, "shape", f"{list(ia.shape)} vs {list(ib.shape)}"))
            continue
        if ia.dtype == dt.STRING:
            if ra.string(name) != rb.string(name):
                diffs.append(Difference(label, name, "values", f"{ra.string(name)!r} vs {rb.string(name)!r}"))
            continue
        try:
            detail = _compare_tensors(ra.array(name), rb.array(name), ia.dtype, rtol, atol)
        finally:
            ra.release(name)
            rb.release(name)
        if detail is not None:
            diffs.append(Difference(label, name, "bytes" if rtol is None and atol is None else "values", detail))
    return diffs


def compare(
    a: Sequence[Path],
    b: Sequence[Path],
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    select: Optional[str] = None,
    format: Optional[str] = None,
    cipher: Optional[Any] = None,
) -> List[Difference]:
    """Return every difference between two checkpoints, or two rank sets of the same world size."""
    with open_source(a, select, format, cipher=cipher) as sa, open_source(b, select, format, cipher=cipher) as sb:
        if sa.world_size != sb.world_size:
            raise ShardsmithError(
                f"cannot compare {sa.world_size} rank file(s) with {sb.world_size}; "
                "merge both with their plans first, or reshard one to the other's layout"
            )
        diffs: List[Difference] = []
        for rank in range(sa.world_size):
            diffs.extend(compare_files(sa, sb, rank, rtol, atol))
        return diffs
