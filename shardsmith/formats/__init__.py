"""Checkpoint codecs: MindSpore's ``.ckpt`` and ``.safetensors``, read and written without MindSpore.

Readers memory-map the file and index its headers when they open; :meth:`CheckpointReader.array`
then returns each tensor's content in its storage dtype (see :mod:`shardsmith.dtypes`) without
copying. Writers stream the entries they were opened with, in order, producing the bytes
``mindspore.save_checkpoint`` produces for the same tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Optional, Sequence, Union

from shardsmith.errors import CheckpointFormatError
from shardsmith.formats import ckpt, safetensors
from shardsmith.formats.base import CheckpointReader, CheckpointWriter, TensorInfo

__all__ = [
    "FORMATS",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "detect_format",
    "open_checkpoint",
    "open_writer",
]

FORMATS = ("ckpt", "safetensors")

_CODECS = {"ckpt": ckpt, "safetensors": safetensors}


def _check_format(format: str, path: Optional[Union[str, os.PathLike]] = None) -> str:
    if format not in FORMATS:
        raise CheckpointFormatError(
            f"unknown checkpoint format {format!r}; expected one of {', '.join(FORMATS)}", path=path
        )
    return format


def detect_format(path: Union[str, os.PathLike], override: Optional[str] = None) -> str:
    """Return the format of ``path`` from its suffix, or ``override`` when one is given."""
    if override is not None:
        return _check_format(override, path)
    suffix = Path(path).suffix.lower()
    if suffix[1:] in FORMATS:
        return suffix[1:]
    raise CheckpointFormatError(
        f"cannot tell the checkpoint format from the suffix {suffix or '(none)'!r}",
        path=path,
        hint="Use a .ckpt or .safetensors file name, or pass --format ckpt or --format safetensors",
    )


def open_checkpoint(
    path: Union[str, os.PathLike], format: Optional[str] = None, *, verify_crc: bool = True
) -> CheckpointReader:
    """Open a checkpoint read-only and index its entries.

    A CRC recorded in the file (a ``.ckpt`` trailer, or ``crc_num`` in safetensors metadata) is
    checked when ``verify_crc`` is true, which reads the whole file once.
    """
    codec = _CODECS[detect_format(path, format)]
    return codec.open_reader(path, verify_crc=verify_crc)


def open_writer(
    target: Union[str, os.PathLike, BinaryIO],
    entries: Sequence[TensorInfo],
    format: str,
    *,
    crc_check: bool = False,
) -> CheckpointWriter:
    """Open a writer for ``entries`` in ``format`` on a path or a binary file object.

    The caller writes every entry in order, then closes the writer or leaves its ``with`` block.
    Writing to a temporary name and renaming it into place is also up to the caller.
    """
    path = target if isinstance(target, (str, os.PathLike)) else None
    codec = _CODECS[_check_format(format, path)]
    return codec.open_writer(target, entries, crc_check=crc_check)
