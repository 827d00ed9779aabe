"""What every checkpoint codec shares: the tensor header, the memory-mapped reader and the
sequential writer.

A reader indexes a file once when it opens (headers only) and then hands out each tensor's
content as a numpy view of the mapping. A parameter costs only the pages it touches, and
:meth:`CheckpointReader.release` drops those again. A writer streams records in the
order it was given and never holds more than one bounded chunk of a tensor beyond what the
caller passed in.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from shardsmith import dtypes
from shardsmith.errors import CheckpointFormatError

PathLike = Union[str, os.PathLike]

# Bytes copied at once when a non-contiguous array is written out in C order.
COPY_CHUNK_SIZE = 64 * 1024 * 1024

# numpy 1.x supports at most 32 dims (numpy 2 supports 64); a record with more cannot be
# turned into an array on every supported numpy.
MAX_NDIM = 32

_PAGE_SIZE = mmap.PAGESIZE

# numpy's limit on an array's size in bytes, counted over its non-zero dims (npy_intp on 64-bit
# platforms).
MAX_ARRAY_BYTES = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """The header of one checkpoint entry.

    ``dtype`` is the MindSpore dtype name ("Float32", "BFloat16", ..., or "str"), ``shape`` the
    dims MindSpore records (``()`` for a 0-d tensor, ``(0,)`` for a str value) and ``nbytes``
    the size of the content in the file.
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int

    @property
    def is_string(self) -> bool:
        return self.dtype == dtypes.STRING

    @property
    def storage_dtype(self) -> np.dtype:
        return dtypes.storage_dtype(self.dtype)

    @property
    def storage_shape(self) -> Tuple[int, ...]:
        return dtypes.storage_shape(self.dtype, self.shape)

    @classmethod
    def of_array(cls, name: str, dtype: str, array: np.ndarray) -> "TensorInfo":
        """Build the header of a tensor whose storage array is ``array``."""
        return cls(name, dtype, tuple(int(dim) for dim in array.shape), int(array.nbytes))

    @classmethod
    def of_string(cls, name: str, value: str) -> "TensorInfo":
        """Build the header of a str entry as MindSpore saves it (UTF-32 code units, dims [0])."""
        return cls(name, dtypes.STRING, (0,), len(encode_string(value)))


def encode_string(value: str) -> bytes:
    """Encode a str entry the way numpy stores ``np.array(value)``: UTF-32-LE code units.

    numpy gives the empty string one NUL code unit (dtype ``<U1``), so "" takes 4 bytes.
    """
    data = value.encode("utf-32-le")
    return data if data else b"\x00" * 4


def decode_string(data: bytes) -> str:
    """Decode UTF-32-LE code units; trailing NULs are dropped as numpy's ``U`` type does."""
    return data.decode("utf-32-le").rstrip("\x00")


def check_tensor_header(
    path: Optional[Path], name: str, dtype: str, shape: Sequence[int], nbytes: int
) -> None:
    """Raise CheckpointFormatError unless dtype, shape and content size agree."""
    if not dtypes.is_known(dtype):
        raise CheckpointFormatError(
            f"unknown dtype {dtype!r}; MindSpore checkpoints contain {', '.join(dtypes.DTYPE_NAMES)}",
            path=path,
            param=name,
        )

    if len(shape) > MAX_NDIM:
        raise CheckpointFormatError(
            f"has {len(shape)} dims, more than the {MAX_NDIM} a tensor can have", path=path, param=name
        )
    for dim in shape:
        if dim < 0:
            raise CheckpointFormatError(f"has a negative dim in shape {list(shape)}", path=path, param=name)

    # numpy refuses a shape whose non-zero dims times the itemsize pass its byte limit even when
    # another dim is 0 and the content is empty, so such a record could be indexed but never read.
    extent = dtypes.itemsize(dtype) if dtype != dtypes.STRING else 1
    for dim in shape:
        extent *= max(int(dim), 1)
    if extent > MAX_ARRAY_BYTES:
        raise CheckpointFormatError(
            f"shape {list(shape)} is too large for any array (more than 2**63 bytes)", path=path, param=name
        )

    if dtype == dtypes.STRING:
        if nbytes % 4:
            raise CheckpointFormatError(
                f"str content of {nbytes} bytes is not whole UTF-32 code units (a multiple of 4)",
                path=path,
                param=name,
            )
        return

    expected = dtypes.expected_nbytes(dtype, shape)
    if expected != nbytes:
        raise CheckpointFormatError(
            f"content is {nbytes} bytes but shape {list(shape)} of {dtype} needs {expected}",
            path=path,
            param=name,
        )


@dataclass
class _Entry:
    """Location of one tensor's content in the mapping, one span per record."""

    info: TensorInfo
    content: List[Tuple[int, int]]  # (offset, length) of each piece, in order
    first_byte: int  # start of the first record, for release()
    last_byte: int  # end of the last record


class CheckpointReader:
    """A read-only, memory-mapped checkpoint; iterate it for the tensor headers in file order.

    Subclasses build ``_entries`` in ``_index()``, and this class owns the mapping and the
    access to content. Use it as a context manager, or call :meth:`close`.

    ``has_crc`` tells whether the file records a CRC-32 (a ``.ckpt`` trailer, or ``crc_num`` in
    safetensors metadata), so that a copy can be written with one too. ``metadata`` is the
    safetensors ``__metadata__`` table, empty for a ``.ckpt``.
    """

    format: str = ""

    def __init__(self, path: PathLike, *, verify_crc: bool = True) -> None:
        self.path = Path(path)
        self.verify_crc = verify_crc
        self.has_crc = False
        self.metadata: Dict[str, str] = {}
        self._entries: Dict[str, _Entry] = {}
        self._mmap: Optional[mmap.mmap] = None
        self._size = 0
        self._open_mapping()
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _open_mapping(self) -> None:
        try:
            # Opening a FIFO would block until some writer appears, so check the type first.
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                raise CheckpointFormatError("is not a regular file", path=self.path)
            with open(self.path, "rb") as file:
                self._size = os.fstat(file.fileno()).st_size
                if self._size == 0:
                    raise CheckpointFormatError("file is empty", path=self.path)
                self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise CheckpointFormatError(f"cannot be opened: {error.strerror or error}", path=self.path) from error

    def _index(self) -> None:
        raise NotImplementedError

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.info.name] = entry

    def _error(self, message: str, param: Optional[str] = None, hint: Optional[str] = None) -> CheckpointFormatError:
        return CheckpointFormatError(message, path=self.path, param=param, hint=hint)

    # -- headers ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TensorInfo]:
        return (entry.info for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> List[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        """Return the header of ``name``; raise KeyError when the file has no such entry."""
        return self._entry(name).info

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no parameter named {name!r}") from None

    # -- content ---------------------------------------------------------------------------

    def _mapping(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"{self.path}: the checkpoint is closed")
        return self._mmap

    def array(self, name: str) -> np.ndarray:
        """Return the content of tensor ``name`` as a read-only array in storage dtype and shape.

        A tensor stored in one piece is a zero-copy view of the mapping, possibly unaligned.
        A tensor stored in several records is joined into a new array.
        """
        entry = self._entry(name)
        info = entry.info
        if info.is_string:
            raise TypeError(f"{self.path}: {name!r} is a str entry; read it with string()")
        mapping = self._mapping()
        storage = info.storage_dtype
        if len(entry.content) == 1:
            offset, length = entry.content[0]
            array = np.frombuffer(mapping, dtype=storage, count=length // storage.itemsize, offset=offset)
        else:
            joined = np.empty(info.nbytes, dtype=np.uint8)
            position = 0
            for offset, length in entry.content:
                joined[position : position + length] = np.frombuffer(mapping, np.uint8, length, offset)
                position += length
            array = joined.view(storage)
            array.flags.writeable = False
        return array.reshape(info.storage_shape)

    def string(self, name: str) -> str:
        """Return the value of a str entry."""
        entry = self._entry(name)
        if not entry.info.is_string:
            raise TypeError(f"{self.path}: {name!r} is a {entry.info.dtype} tensor; read it with array()")
        mapping = self._mapping()
        data = b"".join(mapping[offset : offset + length] for offset, length in entry.content)
        try:
            return decode_string(data)
        except UnicodeDecodeError as error:
            raise self._error(f"str value is not valid UTF-32: {error.reason}", param=name) from None

    def release(self, name: str) -> None:
        """Drop the pages of ``name``'s records from this process's resident memory.

        The page cache keeps them, and any array still viewing them faults them back in on the
        next access, so this is always safe. It does nothing where madvise is not available.
        """
        entry = self._entry(name)
        mapping = self._mapping()
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or not hasattr(mapping, "madvise"):
            return
        start = entry.first_byte - entry.first_byte % _PAGE_SIZE
        end = min(entry.last_byte, self._size)
        if end > start:
            mapping.madvise(advice, start, end - start)

    def release_content(self, name: str, start: int, stop: int) -> None:
        """Drop the pages that hold bytes ``[start, stop)`` of ``name``'s content, as release() does."""
        mapping = self._mapping()
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or not hasattr(mapping, "madvise"):
            return
        position = 0  # of the current record's first content byte, in the content
        for offset, length in self._entry(name).content:
            first = max(start, position)
            last = min(stop, position + length)
            if first < last:
                begin = offset + first - position
                begin -= begin % _PAGE_SIZE
                mapping.madvise(advice, begin, offset + last - position - begin)
            position += length

    def close(self) -> None:
        """Unmap the file. Arrays handed out earlier keep the mapping alive until they go."""
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # Arrays still view the mapping; it is unmapped when the last one is freed.
                pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}: {len(self)} entries>"


def iter_c_order(array: np.ndarray, chunk_size: Optional[int] = None) -> Iterator[memoryview]:
    """Yield the bytes of ``array`` in C order as byte memoryviews of at most ``chunk_size``.

    ``chunk_size`` defaults to COPY_CHUNK_SIZE, read at call time.

    A C-contiguous array is sliced without copying. Any other array is copied in blocks of
    whole leading-axis rows, or row by row when one row exceeds ``chunk_size``, so about
    ``chunk_size`` bytes at most are copied at a time.
    """
    if chunk_size is None:
        chunk_size = COPY_CHUNK_SIZE
    if array.nbytes == 0:
        return
    if array.flags.c_contiguous:
        flat = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(flat), chunk_size):
            yield flat[start : start + chunk_size]
        return

    if array.ndim == 1:
        step = max(1, chunk_size // array.itemsize)
        for start in range(0, array.shape[0], step):
            yield memoryview(np.ascontiguousarray(array[start : start + step]).view(np.uint8))
        return

    row_bytes = array.nbytes // array.shape[0]
    if row_bytes > chunk_size:
        for index in range(array.shape[0]):
            yield from iter_c_order(array[index], chunk_size)
        return
    rows = chunk_size // row_bytes
    for start in range(0, array.shape[0], rows):
        yield memoryview(np.ascontiguousarray(array[start : start + rows]).reshape(-1).view(np.uint8))


def write_all(file: BinaryIO, data: Union[bytes, memoryview]) -> None:
    """Write all of ``data``, also to a raw file object whose write() may write less."""
    view = memoryview(data)
    while len(view):
        written = file.write(view)
        if written is None:
            raise BlockingIOError("the target is non-blocking and not ready for writing")
        view = view[written:]


class CheckpointWriter:
    """Writes one checkpoint, record by record, in the order of the entries it was opened with.

    Subclasses implement ``_begin``, ``_write_tensor``, ``_write_string`` and ``_finish``.
    On an exception inside ``with`` the file is left unfinished (no trailer) for the caller to
    remove.
    """

    format: str = ""

    def __init__(
        self, target: Union[PathLike, BinaryIO], entries: Sequence[TensorInfo], *, crc_check: bool = False
    ) -> None:
        self.entries = list(entries)
        self.crc_check = crc_check
        if isinstance(target, (str, os.PathLike)):
            self.path: Optional[Path] = Path(target)
            self._check_entries()
            try:
                self._file: BinaryIO = open(self.path, "wb")
            except OSError as error:
                raise self._error(f"cannot be created: {error.strerror or error}") from error
            self._owns_file = True
        else:
            name = getattr(target, "name", None)
            self.path = Path(name) if isinstance(name, str) else None
            self._check_entries()
            self._file = target
            self._owns_file = False
        self._next = 0
        self._closed = False
        try:
            self._begin()
        except BaseException:
            self._abandon()
            raise

    def _error(self, message: str, param: Optional[str] = None) -> CheckpointFormatError:
        return CheckpointFormatError(message, path=self.path, param=param)

    def _check_entries(self) -> None:
        seen = set()
        for info in self.entries:
            if info.name in seen:
                raise self._error("appears twice in the entries to write", param=info.name)
            seen.add(info.name)
            check_tensor_header(self.path, info.name, info.dtype, info.shape, info.nbytes)

    def _next_entry(self, name: str) -> TensorInfo:
        if self._closed:
            raise ValueError("the checkpoint writer is closed")
        if self._next >= len(self.entries):
            raise self._error(f"all {len(self.entries)} entries are already written", param=name)
        info = self.entries[self._next]
        if name != info.name:
            raise self._error(f"written out of order: expected {info.name!r} next", param=name)
        return info

    def write(self, name: str, data: Union[np.ndarray, str]) -> None:
        """Write the next entry: a storage array (any strides) or, for a str entry, a str."""
        info = self._next_entry(name)
        if info.is_string:
            if not isinstance(data, str):
                raise self._error(f"is a str entry but got {type(data).__name__}", param=name)
            content = encode_string(data)
            if len(content) != info.nbytes:
                raise self._error(
                    f"str value takes {len(content)} bytes but the entry declares {info.nbytes}", param=name
                )
            self._write_string(info, content)
        else:
            if isinstance(data, np.generic):
                data = np.asarray(data)
            if not isinstance(data, np.ndarray):
                raise self._error(f"expected a numpy array, got {type(data).__name__}", param=name)
            if data.dtype != info.storage_dtype:
                raise self._error(
                    f"array dtype {data.dtype} is not the storage dtype {info.storage_dtype} of {info.dtype}",
                    param=name,
                )
            if data.nbytes != info.nbytes:
                raise self._error(
                    f"array of shape {list(data.shape)} has {data.nbytes} bytes but the entry declares "
                    f"{info.nbytes}",
                    param=name,
                )
            self._write_tensor(info, iter_c_order(data))
        self._next += 1

    def write_chunks(self, name: str, chunks: Iterable[Union[bytes, memoryview]]) -> None:
        """Write the next tensor entry from its content: C-order bytes in buffers of any size.

        The buffers are written as they come, so a tensor need never be whole in memory. Their
        sizes must add up to the entry's ``nbytes``.
        """
        info = self._next_entry(name)
        if info.is_string:
            raise self._error("is a str entry; write it with write()", param=name)
        checked = self._exact_size(info, chunks)
        self._write_tensor(info, checked)
        for _ in checked:  # raises if chunks holds more than the entry declares
            pass
        self._next += 1

    def _exact_size(self, info: TensorInfo, chunks: Iterable[Union[bytes, memoryview]]) -> Iterator[memoryview]:
        """Yield ``chunks`` as byte memoryviews; raise unless they hold exactly ``info.nbytes``."""
        total = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            total += len(view)
            if total > info.nbytes:
                break
            yield view
        if total != info.nbytes:
            raise self._error(
                f"the content written has {'at least ' if total > info.nbytes else ''}{total} bytes "
                f"but the entry declares {info.nbytes}",
                param=info.name,
            )

    def close(self) -> None:
        """Finish the file once every entry is written, then close it if this writer opened it."""
        if self._closed:
            return
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            self._abandon()
            raise self._error(
                f"closed after {self._next} of {len(self.entries)} entries; {missing!r} and later "
                "entries were never written",
                param=missing,
            )
        try:
            self._finish()
            self._file.flush()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        self._closed = True
        if self._owns_file:
            self._file.close()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def _begin(self) -> None:
        """Write what comes before the first record."""

    def _write_tensor(self, info: TensorInfo, chunks: Iterator[memoryview]) -> None:
        """Write one tensor record (or several); ``chunks`` holds exactly ``info.nbytes`` bytes."""
        raise NotImplementedError

    def _write_string(self, info: TensorInfo, content: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Write what comes after the last record."""
