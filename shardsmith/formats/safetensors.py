"""The ``.safetensors`` format as MindSpore 2.10 reads and writes it, without the safetensors package.

A file is an 8-byte little-endian header size, a JSON header padded with spaces to a multiple of
8 bytes, then the tensor data. ``mindspore.save_checkpoint(..., format="safetensors")`` writes
through ``safetensors.numpy.save_file`` with ``__metadata__`` ``{"format": "ms"}``, plus
``{name: "Int4"}`` for each qint4x2 tensor (stored as I8) and, with ``crc_check=True``,
``"crc_num"``: the decimal CRC-32 of each tensor's UTF-8 name followed by its bytes, over the
tensors in sorted name order. It lays the data out by the safetensors dtype (widest first), then
name, and cannot save str values (numpy's ``<U`` type has no safetensors dtype). It saves and
loads BF16 through its own numpy bfloat16 type, which MindSpore 2.10 provides only under numpy 1.x.

MindSpore's loader (``mindspore/parallel/transform_safetensors.py``) requires the header's
tensors in data order, contiguous from offset 0 to the end of the file. It does not require the
dtype order, so this writer lays the data out in the order of its entries.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from shardsmith import dtypes
from shardsmith.formats.base import (
    CheckpointReader,
    CheckpointWriter,
    TensorInfo,
    _Entry,
    check_tensor_header,
    write_all,
)

# The largest header MindSpore 2.10 and the safetensors library accept.
MAX_HEADER_SIZE = 100 * 1000 * 1000

METADATA_KEY = "__metadata__"
CRC_KEY = "crc_num"

# Bytes read at once when the CRC of a file is computed.
_CRC_READ_SIZE = 16 * 1024 * 1024

_NOT_SAFETENSORS_HINT = "Check that it is a .safetensors file, or name its format explicitly"


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: List[Tuple[str, object]]) -> Dict[str, object]:
    result: Dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"the header names {key!r} twice")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsReader(CheckpointReader):
    """Reader of ``.safetensors`` files; the file order is the order of the tensors' data."""

    format = "safetensors"

    def _index(self) -> None:
        mapping = self._mapping()
        if self._size < 8:
            raise self._error(
                f"is {self._size} bytes, too short for the 8-byte safetensors header size",
                hint=_NOT_SAFETENSORS_HINT,
            )
        header_size = int.from_bytes(mapping[:8], "little")
        if header_size > MAX_HEADER_SIZE:
            raise self._error(
                f"declares a {header_size}-byte header, more than the {MAX_HEADER_SIZE}-byte limit",
                hint=_NOT_SAFETENSORS_HINT,
            )
        if header_size > self._size - 8:
            raise self._error(
                f"truncated: declares a {header_size}-byte header but only {self._size - 8} bytes follow",
                hint=_NOT_SAFETENSORS_HINT,
            )

        header = self._parse_header(mapping[8 : 8 + header_size])
        self.metadata = self._take_metadata(header)
        data_start = 8 + header_size
        data_size = self._size - data_start

        located = []
        for index, (name, description) in enumerate(header.items()):
            info, begin, end = self._parse_tensor(name, description, data_size)
            located.append((begin, index, info, end))
        located.sort(key=lambda item: (item[0], item[1]))

        expected = 0
        for begin, _, info, end in located:
            if begin != expected:
                raise self._error(
                    f"data_offsets start at {begin}, but the previous tensor ends at {expected}; "
                    "tensor data must be contiguous and must not overlap",
                    param=info.name,
                )
            expected = end
            self._add(_Entry(info, [(data_start + begin, end - begin)], data_start + begin, data_start + end))
        if expected != data_size:
            raise self._error(
                f"{data_size - expected} bytes follow the last tensor's data; the header does not "
                "describe the whole file",
                hint=_NOT_SAFETENSORS_HINT,
            )

        self.has_crc = CRC_KEY in self.metadata
        if self.verify_crc and self.has_crc:
            self._verify_crc(self.metadata[CRC_KEY])

    def _parse_header(self, raw: bytes) -> Dict[str, object]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except _DuplicateKey as error:
            raise self._error(f"invalid header: {error}") from None
        except UnicodeDecodeError:
            raise self._error("the header is not UTF-8 text", hint=_NOT_SAFETENSORS_HINT) from None
        except RecursionError:
            raise self._error("the header is not valid JSON: nested too deeply", hint=_NOT_SAFETENSORS_HINT) from None
        except ValueError as error:
            raise self._error(f"the header is not valid JSON: {error}", hint=_NOT_SAFETENSORS_HINT) from None
        if not isinstance(header, dict):
            raise self._error(
                f"the header is a JSON {type(header).__name__}, not an object", hint=_NOT_SAFETENSORS_HINT
            )
        return header

    def _take_metadata(self, header: Dict[str, object]) -> Dict[str, str]:
        metadata = header.pop(METADATA_KEY, None)
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
            raise self._error(f"invalid header: {METADATA_KEY} must map names to strings")
        return metadata

    def _parse_tensor(self, name: str, description: object, data_size: int) -> Tuple[TensorInfo, int, int]:
        if not isinstance(description, dict):
            raise self._error("invalid header: the tensor description is not an object", param=name)
        safetensors_dtype = description.get("dtype")
        shape = description.get("shape")
        offsets = description.get("data_offsets")
        if not isinstance(safetensors_dtype, str):
            raise self._error("invalid header: dtype is missing or not a string", param=name)
        if not isinstance(shape, list) or not all(_is_int(dim) for dim in shape):
            raise self._error(f"invalid header: shape {shape!r} is not a list of integers", param=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(offset) for offset in offsets)):
            raise self._error(f"invalid header: data_offsets {offsets!r} is not a pair of integers", param=name)

        marks = self.metadata.get(name)
        try:
            dtype = dtypes.from_safetensors(safetensors_dtype, marks)
        except KeyError as error:
            raise self._error(error.args[0], param=name) from None

        begin, end = offsets
        if not 0 <= begin <= end:
            raise self._error(f"invalid header: data_offsets {offsets} are not ascending", param=name)
        if end > data_size:
            raise self._error(
                f"truncated: data_offsets {offsets} end past the {data_size} bytes of data in the file",
                param=name,
                hint="The file is incomplete; copy or save it again",
            )
        check_tensor_header(self.path, name, dtype, shape, end - begin)
        return TensorInfo(name, dtype, tuple(shape), end - begin), begin, end

    def _verify_crc(self, recorded: str) -> None:
        try:
            stored = int(recorded)
        except ValueError:
            raise self._error(f"the {CRC_KEY} metadata {recorded!r} is not a number") from None
        crc = 0
        # Read through the file, not the mapping, so the check leaves nothing resident.
        with open(self.path, "rb", buffering=0) as file:
            for name in sorted(self._entries):
                crc = zlib.crc32(name.encode("utf-8"), crc)
                (offset, remaining), = self._entries[name].content
                file.seek(offset)
                while remaining:
                    chunk = file.read(min(_CRC_READ_SIZE, remaining))
                    if not chunk:
                        raise self._error("file shrank while it was read", param=name)
                    crc = zlib.crc32(chunk, crc)
                    remaining -= len(chunk)
        if crc != stored:
            raise self._error(
                f"CRC-32 check failed: the {CRC_KEY} metadata records {stored} but the tensors hash to "
                f"{crc}, so the file is damaged",
                hint="Copy it again from the original, or open it without the CRC check to read it anyway",
            )


# CRC-32 of A+B from the CRCs of A and B and the length of B, as zlib's crc32_combine computes
# it (GF(2) matrix powers of the "append one zero bit" operator). The writer needs it because
# MindSpore's crc_num covers the tensors in name order while the data is written in entry order.
def _gf2_times(matrix: List[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: List[int]) -> List[int]:
    return [_gf2_times(matrix, matrix[row]) for row in range(32)]


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """Return the CRC-32 of the concatenation of two byte strings from their CRCs."""
    if length2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << bit for bit in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _gf2_square(even)
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


# Reserved in the header for the crc_num value until the data has been written.
_CRC_PLACEHOLDER = "0" * 10


class SafetensorsWriter(CheckpointWriter):
    """Writer of ``.safetensors`` files that ``mindspore.load_checkpoint`` reads.

    The header is written first, so ``crc_check=True`` needs a seekable target: the header is
    written with a placeholder and rewritten, padded to the same size, once the CRC is known.
    For the same entries in MindSpore's order the bytes equal MindSpore's, with two exceptions.
    MindSpore 2.10 leaves the order of the ``__metadata__`` keys to a Rust HashMap, so it differs
    from run to run; here it is "format", the Int4 marks, then "crc_num". With a CRC, the header
    may also end in up to 8 more padding spaces.
    """

    format = "safetensors"

    def _check_entries(self) -> None:
        super()._check_entries()
        for info in self.entries:
            if info.is_string:
                raise self._error(
                    "str values cannot be stored in safetensors (MindSpore 2.10 cannot save them "
                    "in that format either); write a .ckpt instead",
                    param=info.name,
                )
            if info.name == METADATA_KEY:
                raise self._error(f"{METADATA_KEY!r} is reserved for the safetensors metadata", param=info.name)

    def _header(self, crc: Optional[str]) -> bytes:
        header: Dict[str, object] = {}
        if self.entries:
            metadata = {"format": "ms"}
            for name in sorted(info.name for info in self.entries if info.dtype == "Int4"):
                metadata[name] = dtypes.SAFETENSORS_INT4_MARK
            if crc is not None:
                metadata[CRC_KEY] = crc
            header[METADATA_KEY] = metadata
        offset = 0
        for info in self.entries:
            header[info.name] = {
                "dtype": dtypes.safetensors_name(info.dtype),
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def _begin(self) -> None:
        self._crcs: Dict[str, Tuple[int, int]] = {}
        with_crc = self.crc_check and bool(self.entries)
        header = self._header(_CRC_PLACEHOLDER if with_crc else None)
        header += b" " * (-len(header) % 8)
        self._header_size = len(header)
        if with_crc:
            if not self._file.seekable():
                raise self._error("crc_check needs a seekable target, because the CRC goes in the header")
            self._header_offset = self._file.tell()
        write_all(self._file, struct.pack("<Q", len(header)))
        write_all(self._file, header)

    def _write_tensor(self, info: TensorInfo, chunks: Iterator[memoryview]) -> None:
        name = info.name.encode("utf-8")
        crc = zlib.crc32(name) if self.crc_check else 0
        for chunk in chunks:
            write_all(self._file, chunk)
            if self.crc_check:
                crc = zlib.crc32(chunk, crc)
        self._crcs[info.name] = (crc, len(name) + info.nbytes)

    def _write_string(self, info: TensorInfo, content: bytes) -> None:
        raise AssertionError("str entries are rejected when the writer opens")

    def _finish(self) -> None:
        if not (self.crc_check and self.entries):
            return
        crc = 0
        for name in sorted(self._crcs):
            part, length = self._crcs[name]
            crc = crc32_combine(crc, part, length)
        header = self._header(str(crc))
        header += b" " * (self._header_size - len(header))
        self._file.seek(self._header_offset + 8)
        write_all(self._file, header)
        self._file.seek(0, 2)


def open_reader(path, *, verify_crc: bool = True) -> SafetensorsReader:
    return SafetensorsReader(path, verify_crc=verify_crc)


def open_writer(target, entries, *, crc_check: bool = False) -> SafetensorsWriter:
    return SafetensorsWriter(target, entries, crc_check=crc_check)
