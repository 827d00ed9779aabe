"""MindSpore dtype names and how shardsmith stores and moves each one.

Checkpoint codecs hand out tensor content as numpy arrays in a *storage* dtype: a numpy type with
the same itemsize as the MindSpore type, so that slicing and concatenating the array moves the
exact bytes. No value is ever cast on the way:

- ``BFloat16`` is stored as raw little-endian 16-bit words (``<u2``) because numpy has no
  bfloat16 type, and a trip through float32 would have to be rounded back.
- ``Bool`` is stored as numpy ``?`` (one byte per element).
- ``Int4`` is MindSpore's ``qint4x2``: each element is one byte that contains two 4-bit integers.
  MindSpore 2.10 records the dims of such a tensor in bytes (a ``Tensor`` of dtype qint4x2 built
  from an int8 array of shape (2, 4) saves as dims [2, 4], 8 bytes of content), so the storage
  array is int8 with the recorded shape. The pairs are packed along the last dim: splitting that
  dim changes which 4-bit values share a byte in the logical tensor, so layouts must refuse it
  (see :func:`packed_last_dim`).
- ``str`` entries (``append_dict`` strings) are not arrays: readers return them as Python
  strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

STRING = "str"


@dataclass(frozen=True)
class DType:
    """One MindSpore tensor dtype and its storage and safetensors equivalents."""

    name: str
    storage: np.dtype
    safetensors: str

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


def _dtype(name: str, storage: str, safetensors: str) -> DType:
    return DType(name, np.dtype(storage), safetensors)


# Tensor dtypes that mindspore.load_checkpoint 2.10 accepts (its `tensor_to_ms_type` table),
# plus "str" which is handled apart.
DTYPES = {
    dtype.name: dtype
    for dtype in (
        _dtype("Int8", "<i1", "I8"),
        _dtype("UInt8", "<u1", "U8"),
        _dtype("Int16", "<i2", "I16"),
        _dtype("UInt16", "<u2", "U16"),
        _dtype("Int32", "<i4", "I32"),
        _dtype("UInt32", "<u4", "U32"),
        _dtype("Int64", "<i8", "I64"),
        _dtype("UInt64", "<u8", "U64"),
        _dtype("Float16", "<f2", "F16"),
        _dtype("Float32", "<f4", "F32"),
        _dtype("Float64", "<f8", "F64"),
        _dtype("Bool", "?", "BOOL"),
        _dtype("BFloat16", "<u2", "BF16"),
        # MindSpore saves qint4x2 to safetensors as I8 and marks the tensor with
        # metadata {name: "Int4"}.
        _dtype("Int4", "<i1", "I8"),
    )
}

DTYPE_NAMES: Tuple[str, ...] = tuple(DTYPES) + (STRING,)

# safetensors dtype name -> MindSpore name, for files without an "Int4" metadata mark.
SAFETENSORS_TO_MINDSPORE = {
    dtype.safetensors: dtype.name for dtype in DTYPES.values() if dtype.name != "Int4"
}

# The safetensors metadata value MindSpore writes under a tensor's name for qint4x2 tensors.
SAFETENSORS_INT4_MARK = "Int4"


def is_known(dtype: str) -> bool:
    """Return whether ``dtype`` is a MindSpore dtype name that checkpoints can hold."""
    return dtype in DTYPES or dtype == STRING


def get(dtype: str) -> DType:
    """Return the table row of a tensor dtype; raise KeyError for ``str`` or an unknown name."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KeyError(f"unknown tensor dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from None


def storage_dtype(dtype: str) -> np.dtype:
    """Return the numpy dtype that stores the content of a ``dtype`` tensor byte for byte."""
    return get(dtype).storage


def itemsize(dtype: str) -> int:
    """Return the bytes per element of a tensor as MindSpore records its dims."""
    return get(dtype).itemsize


def storage_shape(dtype: str, shape: Sequence[int]) -> Tuple[int, ...]:
    """Return the shape of the storage array for a tensor of recorded ``shape``.

    It is the recorded shape for every dtype, Int4 included, because MindSpore counts an Int4
    tensor's dims in packed bytes. A split along any dim of the storage array therefore moves
    whole bytes. :func:`packed_last_dim` tells whether it is also a valid split of the logical
    tensor.
    """
    get(dtype)
    return tuple(int(dim) for dim in shape)


def expected_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Return the content size of a tensor: the product of its dims times its itemsize."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * itemsize(dtype)


def packed_last_dim(dtype: str) -> bool:
    """Return whether the last dim packs several values per element (Int4: two per byte)."""
    return dtype == "Int4"


def safetensors_name(dtype: str) -> str:
    """Return the safetensors dtype name MindSpore writes for ``dtype`` (Int4 -> I8)."""
    return get(dtype).safetensors


def from_safetensors(safetensors_dtype: str, metadata_mark: Optional[str] = None) -> str:
    """Return the MindSpore dtype name of a safetensors tensor.

    ``metadata_mark`` is the file's ``__metadata__`` value under the tensor's name, which is
    "Int4" for a qint4x2 tensor stored as I8. Raise KeyError for a dtype MindSpore cannot hold.
    """
    if safetensors_dtype == "I8" and metadata_mark == SAFETENSORS_INT4_MARK:
        return "Int4"
    try:
        return SAFETENSORS_TO_MINDSPORE[safetensors_dtype]
    except KeyError:
        raise KeyError(
            f"safetensors dtype {safetensors_dtype!r} has no MindSpore equivalent; expected one of "
            f"{', '.join(SAFETENSORS_TO_MINDSPORE)}"
        ) from None


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    """Return the values of a storage array as float64, for numeric comparison only.

    BFloat16 words become the upper half of a float32, which is exact. Int4 bytes are unpacked
    into two signed values each, low nibble first, so the last dim doubles.
    NOTE: the nibble order follows the common qint4x2 convention and is unchecked against a
    MindSpore kernel. It matters only when comparing against values unpacked elsewhere.
    """
    if dtype == STRING:
        raise TypeError("a str entry has no numeric value")
    if array.dtype != storage_dtype(dtype):
        raise TypeError(f"expected a {storage_dtype(dtype)} storage array for {dtype}, got {array.dtype}")

    if dtype == "BFloat16":
        words = array.astype(np.uint32) << np.uint32(16)
        return words.view(np.float32).astype(np.float64)

    if dtype == "Int4":
        packed = array.view(np.uint8)
        low = (packed & 0x0F).astype(np.int8)
        high = (packed >> 4).astype(np.int8)
        low = np.where(low > 7, low - 16, low)
        high = np.where(high > 7, high - 16, high)
        unpacked = np.stack([low, high], axis=-1)
        shape = packed.shape[:-1] + (packed.shape[-1] * 2,) if packed.ndim else (2,)
        return unpacked.reshape(shape).astype(np.float64)

    return array.astype(np.float64)
