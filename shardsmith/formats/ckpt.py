"""MindSpore's ``.ckpt`` format, read and written without protobuf or MindSpore.

The schema (``mindspore/train/checkpoint_pb2.py``, MindSpore 2.10)::

    message Checkpoint { repeated Value value = 1; }
    message Value { required string tag = 1;
                    oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

``mindspore.save_checkpoint`` writes one serialized one-Value ``Checkpoint`` per record, back to
back, which protobuf parses as a single message. A tensor of more than 512 MiB becomes several
consecutive records with the same tag and the full dims. Each record carries a piece of the
C-order content, and the loader joins consecutive same-tag records.

With ``crc_check=True`` the file ends with ``b"crc_num"`` and the CRC-32 of every byte before it
as 10 big-endian bytes. The loader strips such a trailer whenever the last 17 bytes start with
``b"crc_num"``.
"""

from __future__ import annotations

import zlib
from typing import Iterator, List, Optional, Tuple

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

# Content bytes per record. MindSpore 2.10 cuts a Tensor's bytes into chunks of
# 1024 * SLICE_SIZE (SLICE_SIZE = 512 * 1024, in KiB) in `_write_parameter_bytes_data`.
# Read at call time, so tests can patch it small.
PIECE_SIZE = 512 * 1024 * 1024

CRC_MARK = b"crc_num"
CRC_TRAILER_SIZE = len(CRC_MARK) + 10

# Bytes read at once when the CRC of a file is computed.
_CRC_READ_SIZE = 16 * 1024 * 1024

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_START_GROUP = 3
_END_GROUP = 4
_FIXED32 = 5

_NOT_A_CHECKPOINT_HINT = (
    "Check that it is a .ckpt written by mindspore.save_checkpoint; encrypted checkpoints "
    "(saved with enc_key) must be decrypted with MindSpore first"
)


class _WireError(Exception):
    """A protobuf encoding error at a byte position, before the parameter is known."""

    def __init__(self, message: str, position: int, truncated: bool = False) -> None:
        super().__init__(message)
        self.position = position
        self.truncated = truncated


class _Record:
    __slots__ = ("name", "dims", "dtype", "content", "has_tensor", "is_map")

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self.dims: List[int] = []
        self.dtype: Optional[str] = None
        self.content: Optional[Tuple[int, int]] = None
        self.has_tensor = False
        self.is_map = False


class _Wire:
    """Protobuf wire-format decoding over a buffer, with every read bounds-checked.

    A read past ``file_end`` means the file is truncated. A read past the end of an enclosing
    message that still lies inside the file means the message is malformed.
    """

    def __init__(self, buffer, file_end: int) -> None:
        self.buffer = buffer
        self.file_end = file_end

    def varint(self, position: int, end: int) -> Tuple[int, int]:
        buffer = self.buffer
        if position >= end:
            raise _WireError("a varint runs past the end", position, truncated=end >= self.file_end)
        byte = buffer[position]
        if byte < 0x80:
            return byte, position + 1
        start = position
        result = byte & 0x7F
        shift = 7
        position += 1
        while True:
            if position >= end:
                raise _WireError("a varint runs past the end", start, truncated=end >= self.file_end)
            byte = buffer[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                if result >= 1 << 64:
                    raise _WireError("a varint is longer than 64 bits", start)
                return result, position
            shift += 7
            if shift >= 70:
                raise _WireError("a varint is longer than 10 bytes", start)

    def key(self, position: int, end: int) -> Tuple[int, int, int]:
        """Read a field key; return the field number, the wire type and the next position."""
        key, next_position = self.varint(position, end)
        if key >> 3 == 0:
            raise _WireError("invalid protobuf field number 0", position)
        return key >> 3, key & 7, next_position

    def length_delimited(self, position: int, end: int) -> Tuple[int, int]:
        """Read a length prefix; return the span's start and end."""
        start = position
        length, position = self.varint(position, end)
        if length > end - position:
            raise _WireError(
                f"a field at byte {start} declares {length} bytes but only {end - position} remain",
                start,
                truncated=end >= self.file_end,
            )
        return position, position + length

    def skip(self, wire_type: int, position: int, end: int) -> int:
        """Skip an unknown field's value; return the position after it."""
        if wire_type == _VARINT:
            return self.varint(position, end)[1]
        if wire_type == _LENGTH_DELIMITED:
            return self.length_delimited(position, end)[1]
        if wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            if size > end - position:
                raise _WireError(
                    "a fixed-size field runs past the end", position, truncated=end >= self.file_end
                )
            return position + size
        # The schema uses no groups (wire types 3, 4) and wire types 6, 7 do not exist.
        raise _WireError(f"invalid protobuf wire type {wire_type}", position)

    def text(self, start: int, end: int, what: str) -> str:
        try:
            return self.buffer[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _WireError(f"{what} is not valid UTF-8", start) from None


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class CkptReader(CheckpointReader):
    """Reader of MindSpore ``.ckpt`` files."""

    format = "ckpt"

    def _index(self) -> None:
        mapping = self._mapping()
        records_end = self._size
        has_trailer = self._size >= CRC_TRAILER_SIZE and (
            mapping[self._size - CRC_TRAILER_SIZE : self._size - 10] == CRC_MARK
        )
        if has_trailer:
            self.has_crc = True
            records_end -= CRC_TRAILER_SIZE
            if self.verify_crc:
                self._verify_crc(records_end)

        wire = _Wire(mapping, records_end)
        group: Optional[_Entry] = None
        position = 0
        while position < records_end:
            record_start = position
            try:
                field, wire_type, position = wire.key(position, records_end)
                if field != 1 or wire_type != _LENGTH_DELIMITED:
                    position = wire.skip(wire_type, position, records_end)
                    continue
                value_start, position = wire.length_delimited(position, records_end)
            except _WireError as error:
                raise self._wire_error(error, wire, record_start, records_end) from None
            record = self._parse_value(wire, record_start, value_start, position)
            group = self._add_record(record, record_start, position, group)

        if group is not None:
            self._close_group(group)
        if not self._entries:
            raise self._error(
                "contains no parameter records, so it is not a MindSpore checkpoint", hint=_NOT_A_CHECKPOINT_HINT
            )

    def _verify_crc(self, records_end: int) -> None:
        stored = int.from_bytes(self._mapping()[records_end + len(CRC_MARK) : self._size], "big")
        crc = 0
        # Read through the file, not the mapping, so the check does not leave the whole file
        # resident in this process.
        with open(self.path, "rb", buffering=0) as file:
            remaining = records_end
            while remaining:
                chunk = file.read(min(_CRC_READ_SIZE, remaining))
                if not chunk:
                    raise self._error(f"file shrank to {records_end - remaining} bytes while it was read")
                crc = zlib.crc32(chunk, crc)
                remaining -= len(chunk)
        if crc != stored:
            raise self._error(
                f"CRC-32 check failed: the crc_num trailer records {stored:#010x} but the records hash "
                f"to {crc:#010x}, so the file is damaged",
                hint="Copy it again from the original, or open it without the CRC check to read it anyway",
            )

    def _parse_value(self, wire: _Wire, record_start: int, start: int, end: int) -> _Record:
        """Parse the Value message in ``[start, end)`` of the record that begins at ``record_start``."""
        record = _Record()
        position = start
        try:
            while position < end:
                field, wire_type, position = wire.key(position, end)
                if wire_type != _LENGTH_DELIMITED or field not in (1, 2, 3):
                    position = wire.skip(wire_type, position, end)
                    continue
                field_start, position = wire.length_delimited(position, end)
                if field == 1:
                    record.name = wire.text(field_start, position, "the parameter name")
                elif field == 2:
                    if record.has_tensor:
                        raise _WireError("a record contains two tensor fields", field_start)
                    record.has_tensor = True
                    self._parse_tensor(wire, field_start, position, record)
                else:
                    record.is_map = True
        except _WireError as error:
            raise self._wire_error(error, wire, record_start, end, record.name) from None

        if record.name is None:
            raise self._error(
                f"the record at byte {record_start} has no parameter name (tag)", hint=_NOT_A_CHECKPOINT_HINT
            )
        if record.is_map:
            raise self._error(
                "maptensor records cannot be moved as bytes",
                param=record.name,
                hint="shardsmith handles dense tensors only; drop the MapParameter before saving",
            )
        if not record.has_tensor:
            raise self._error(f"the record at byte {record_start} contains no tensor", param=record.name)
        if record.dtype is None:
            raise self._error(f"the record at byte {record_start} has no tensor_type", param=record.name)
        if record.content is None:
            raise self._error(f"the record at byte {record_start} has no tensor_content", param=record.name)
        return record

    @staticmethod
    def _parse_tensor(wire: _Wire, start: int, end: int, record: _Record) -> None:
        position = start
        dims = record.dims
        while position < end:
            field, wire_type, position = wire.key(position, end)
            if field == 1 and wire_type == _VARINT:
                dim, position = wire.varint(position, end)
                dims.append(_signed64(dim))
            elif field == 1 and wire_type == _LENGTH_DELIMITED:
                packed_start, position = wire.length_delimited(position, end)
                while packed_start < position:
                    dim, packed_start = wire.varint(packed_start, position)
                    dims.append(_signed64(dim))
            elif field == 2 and wire_type == _LENGTH_DELIMITED:
                type_start, position = wire.length_delimited(position, end)
                record.dtype = wire.text(type_start, position, "the tensor_type")
            elif field == 3 and wire_type == _LENGTH_DELIMITED:
                content_start, position = wire.length_delimited(position, end)
                record.content = (content_start, position - content_start)
            else:
                position = wire.skip(wire_type, position, end)

    def _add_record(
        self, record: _Record, record_start: int, record_end: int, group: Optional[_Entry]
    ) -> _Entry:
        """Append a record to the open group when it is the next piece of it, else start one."""
        name = record.name
        assert name is not None
        assert record.content is not None
        assert record.dtype is not None
        if group is not None and group.info.name == name:
            first = group.info
            if tuple(record.dims) != first.shape or record.dtype != first.dtype:
                raise self._error(
                    f"the piece at byte {record_start} has dims {record.dims} and dtype {record.dtype}, "
                    f"but the first piece has {list(first.shape)} and {first.dtype}",
                    param=name,
                )
            group.content.append(record.content)
            group.last_byte = record_end
            group.info = TensorInfo(name, first.dtype, first.shape, first.nbytes + record.content[1])
            return group

        if group is not None:
            self._close_group(group)
        if name in self._entries:
            raise self._error(
                f"is repeated at byte {record_start} after other parameters, but a checkpoint "
                "contains each parameter once",
                param=name,
            )
        info = TensorInfo(name, record.dtype, tuple(record.dims), record.content[1])
        return _Entry(info, [record.content], record_start, record_end)

    def _close_group(self, entry: _Entry) -> None:
        info = entry.info
        check_tensor_header(self.path, info.name, info.dtype, info.shape, info.nbytes)
        self._add(entry)

    def _wire_error(
        self, error: _WireError, wire: _Wire, start: int, end: int, name: Optional[str] = None
    ):
        """Turn a wire error into a CheckpointFormatError naming the parameter where it can."""
        if name is None:
            name = self._peek_name(wire, start, end)
        if error.truncated:
            message = f"truncated at byte {self._size} inside "
            message += f"the record that starts at byte {start}" if name is None else "its record"
            message += f" ({error})"
            return self._error(message, param=name, hint="The file is incomplete; copy or save it again")
        return self._error(
            f"not a valid checkpoint: {error} at byte {error.position}", param=name, hint=_NOT_A_CHECKPOINT_HINT
        )

    @staticmethod
    def _peek_name(wire: _Wire, start: int, end: int) -> Optional[str]:
        """Return the tag of the record at ``start`` if its first bytes are intact, else None."""
        try:
            key, position = wire.varint(start, end)
            if key != (1 << 3 | _LENGTH_DELIMITED):
                return None
            length, position = wire.varint(position, end)
            key, position = wire.varint(position, end)
            if key != (1 << 3 | _LENGTH_DELIMITED):
                return None
            name_start, name_end = wire.length_delimited(position, end)
            return wire.text(name_start, name_end, "the parameter name")
        except _WireError:
            return None


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def record_header(name: bytes, dims, dtype: bytes, content_size: int) -> bytes:
    """Return the bytes of one record up to its tensor_content, as protobuf serializes them.

    Fields come in field-number order and dims unpacked (proto2 ``repeated int64``), which is
    what ``Checkpoint.SerializeToString()`` produces for a one-Value message.
    """
    tensor_head = b"".join(b"\x08" + _encode_varint(dim) for dim in dims)
    tensor_head += b"\x12" + _encode_varint(len(dtype)) + dtype
    tensor_head += b"\x1a" + _encode_varint(content_size)
    tensor_size = len(tensor_head) + content_size
    value_head = b"\x0a" + _encode_varint(len(name)) + name
    value_head += b"\x12" + _encode_varint(tensor_size) + tensor_head
    return b"\x0a" + _encode_varint(len(value_head) + content_size) + value_head


class CkptWriter(CheckpointWriter):
    """Writer of ``.ckpt`` files byte-identical to ``mindspore.save_checkpoint`` of the same tensors.

    One deviation: a tensor with no content (a 0 in its shape) is written as one record with
    empty content. MindSpore 2.10 writes no record at all for it, so the parameter is lost.
    """

    format = "ckpt"

    def _begin(self) -> None:
        self._crc = 0

    def _emit(self, data) -> None:
        write_all(self._file, data)
        if self.crc_check:
            self._crc = zlib.crc32(data, self._crc)

    def _write_tensor(self, info: TensorInfo, chunks: Iterator[memoryview]) -> None:
        name = info.name.encode("utf-8")
        dtype = info.dtype.encode("ascii")
        piece_size = PIECE_SIZE
        sizes = [min(piece_size, info.nbytes - start) for start in range(0, info.nbytes, piece_size)] or [0]
        pending = memoryview(b"")
        for size in sizes:
            self._emit(record_header(name, info.shape, dtype, size))
            remaining = size
            while remaining:
                if not pending:
                    pending = next(chunks)
                part = pending[:remaining]
                pending = pending[len(part) :]
                self._emit(part)
                remaining -= len(part)

    def _write_string(self, info: TensorInfo, content: bytes) -> None:
        # MindSpore writes a str value as a numpy array record: always one piece, dims [0].
        header = record_header(info.name.encode("utf-8"), [0], dtypes.STRING.encode("ascii"), len(content))
        self._emit(header)
        self._emit(content)

    def _finish(self) -> None:
        if self.crc_check:
            write_all(self._file, CRC_MARK + self._crc.to_bytes(10, "big"))


def open_reader(path, *, verify_crc: bool = True) -> CkptReader:
    return CkptReader(path, verify_crc=verify_crc)


def open_writer(target, entries, *, crc_check: bool = False) -> CkptWriter:
    return CkptWriter(target, entries, crc_check=crc_check)
