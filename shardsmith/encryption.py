"""Encrypted `.ckpt` files, read and written with MindSpore's own cipher functions.

`mindspore.save_checkpoint(..., enc_key=KEY, enc_mode=MODE)` serializes the records as usual,
then encrypts the bytes in blocks of 64 MiB of plaintext (`ENCRYPT_BLOCK_SIZE` KiB in
mindspore/train/serialization.py, 2.10) with `_encrypt`, writing the encrypted blocks back to
back. Each block starts with a 4-byte little-endian magic number that names the mode, then (AES-GCM
only) the 16-byte authentication tag, then the 4-byte size of the rest: the IV length, the IV,
the ciphertext length and the ciphertext. MindSpore's loader decrypts the whole file into memory
with `_decrypt`.

shardsmith calls the same functions (`_encrypt`, and `_decrypt_data` on one block at a time), so
the cipher format is MindSpore's. It never keeps the whole plaintext in memory. The reader indexes the
records by decrypting the blocks that hold record headers, and later decrypts only the blocks a
tensor's content spans. The writer encrypts each 64 MiB of records as soon as it is complete.
Safetensors files cannot be encrypted, because MindSpore 2.10 rejects `enc_key` for them.

The key comes from a file (`--key-file`, the raw 16, 24 or 32 bytes MindSpore takes as `enc_key`)
or from the environment (`SHARDSMITH_KEY`, the same bytes as hex digits), never from the command
line, where other users could read it in the process list.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CheckpointFormatError, ShardsmithError
from .formats import TensorInfo
from .formats.ckpt import CkptReader, CkptWriter

KEY_ENV = "SHARDSMITH_KEY"
ENC_MODES = ("AES-GCM", "AES-CBC", "SM4-CBC")
DEFAULT_ENC_MODE = "AES-GCM"

# Plaintext bytes per encrypted block, as mindspore.save_checkpoint 2.10 cuts them.
BLOCK_SIZE = 64 * 1024 * 1024

# An upper bound on one encrypted block: 64 MiB of ciphertext (MAX_BLOCK_SIZE in
# mindspore/core/utils/crypto.h) plus room for the IV and the lengths. A larger size means the
# file is damaged, so it is rejected before anything is read.
_MAX_BLOCK_BYTES = 64 * 1024 * 1024 + 1024

_MAGIC = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
_GCM_TAG_SIZE = 16
_CBC_BLOCK = 16

_KEY_LENGTHS = {"AES-GCM": (16, 24, 32), "AES-CBC": (16, 24, 32), "SM4-CBC": (16,)}


@dataclass(frozen=True)
class Cipher:
    """A key and the mode to use it in. Its repr never shows the key."""

    key: bytes
    mode: str = DEFAULT_ENC_MODE

    def __post_init__(self) -> None:
        if self.mode not in ENC_MODES:
            raise ShardsmithError(f"unknown encryption mode '{self.mode}' (expected one of: {', '.join(ENC_MODES)})")
        if len(self.key) not in _KEY_LENGTHS[self.mode]:
            lengths = " or ".join(map(str, _KEY_LENGTHS[self.mode]))
            raise ShardsmithError(f"a {self.mode} key is {lengths} bytes, but the key given is {len(self.key)} bytes")

    def with_mode(self, mode: str) -> "Cipher":
        return Cipher(self.key, mode)

    def __repr__(self) -> str:
        return f"Cipher(mode={self.mode!r}, key=<{len(self.key)} bytes>)"


def load_key(key_file: Optional[Union[str, os.PathLike]] = None, environ: Mapping[str, str] = os.environ) -> Optional[bytes]:
    """Return the key from `key_file`, else from $SHARDSMITH_KEY (hex), else None.

    A key file contains the raw key bytes. One trailing newline is dropped when the file would
    otherwise be one byte longer than a valid key, since editors add one.
    """
    if key_file is not None:
        path = Path(key_file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardsmithError("key file not found", path=path) from None
        except OSError as error:
            raise ShardsmithError(f"cannot read the key file: {error.strerror or error}", path=path) from None
        if len(data) in (17, 25, 33) and data.endswith(b"\n"):
            data = data[:-1]
        if len(data) not in (16, 24, 32):
            raise ShardsmithError(
                f"the key file contains {len(data)} bytes, but a key is 16, 24 or 32 raw bytes",
                path=path,
                hint="Write the key bytes themselves, as MindSpore's enc_key, not hex or base64",
            )
        return data
    value = environ.get(KEY_ENV)
    if value is None:
        return None
    try:
        key = bytes.fromhex("".join(value.split()))
    except ValueError:
        raise ShardsmithError(f"${KEY_ENV} is not hex digits", hint="Set it to the key bytes written as hex") from None
    if len(key) not in (16, 24, 32):
        raise ShardsmithError(f"${KEY_ENV} contains a {len(key)}-byte key, but a key is 16, 24 or 32 bytes (32, 48 or 64 hex digits)")
    return key


def cipher_from_options(key_file: Optional[Union[str, os.PathLike]], enc_mode: Optional[str]) -> Optional[Cipher]:
    """Build the cipher from the command-line options: `--key-file` or $SHARDSMITH_KEY, and `--enc-mode`."""
    key = load_key(key_file)
    if key is None:
        if enc_mode is not None:
            raise ShardsmithError(f"--enc-mode needs a key: pass --key-file or set ${KEY_ENV}")
        return None
    return Cipher(key, enc_mode or DEFAULT_ENC_MODE)


def encryption_mode(path: Union[str, os.PathLike]) -> Optional[str]:
    """Return the mode a MindSpore-encrypted file was written with, or None for a plain file."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        return None
    if len(head) < 4:
        return None
    return _MAGIC.get(struct.unpack("<I", head)[0])


def _crypto() -> Tuple[Callable[..., bytes], Callable[..., Optional[bytes]]]:
    """Return MindSpore's (_encrypt, _decrypt_data); importing them imports mindspore."""
    try:
        from mindspore._c_expression import _decrypt_data, _encrypt
    except ImportError as error:
        raise ShardsmithError(
            f"encrypted checkpoints need MindSpore's cipher functions, which failed to import: {error}",
            hint="Install MindSpore (pip install 'shardsmith[mindspore]')",
        ) from None
    return _encrypt, _decrypt_data


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    offset: int  # in the file
    size: int  # bytes in the file, header included
    plain_offset: int
    plain_size: int


class _DecryptedView:
    """The plaintext of an encrypted checkpoint, decrypted one block at a time on access.

    Supports what the `.ckpt` index needs of a buffer, `view[i]` and `view[a:b]`, plus `read`.
    The last block decrypted is kept, because record headers are read byte by byte.
    """

    def __init__(self, path: Path, cipher: Cipher, decrypt: Callable[..., Optional[bytes]]) -> None:
        self.path = path
        self.cipher = cipher
        self._decrypt = decrypt
        self._file: Optional[BinaryIO] = open(path, "rb")
        self._cached: Optional[Tuple[int, bytes]] = None
        try:
            self.blocks = self._scan()
        except BaseException:
            self.close()
            raise
        self.size = self.blocks[-1].plain_offset + self.blocks[-1].plain_size if self.blocks else 0
        self._starts = [block.plain_offset for block in self.blocks]

    def _error(self, message: str, hint: Optional[str] = None) -> CheckpointFormatError:
        return CheckpointFormatError(message, path=self.path, hint=hint)

    def _read_at(self, offset: int, size: int) -> bytes:
        assert self._file is not None
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise self._error(f"truncated: a block at byte {offset} needs {size} bytes but the file ends first")
        return data

    def _scan(self) -> List[_Block]:
        """Walk the block headers; learn each block's plaintext size without decrypting it whole."""
        assert self._file is not None
        file_size = os.fstat(self._file.fileno()).st_size
        blocks: List[_Block] = []
        offset = 0
        plain_offset = 0
        while offset < file_size:
            (magic,) = struct.unpack("<I", self._read_at(offset, 4))
            mode = _MAGIC.get(magic)
            if mode is None:
                raise self._error(
                    f"the block at byte {offset} does not start with a MindSpore encryption magic number",
                    hint="The file is damaged, or not an encrypted checkpoint",
                )
            if mode != self.cipher.mode:
                raise self._error(
                    f"the file is encrypted with {mode}, not {self.cipher.mode}", hint=f"Pass --enc-mode {mode}"
                )
            header = 4 + (_GCM_TAG_SIZE if mode == "AES-GCM" else 0)
            (body,) = struct.unpack("<I", self._read_at(offset + header, 4))
            total = header + 4 + body
            if body < 8 or body > _MAX_BLOCK_BYTES or offset + total > file_size:
                raise self._error(f"the block at byte {offset} declares {body} bytes, which the file cannot hold")
            iv_size, = struct.unpack("<I", self._read_at(offset + header + 4, 4))
            if iv_size + 8 > body:
                raise self._error(f"the block at byte {offset} declares an IV of {iv_size} bytes, more than the block")
            cipher_size, = struct.unpack("<I", self._read_at(offset + header + 8 + iv_size, 4))
            if iv_size + cipher_size + 8 != body:
                raise self._error(f"the block at byte {offset} has inconsistent lengths")
            if mode == "AES-GCM":
                plain_size = cipher_size
            else:
                plain_size = cipher_size - self._cbc_padding(offset, header, iv_size, cipher_size)
            blocks.append(_Block(offset, total, plain_offset, plain_size))
            offset += total
            plain_offset += plain_size
        return blocks

    def _cbc_padding(self, offset: int, header: int, iv_size: int, cipher_size: int) -> int:
        """Return the PKCS#7 padding of a CBC block by decrypting only its last 16 bytes.

        In CBC mode the last plaintext block depends only on the last ciphertext block and the
        one before it (or the IV), so a one-block message built from those two decrypts it.
        """
        if cipher_size < _CBC_BLOCK or cipher_size % _CBC_BLOCK:
            raise self._error(f"the CBC block at byte {offset} has {cipher_size} bytes of ciphertext, not whole 16-byte blocks")
        cipher_start = offset + header + 8 + iv_size + 4
        if cipher_size == _CBC_BLOCK:
            iv = self._read_at(offset + header + 8, iv_size)
        else:
            iv = self._read_at(cipher_start + cipher_size - 2 * _CBC_BLOCK, _CBC_BLOCK)
        last = self._read_at(cipher_start + cipher_size - _CBC_BLOCK, _CBC_BLOCK)
        body = struct.pack("<I", len(iv)) + iv + struct.pack("<I", _CBC_BLOCK) + last
        probe = self._read_at(offset, 4) + struct.pack("<I", len(body)) + body
        plain = self._decrypt(probe, len(probe), self.cipher.key, len(self.cipher.key), self.cipher.mode)
        if plain is None:
            raise self._wrong_key(offset)
        return _CBC_BLOCK - len(plain)

    def _wrong_key(self, offset: int) -> CheckpointFormatError:
        return self._error(
            f"decrypting the block at byte {offset} with {self.cipher.mode} failed",
            hint="Check the key (--key-file or $SHARDSMITH_KEY) and --enc-mode; the file may also be damaged",
        )

    def block_plaintext(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        block = self.blocks[index]
        data = self._read_at(block.offset, block.size)
        plain = self._decrypt(data, len(data), self.cipher.key, len(self.cipher.key), self.cipher.mode)
        if plain is None:
            raise self._wrong_key(block.offset)
        if len(plain) != block.plain_size:
            raise self._error(f"the block at byte {block.offset} decrypts to {len(plain)} bytes, not {block.plain_size}")
        self._cached = (index, plain)
        return plain

    def _block_index(self, position: int) -> int:
        return bisect.bisect_right(self._starts, position) - 1

    def read_into(self, out: memoryview, offset: int) -> None:
        """Fill `out` with the plaintext starting at `offset`."""
        done = 0
        index = self._block_index(offset)
        while done < len(out):
            block = self.blocks[index]
            plain = self.block_plaintext(index)
            start = offset + done - block.plain_offset
            part = plain[start : start + len(out) - done]
            out[done : done + len(part)] = part
            done += len(part)
            index += 1

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        self.read_into(memoryview(out), offset)
        return bytes(out)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: Union[int, slice]) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("the decrypted view supports contiguous slices only")
            return self.read(start, max(0, stop - start))
        if key < 0:
            key += self.size
        if not 0 <= key < self.size:
            raise IndexError(key)
        index = self._block_index(key)
        return self.block_plaintext(index)[key - self.blocks[index].plain_offset]

    def drop_cache(self) -> None:
        self._cached = None

    def close(self) -> None:
        self._cached = None
        if self._file is not None:
            self._file.close()
            self._file = None


class EncryptedCkptReader(CkptReader):
    """A `.ckpt` reader for files MindSpore encrypted; arrays are decrypted copies, not views."""

    def __init__(self, path: Union[str, os.PathLike], cipher: Cipher, *, verify_crc: bool = True) -> None:
        self.cipher = cipher
        super().__init__(path, verify_crc=verify_crc)

    def _open_mapping(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except OSError as error:
            raise CheckpointFormatError(f"cannot be opened: {error.strerror or error}", path=self.path) from error
        if size == 0:
            raise CheckpointFormatError("file is empty", path=self.path)
        _, decrypt = _crypto()
        try:
            view = _DecryptedView(self.path, self.cipher, decrypt)
        except OSError as error:
            raise CheckpointFormatError(f"cannot be opened: {error.strerror or error}", path=self.path) from error
        self._mmap = view  # type: ignore[assignment]
        self._size = view.size

    def _view(self) -> _DecryptedView:
        return self._mapping()  # type: ignore[return-value]

    def _verify_crc(self, records_end: int) -> None:
        stored = int.from_bytes(self._view().read(records_end + 7, 10), "big")
        crc = 0
        position = 0
        while position < records_end:
            size = min(BLOCK_SIZE, records_end - position)
            crc = zlib.crc32(self._view().read(position, size), crc)
            position += size
        if crc != stored:
            raise self._error(f"CRC-32 check failed: the trailer records {stored:#010x} but the records hash to {crc:#010x}")

    def array(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        info = entry.info
        if info.is_string:
            raise TypeError(f"{self.path}: {name!r} is a str entry; read it with string()")
        joined = np.empty(info.nbytes, dtype=np.uint8)
        position = 0
        view = memoryview(joined)
        for offset, length in entry.content:
            self._view().read_into(view[position : position + length], offset)
            position += length
        array = joined.view(info.storage_dtype)
        array.flags.writeable = False
        return array.reshape(info.storage_shape)

    def string(self, name: str) -> str:
        from .formats.base import decode_string

        entry = self._entry(name)
        if not entry.info.is_string:
            raise TypeError(f"{self.path}: {name!r} is a {entry.info.dtype} tensor; read it with array()")
        data = b"".join(self._view().read(offset, length) for offset, length in entry.content)
        try:
            return decode_string(data)
        except UnicodeDecodeError as error:
            raise self._error(f"str value is not valid UTF-32: {error.reason}", param=name) from None

    def release(self, name: str) -> None:
        self._view().drop_cache()


def open_encrypted_checkpoint(
    path: Union[str, os.PathLike], cipher: Cipher, *, verify_crc: bool = True
) -> EncryptedCkptReader:
    """Open a MindSpore-encrypted `.ckpt`; the mode recorded in the file must be the cipher's."""
    return EncryptedCkptReader(path, cipher, verify_crc=verify_crc)


def open_checkpoint(
    path: Union[str, os.PathLike], format: Optional[str] = None, *, cipher: Optional[Cipher] = None, verify_crc: bool = True
):
    """Open a checkpoint, decrypting it when MindSpore encrypted it.

    An encrypted file is recognised by its first bytes. Opening one without a cipher, or a
    safetensors file with one, raises with a message saying what to pass.
    """
    from . import formats

    mode = encryption_mode(path)
    if mode is None:
        return formats.open_checkpoint(path, format, verify_crc=verify_crc)
    if cipher is None:
        raise CheckpointFormatError(
            f"the file is encrypted ({mode})",
            path=path,
            hint=f"Pass --key-file with the key it was saved with, or set ${KEY_ENV}",
        )
    if format not in (None, "ckpt"):
        raise CheckpointFormatError(f"the file is encrypted ({mode}), and only .ckpt files are encrypted", path=path)
    return open_encrypted_checkpoint(path, cipher, verify_crc=verify_crc)


# -- writing -----------------------------------------------------------------------------------


class EncryptingFile:
    """A write-only file that encrypts what is written in MindSpore's blocks of 64 MiB.

    Call `finish` after the last write to encrypt the final, shorter block.
    """

    def __init__(self, raw: BinaryIO, cipher: Cipher, block_size: int = BLOCK_SIZE) -> None:
        self._raw = raw
        self.cipher = cipher
        self._block_size = block_size
        self._encrypt, _ = _crypto()
        self._buffer = bytearray()
        self._position = 0
        self.name = getattr(raw, "name", None)

    def _emit(self, block: bytes) -> None:
        encrypted = self._encrypt(block, len(block), self.cipher.key, len(self.cipher.key), self.cipher.mode)
        view = memoryview(encrypted)
        while view:
            written = self._raw.write(view)
            view = view[written:]

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            room = self._block_size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._block_size:
                self._emit(bytes(self._buffer))
                self._buffer.clear()
        self._position += size
        return size

    def finish(self) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer))
            self._buffer.clear()
        self._raw.flush()

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class EncryptedCkptWriter(CkptWriter):
    """A `.ckpt` writer whose output `mindspore.load_checkpoint(..., dec_key=KEY, dec_mode=MODE)` reads."""

    def __init__(
        self,
        target: Union[str, os.PathLike, BinaryIO],
        entries: Sequence[TensorInfo],
        cipher: Cipher,
        *,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self._raw_owned: Optional[BinaryIO] = None
        if isinstance(target, (str, os.PathLike)):
            self._raw_owned = open(target, "wb")
            raw: BinaryIO = self._raw_owned
        else:
            raw = target
        self._encrypting = EncryptingFile(raw, cipher, block_size)
        try:
            # MindSpore computes no CRC for encrypted files, so none is written.
            super().__init__(self._encrypting, entries, crc_check=False)  # type: ignore[arg-type]
        except BaseException:
            self._close_raw()
            raise
        if isinstance(target, (str, os.PathLike)):
            self.path = Path(target)

    def _finish(self) -> None:
        super()._finish()
        self._encrypting.finish()

    def _abandon(self) -> None:
        super()._abandon()
        self._close_raw()

    def _close_raw(self) -> None:
        if self._raw_owned is not None:
            self._raw_owned.close()
            self._raw_owned = None


def open_writer(
    target: Union[str, os.PathLike, BinaryIO],
    entries: Sequence[TensorInfo],
    format: str,
    *,
    cipher: Optional[Cipher] = None,
    crc_check: bool = False,
):
    """Open a checkpoint writer, encrypting the output when a cipher is given (`.ckpt` only)."""
    from . import formats

    if cipher is None:
        return formats.open_writer(target, entries, format, crc_check=crc_check)
    path = target if isinstance(target, (str, os.PathLike)) else None
    if format != "ckpt":
        raise CheckpointFormatError(
            "only .ckpt checkpoints can be encrypted; MindSpore 2.10 rejects enc_key for safetensors", path=path
        )
    if crc_check:
        raise CheckpointFormatError(
            "a CRC and encryption cannot be combined; MindSpore 2.10 computes no CRC for encrypted files", path=path
        )
    return EncryptedCkptWriter(target, entries, cipher)
