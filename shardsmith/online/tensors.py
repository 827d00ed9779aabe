"""MindSpore tensors to and from shardsmith's storage arrays, bit for bit.

A storage array (see `shardsmith.dtypes`) has a numpy type of the same itemsize as the
MindSpore dtype; BFloat16 is raw uint16 words. Building a Tensor goes through the numpy type
MindSpore itself uses for each dtype (`mindspore.common.np_dtype.bfloat16`, int8 with
`dtype=qint4x2`), which keeps every bit, NaN payloads included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping

import numpy as np

from .. import dtypes as dt
from ..errors import ValidationError
from ..formats import TensorInfo


def dtype_name(value: Any) -> str:
    """Return the MindSpore dtype name of a Tensor or Parameter ("Float32", "BFloat16", ...)."""
    return str(value.dtype)


def to_storage(value: Any, name: str) -> np.ndarray:
    """Return the content of a Tensor or Parameter as a storage array, without a cast."""
    dtype = dtype_name(value)
    if not dt.is_known(dtype) or dtype == dt.STRING:
        raise ValidationError(f"has dtype {dtype}, which a checkpoint cannot hold", param=name)
    array = value.asnumpy()
    storage = dt.storage_dtype(dtype)
    if array.dtype != storage:
        if array.dtype.itemsize != storage.itemsize:
            raise ValidationError(
                f"asnumpy() returned {array.dtype} for a {dtype} tensor; expected {storage.itemsize}-byte items",
                param=name,
            )
        array = array.view(storage)
    return np.asarray(array, order="C")


def to_tensor(array: np.ndarray, dtype: str) -> Any:
    """Build a mindspore.Tensor of `dtype` holding exactly the bytes of the storage array."""
    import mindspore
    from mindspore.common import np_dtype

    array = np.asarray(array, order="C")
    if dtype == "BFloat16":
        return mindspore.Tensor(array.view(np_dtype.bfloat16))
    if dtype == "Int4":
        return mindspore.Tensor(array, dtype=mindspore.qint4x2)
    return mindspore.Tensor(array)


def to_parameter(array: np.ndarray, dtype: str, name: str) -> Any:
    """Build a mindspore.Parameter named `name`, as `mindspore.load_checkpoint` names them."""
    from mindspore import Parameter

    return Parameter(to_tensor(array, dtype), name=name)


def parameters_of(params: Any) -> Dict[str, Any]:
    """Return name -> Tensor for a dict of Tensors or Parameters, or for a Cell (its parameters by name).

    A Cell's parameters are keyed by `Parameter.name`, the name `mindspore.save_checkpoint` writes.
    """
    if hasattr(params, "parameters_and_names"):
        result: Dict[str, Any] = {}
        for _, param in params.parameters_and_names():
            result.setdefault(param.name, param)
        return result
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(f"expected a dict of Tensors or Parameters, or a Cell, got {type(params).__name__}")


class TensorSlices:
    """One rank's slices held in memory, read like a checkpoint file (headers, `array`, `string`)."""

    def __init__(self, params: Mapping[str, Any], label: str) -> None:
        self.path = Path(label)
        self._values = dict(params)
        self._infos: List[TensorInfo] = []
        for name, value in self._values.items():
            if isinstance(value, str):
                self._infos.append(TensorInfo.of_string(name, value))
                continue
            dtype = dtype_name(value)
            if not dt.is_known(dtype) or dtype == dt.STRING:
                raise ValidationError(f"has dtype {dtype}, which a checkpoint cannot hold", param=name)
            shape = tuple(int(n) for n in value.shape)
            self._infos.append(TensorInfo(name, dtype, shape, dt.expected_nbytes(dtype, shape)))

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self._infos)

    def array(self, name: str) -> np.ndarray:
        return to_storage(self._values[name], name)

    def string(self, name: str) -> str:
        return self._values[name]

    def release(self, name: str) -> None:
        """Nothing to release: the tensors belong to the caller."""

    def close(self) -> None:
        self._values.clear()
