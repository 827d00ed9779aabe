"""The .ckpt codec against MindSpore 2.10 as the oracle: what mindspore.save_checkpoint writes we
read exactly, what we write MindSpore loads, byte for byte the same file it would write."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsmith import dtypes
from shardsmith.errors import CheckpointFormatError
from shardsmith.formats import TensorInfo, base, ckpt, open_checkpoint, open_writer
from shardsmith.formats.ckpt import _encode_varint, record_header

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402
from mindspore.train import checkpoint_pb2, serialization  # noqa: E402

RNG = np.random.default_rng(20240601)


def _bfloat16_words(values) -> np.ndarray:
    """Return bfloat16 words of float32 values that bfloat16 represents exactly."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype("<u2")


def _random(dtype: str, shape) -> np.ndarray:
    storage = dtypes.storage_dtype(dtype)
    if dtype == "Bool":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dtype == "BFloat16":
        return _bfloat16_words(RNG.integers(-300, 300, size=shape) / 4)
    if storage.kind == "f":
        values = RNG.standard_normal(size=shape).astype(storage)
        if values.size >= 4:
            values.reshape(-1)[:4] = [np.inf, -np.inf, -0.0, np.nan]
        return values
    info = np.iinfo(storage)
    return RNG.integers(info.min, info.max, size=shape, dtype=storage, endpoint=True)


def _to_mindspore(dtype: str, array: np.ndarray) -> Tensor:
    if dtype == "BFloat16":
        as_float = (np.asarray(array, np.uint32) << np.uint32(16)).view(np.float32)
        return Tensor(as_float, dtype=mstype.bfloat16)
    if dtype == "Int4":
        return Tensor(array, dtype=mstype.qint4x2)
    return Tensor(array)


# (name, MindSpore dtype, storage array): every dtype, 2-D and 0-d.
SAMPLES = [(f"net.{dtype.lower()}.weight", dtype, _random(dtype, (3, 5))) for dtype in dtypes.DTYPES]
SAMPLES += [(f"net.{dtype.lower()}.scalar", dtype, _random(dtype, ())) for dtype in ("Float32", "Int64", "BFloat16", "Bool")]
SAMPLES += [("net.float16.3d", "Float16", _random("Float16", (2, 3, 4)))]

APPEND = {"epoch_num": 3, "step_num": 120, "note": "héllo ✓ 𝄞", "empty_note": "", "lr": 0.5, "flag": True}
# What save_checkpoint stores for each append_dict value (ints as Int64, floats as Float32).
APPEND_ENTRIES = [
    ("epoch_num", "Int64", np.array(3, "<i8")),
    ("step_num", "Int64", np.array(120, "<i8")),
    ("note", "str", "héllo ✓ 𝄞"),
    ("empty_note", "str", ""),
    ("lr", "Float32", np.array(0.5, "<f4")),
    ("flag", "Bool", np.array(True)),
]


def _save_with_mindspore(path: Path, samples=SAMPLES, append=APPEND, **kwargs) -> Path:
    save_list = [{"name": name, "data": _to_mindspore(dtype, array)} for name, dtype, array in samples]
    ms.save_checkpoint(save_list, str(path), append_dict=dict(append) if append else None, **kwargs)
    return path


def _entries(samples=SAMPLES, append_entries=APPEND_ENTRIES):
    for name, dtype, value in list(samples) + list(append_entries):
        if dtype == "str":
            yield TensorInfo.of_string(name, value), value
        else:
            yield TensorInfo.of_array(name, dtype, value), value


def _write_ours(target, samples=SAMPLES, append_entries=APPEND_ENTRIES, **kwargs):
    pairs = list(_entries(samples, append_entries))
    with open_writer(target, [info for info, _ in pairs], "ckpt", **kwargs) as writer:
        for info, value in pairs:
            writer.write(info.name, value)
    return target


def _copy(reader, target, fmt="ckpt", **kwargs):
    with open_writer(target, list(reader), fmt, **kwargs) as writer:
        for info in reader:
            writer.write(info.name, reader.string(info.name) if info.is_string else reader.array(info.name))


def _record_tags(path: Path):
    """Return the tag of every record, parsed by MindSpore's own protobuf schema."""
    data = path.read_bytes()
    if data[-17:-10] == b"crc_num":
        data = data[:-17]
    message = checkpoint_pb2.Checkpoint()
    message.ParseFromString(data)
    return [value.tag for value in message.value]


# -- reading what MindSpore writes -----------------------------------------------------------


def test_read_mindspore_file_exactly(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt")
    expected = list(_entries())
    with open_checkpoint(path) as reader:
        assert reader.format == "ckpt"
        assert reader.names() == [info.name for info, _ in expected]
        assert len(reader) == len(expected)
        for (info, value), got in zip(expected, reader):
            assert got == info
            if info.is_string:
                assert reader.string(info.name) == value
            else:
                array = reader.array(info.name)
                assert array.dtype == dtypes.storage_dtype(info.dtype)
                assert array.shape == value.shape
                assert array.tobytes() == value.tobytes()
                assert not array.flags.writeable


def test_read_agrees_with_mindspore_load(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt")
    loaded = ms.load_checkpoint(str(path))
    with open_checkpoint(path) as reader:
        assert list(loaded) == reader.names()
        for info in reader:
            if info.is_string:
                assert reader.string(info.name) == loaded[info.name]
            else:
                assert tuple(loaded[info.name].shape) == info.shape
                assert str(loaded[info.name].dtype) == info.dtype
                assert reader.array(info.name).tobytes() == loaded[info.name].get_bytes()


def _views_mapping(reader, array: np.ndarray) -> bool:
    """Return whether ``array`` lies inside the reader's memory mapping."""
    mapped = np.frombuffer(reader._mapping(), np.uint8)
    start = mapped.__array_interface__["data"][0]
    address = array.__array_interface__["data"][0]
    return start <= address and address + array.nbytes <= start + mapped.nbytes


def test_array_is_zero_copy_view(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt")
    with open_checkpoint(path) as reader:
        array = reader.array(SAMPLES[0][0])
        assert _views_mapping(reader, array)
        with pytest.raises(ValueError):
            array[0, 0] = 1


def test_read_header_only_info(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt")
    name, dtype, value = SAMPLES[1]
    with open_checkpoint(path) as reader:
        assert name in reader
        assert "missing" not in reader
        assert reader.info(name) == TensorInfo(name, dtype, value.shape, value.nbytes)
        with pytest.raises(KeyError, match="missing"):
            reader.info("missing")
        with pytest.raises(TypeError, match="string"):
            reader.array("note")
        with pytest.raises(TypeError, match="array"):
            reader.string(name)


# -- writing what MindSpore writes -------------------------------------------------------------


@pytest.mark.parametrize("crc_check", [False, True])
def test_write_bytes_identical_to_mindspore(tmp_path, crc_check):
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", crc_check=crc_check)
    ours = _write_ours(tmp_path / "ours.ckpt", crc_check=crc_check)
    assert ours.read_bytes() == theirs.read_bytes()


def test_write_to_file_object(tmp_path):
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt")
    buffer = io.BytesIO()
    _write_ours(buffer)
    assert buffer.getvalue() == theirs.read_bytes()
    assert not buffer.closed


def test_mindspore_loads_our_file(tmp_path):
    ours = _write_ours(tmp_path / "ours.ckpt", crc_check=True)
    loaded = ms.load_checkpoint(str(ours), crc_check=True)
    expected = list(_entries())
    assert list(loaded) == [info.name for info, _ in expected]
    for info, value in expected:
        if info.is_string:
            assert loaded[info.name] == value
        else:
            assert str(loaded[info.name].dtype) == info.dtype
            assert tuple(loaded[info.name].shape) == info.shape
            assert loaded[info.name].get_bytes() == value.tobytes()


def test_copy_round_trip_is_identical(tmp_path):
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", crc_check=True)
    with open_checkpoint(theirs) as reader:
        _copy(reader, tmp_path / "ours.ckpt", crc_check=True)
    assert (tmp_path / "ours.ckpt").read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("chunk_size", [16, 48, 1 << 20])
def test_write_non_contiguous_arrays(tmp_path, monkeypatch, chunk_size):
    monkeypatch.setattr(base, "COPY_CHUNK_SIZE", chunk_size)
    monkeypatch.setattr(ckpt, "PIECE_SIZE", 100)
    full = _random("Float32", (12, 10))
    cube = _random("Int16", (3, 4, 5))
    cases = [
        ("transposed", full.T),
        ("columns", full[:, 2:7]),
        ("every_other_row", full[::2]),
        ("reversed", full[::-1, ::-1]),
        ("cube_transposed", cube.transpose(2, 0, 1)),
        ("strided_1d", full[:, 3]),
    ]
    samples = [(name, "Int16" if name.startswith("cube") else "Float32", array) for name, array in cases]
    contiguous = [(name, dtype, np.ascontiguousarray(array)) for name, dtype, array in samples]
    strided = _write_ours(tmp_path / "strided.ckpt", samples, [])
    dense = _write_ours(tmp_path / "dense.ckpt", contiguous, [])
    assert strided.read_bytes() == dense.read_bytes()
    with open_checkpoint(strided) as reader:
        for name, array in cases:
            assert reader.array(name).tobytes() == np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_write_chunks_matches_write(tmp_path, small_pieces, chunk):
    arrays = list(_entries(PIECE_SAMPLES, APPEND_ENTRIES))
    expected = _write_ours(io.BytesIO(), PIECE_SAMPLES, APPEND_ENTRIES, crc_check=True).getvalue()
    buffer = io.BytesIO()
    with open_writer(buffer, [info for info, _ in arrays], "ckpt", crc_check=True) as writer:
        for info, value in arrays:
            if info.is_string:
                writer.write(info.name, value)
                continue
            content = value.tobytes()
            writer.write_chunks(info.name, (content[start : start + chunk] for start in range(0, len(content), chunk)))
    assert buffer.getvalue() == expected


def test_write_chunks_checks_size():
    entries = [TensorInfo("w", "Float32", (2,), 8), TensorInfo.of_string("note", "x")]
    short = open_writer(io.BytesIO(), entries, "ckpt")
    with pytest.raises(CheckpointFormatError, match="parameter 'w': the content written has 4 bytes but the entry declares 8"):
        short.write_chunks("w", [b"abcd"])
    long = open_writer(io.BytesIO(), entries, "ckpt")
    with pytest.raises(CheckpointFormatError, match="has at least 12 bytes but the entry declares 8"):
        long.write_chunks("w", [b"abcd", b"efgh", b"ijkl"])
    with open_writer(io.BytesIO(), entries, "ckpt") as writer:
        writer.write_chunks("w", [b"abcd", b"", b"efgh"])
        with pytest.raises(CheckpointFormatError, match="parameter 'note': is a str entry; write it with write()"):
            writer.write_chunks("note", [b"x\0\0\0"])
        writer.write("note", "x")


def test_empty_tensor_written_as_one_record(tmp_path):
    # MindSpore 2.10 writes no record for a tensor without content; we keep the parameter.
    samples = [("empty", "Float32", np.zeros((0, 3), np.float32)), ("w", "Float32", _random("Float32", (2,)))]
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", samples, None)
    assert _record_tags(theirs) == ["w"]
    ours = _write_ours(tmp_path / "ours.ckpt", samples, [])
    assert _record_tags(ours) == ["empty", "w"]
    loaded = ms.load_checkpoint(str(ours))
    assert tuple(loaded["empty"].shape) == (0, 3)
    with open_checkpoint(ours) as reader:
        assert reader.info("empty") == TensorInfo("empty", "Float32", (0, 3), 0)
        assert reader.array("empty").shape == (0, 3)


# -- records in several pieces ----------------------------------------------------------------


@pytest.fixture
def small_pieces(monkeypatch):
    """Cut records at 1 KiB on both sides (MindSpore's SLICE_SIZE is in KiB)."""
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    monkeypatch.setattr(ckpt, "PIECE_SIZE", 1024)


PIECE_SAMPLES = [
    ("big", "Float32", _random("Float32", (10, 100))),  # 4000 bytes: 1024, 1024, 1024, 928
    ("exact", "Int8", _random("Int8", (1024,))),  # exactly one piece
    ("bf16", "BFloat16", _random("BFloat16", (33, 17))),
    ("small", "Float64", _random("Float64", (3,))),
]


def test_pieces_match_mindspore(tmp_path, small_pieces):
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", PIECE_SAMPLES, APPEND, crc_check=True)
    assert _record_tags(theirs)[:9] == ["big"] * 4 + ["exact"] + ["bf16"] * 2 + ["small", "epoch_num"]
    ours = _write_ours(tmp_path / "ours.ckpt", PIECE_SAMPLES, APPEND_ENTRIES, crc_check=True)
    assert ours.read_bytes() == theirs.read_bytes()


def test_pieces_read_joined(tmp_path, small_pieces):
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", PIECE_SAMPLES, None)
    loaded = ms.load_checkpoint(str(theirs))
    with open_checkpoint(theirs) as reader:
        assert reader.names() == [name for name, _, _ in PIECE_SAMPLES]
        for name, dtype, value in PIECE_SAMPLES:
            assert reader.info(name) == TensorInfo(name, dtype, value.shape, value.nbytes)
            array = reader.array(name)
            assert array.tobytes() == value.tobytes() == loaded[name].get_bytes()
            assert not array.flags.writeable
        assert not _views_mapping(reader, reader.array("big"))
        assert _views_mapping(reader, reader.array("small"))


def test_mindspore_loads_our_pieces(tmp_path, small_pieces):
    ours = _write_ours(tmp_path / "ours.ckpt", PIECE_SAMPLES, [])
    assert _record_tags(ours).count("big") == 4
    loaded = ms.load_checkpoint(str(ours))
    for name, dtype, value in PIECE_SAMPLES:
        assert loaded[name].get_bytes() == value.tobytes()


@pytest.mark.slow
def test_real_piece_over_512_mib(tmp_path):
    size = 512 * 1024 * 1024 + 4096
    value = np.arange(size, dtype=np.uint64).astype(np.uint8)
    samples = [("huge", "UInt8", value), ("tail", "Float32", _random("Float32", (4,)))]
    theirs = _save_with_mindspore(tmp_path / "theirs.ckpt", samples, None)
    ours = _write_ours(tmp_path / "ours.ckpt", samples, [])
    with open(theirs, "rb") as a, open(ours, "rb") as b:
        while True:
            left, right = a.read(64 << 20), b.read(64 << 20)
            assert left == right
            if not left:
                break
    with open_checkpoint(theirs) as reader:
        assert reader.info("huge") == TensorInfo("huge", "UInt8", (size,), size)
        assert len(reader._entries["huge"].content) == 2
        assert np.array_equal(reader.array("huge"), value)


# -- the crc_num trailer ----------------------------------------------------------------------


def test_crc_trailer_read_and_verified(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt", crc_check=True)
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num"
    assert int.from_bytes(data[-10:], "big") == zlib.crc32(data[:-17])
    with open_checkpoint(path) as reader:
        assert reader.names() == [info.name for info, _ in _entries()]


def test_crc_mismatch_rejected(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.ckpt", crc_check=True)
    name, _, value = SAMPLES[0]
    data = bytearray(path.read_bytes())
    position = bytes(data).index(value.tobytes())
    data[position] ^= 0xFF
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"damaged\.ckpt: CRC-32 check failed"):
        open_checkpoint(damaged)
    with open_checkpoint(damaged, verify_crc=False) as reader:
        assert reader.array(name).tobytes() != value.tobytes()


def test_writer_without_crc_has_no_trailer(tmp_path):
    ours = _write_ours(tmp_path / "ours.ckpt")
    assert ours.read_bytes()[-17:-10] != b"crc_num"


# -- release ---------------------------------------------------------------------------------


def test_release_drops_resident_pages(tmp_path):
    psutil = pytest.importorskip("psutil")
    value = np.ones(64 * 1024 * 1024, np.uint8)
    path = _write_ours(tmp_path / "big.ckpt", [("w", "UInt8", value)], [])
    del value
    process = psutil.Process()
    with open_checkpoint(path) as reader:
        before = process.memory_info().rss
        assert int(reader.array("w").sum(dtype=np.uint64)) == 64 * 1024 * 1024
        touched = process.memory_info().rss
        reader.release("w")
        released = process.memory_info().rss
    assert touched - before > 48 * 1024 * 1024
    assert released - before < 16 * 1024 * 1024


# -- the writer's checks -----------------------------------------------------------------------


def _two_entries():
    return [TensorInfo("a", "Float32", (2,), 8), TensorInfo("b", "Int8", (3,), 3)]


def test_writer_rejects_wrong_order(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"parameter 'b': written out of order: expected 'a' next"):
        with open_writer(tmp_path / "x.ckpt", _two_entries(), "ckpt") as writer:
            writer.write("b", np.zeros(3, np.int8))


def test_writer_rejects_wrong_size_and_dtype(tmp_path):
    with open_writer(io.BytesIO(), _two_entries(), "ckpt") as writer:
        with pytest.raises(CheckpointFormatError, match=r"parameter 'a': array of shape \[3\] has 12 bytes"):
            writer.write("a", np.zeros(3, np.float32))
        with pytest.raises(CheckpointFormatError, match=r"array dtype float64 is not the storage dtype float32"):
            writer.write("a", np.zeros(1, np.float64))
        writer.write("a", np.zeros(2, np.float32))
        writer.write("b", np.zeros(3, np.int8))


def test_writer_rejects_early_close(tmp_path):
    writer = open_writer(tmp_path / "x.ckpt", _two_entries(), "ckpt", crc_check=True)
    writer.write("a", np.zeros(2, np.float32))
    with pytest.raises(CheckpointFormatError, match=r"parameter 'b': closed after 1 of 2 entries"):
        writer.close()
    assert b"crc_num" not in (tmp_path / "x.ckpt").read_bytes()


def test_writer_leaves_file_unfinished_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with open_writer(tmp_path / "x.ckpt", [TensorInfo("a", "Float32", (2,), 8)], "ckpt", crc_check=True) as writer:
            writer.write("a", np.zeros(2, np.float32))
            raise RuntimeError("interrupted")
    assert b"crc_num" not in (tmp_path / "x.ckpt").read_bytes()


@pytest.mark.parametrize(
    "entry, message",
    [
        (TensorInfo("w", "Float32", (3,), 8), r"parameter 'w': content is 8 bytes but shape \[3\] of Float32 needs 12"),
        (TensorInfo("w", "Complex64", (1,), 8), r"parameter 'w': unknown dtype 'Complex64'"),
        (TensorInfo("w", "Int8", (-1,), 0), r"parameter 'w': has a negative dim"),
    ],
)
def test_writer_rejects_bad_entries(tmp_path, entry, message):
    with pytest.raises(CheckpointFormatError, match=message):
        open_writer(tmp_path / "x.ckpt", [entry], "ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_writer_rejects_duplicate_names(tmp_path):
    entries = [TensorInfo("a", "Int8", (1,), 1)] * 2
    with pytest.raises(CheckpointFormatError, match="parameter 'a': appears twice"):
        open_writer(io.BytesIO(), entries, "ckpt")


def test_writer_string_checks(tmp_path):
    with open_writer(io.BytesIO(), [TensorInfo.of_string("note", "ab")], "ckpt") as writer:
        with pytest.raises(CheckpointFormatError, match="is a str entry but got ndarray"):
            writer.write("note", np.zeros(2, np.int8))
        with pytest.raises(CheckpointFormatError, match="str value takes 12 bytes but the entry declares 8"):
            writer.write("note", "abc")
        writer.write("note", "ab")


# -- hostile input ------------------------------------------------------------------------------


def _value(name: bytes, tensor: bytes = b"", extra: bytes = b"") -> bytes:
    """Encode one Checkpoint record from raw Value fields."""
    body = b"\x0a" + _encode_varint(len(name)) + name + extra
    if tensor:
        body += b"\x12" + _encode_varint(len(tensor)) + tensor
    return b"\x0a" + _encode_varint(len(body)) + body


def _tensor(dims=(), dtype=b"Float32", content=b"", packed=False) -> bytes:
    if packed:
        packed_dims = b"".join(_encode_varint(dim) for dim in dims)
        out = b"\x0a" + _encode_varint(len(packed_dims)) + packed_dims
    else:
        out = b"".join(b"\x08" + _encode_varint(dim) for dim in dims)
    out += b"\x12" + _encode_varint(len(dtype)) + dtype
    return out + b"\x1a" + _encode_varint(len(content)) + content


def _write(tmp_path, data: bytes, name="x.ckpt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _error_of(path) -> str:
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path)
    return str(caught.value)


def test_empty_file(tmp_path):
    path = _write(tmp_path, b"")
    assert _error_of(path) == f"{path}: file is empty"


def test_missing_file(tmp_path):
    assert "cannot be opened: No such file or directory" in _error_of(tmp_path / "absent.ckpt")


def test_directory(tmp_path):
    (tmp_path / "dir.ckpt").mkdir()
    assert _error_of(tmp_path / "dir.ckpt") == f"{tmp_path / 'dir.ckpt'}: is not a regular file"


def test_truncated_inside_parameter_names_it(tmp_path):
    data = record_header(b"w", [100], b"Float32", 400) + bytes(400)
    path = _write(tmp_path, data[:100])
    message = _error_of(path)
    assert message.startswith(f"{path}: parameter 'w': truncated at byte 100 inside its record")


def test_every_truncation_is_an_error_or_a_prefix(tmp_path):
    full = _write_ours(tmp_path / "full.ckpt", SAMPLES[:4], APPEND_ENTRIES[:3], crc_check=True)
    data = full.read_bytes()
    names = [name for name, _, _ in SAMPLES[:4]] + [name for name, _, _ in APPEND_ENTRIES[:3]]
    for size in range(1, len(data)):
        path = _write(tmp_path, data[:size], "cut.ckpt")
        try:
            with open_checkpoint(path) as reader:
                got = reader.names()
        except CheckpointFormatError as error:
            assert str(error).startswith(f"{path}: "), error
        else:
            assert got == names[: len(got)], size


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = _write(tmp_path, b"hello world, this is not a checkpoint\n")
    assert "not a valid checkpoint" in _error_of(path) or "not a MindSpore checkpoint" in _error_of(path)


def test_declared_length_past_end(tmp_path):
    path = _write(tmp_path, b"\x0a" + _encode_varint(1 << 40) + b"\x0a\x01w")
    message = _error_of(path)
    assert "truncated" in message
    assert "parameter 'w'" in message


def test_nested_length_past_its_message(tmp_path):
    # The tensor field claims more bytes than its Value has, although the file goes on.
    tensor = _tensor((2,), dtype=b"Int8", content=b"ab")
    body = b"\x0a\x01w" + b"\x12" + _encode_varint(len(tensor) + 50) + tensor
    data = b"\x0a" + _encode_varint(len(body)) + body + record_header(b"v", [1], b"Int8", 1) + b"\x00" * 60
    message = _error_of(_write(tmp_path, data))
    assert "parameter 'w': not a valid checkpoint: a field at byte" in message
    assert "truncated" not in message


def test_overlong_varint(tmp_path):
    path = _write(tmp_path, b"\x0a" + b"\xff" * 11 + b"\x01")
    assert "longer than 10 bytes" in _error_of(path)


def test_invalid_wire_type(tmp_path):
    path = _write(tmp_path, b"\x0f\x00")
    assert "invalid protobuf wire type 7 at byte 1" in _error_of(path)


def test_negative_dim(tmp_path):
    path = _write(tmp_path, record_header(b"w", [-3], b"Float32", 0))
    assert _error_of(path) == f"{path}: parameter 'w': has a negative dim in shape [-3]"


def test_absurd_dims(tmp_path):
    path = _write(tmp_path, record_header(b"w", [1 << 20, 1 << 20], b"Float32", 4) + bytes(4))
    assert "content is 4 bytes but shape [1048576, 1048576] of Float32 needs 4398046511104" in _error_of(path)


def test_dims_past_any_array_size(tmp_path):
    path = _write(tmp_path, record_header(b"w", [1 << 40, 0, 1 << 40], b"Float32", 0))
    assert _error_of(path) == (
        f"{path}: parameter 'w': shape [1099511627776, 0, 1099511627776] is too large for any array "
        "(more than 2**63 bytes)"
    )


def test_too_many_dims(tmp_path):
    path = _write(tmp_path, record_header(b"w", [1] * 40, b"Int8", 1) + bytes(1))
    assert "has 40 dims" in _error_of(path)


def test_content_size_mismatch(tmp_path):
    path = _write(tmp_path, record_header(b"w", [3], b"Float32", 8) + bytes(8))
    assert _error_of(path) == f"{path}: parameter 'w': content is 8 bytes but shape [3] of Float32 needs 12"


def test_unknown_dtype(tmp_path):
    path = _write(tmp_path, record_header(b"w", [2], b"Complex64", 16) + bytes(16))
    assert _error_of(path).startswith(f"{path}: parameter 'w': unknown dtype 'Complex64'")


def test_maptensor_rejected(tmp_path):
    message = checkpoint_pb2.Checkpoint()
    value = message.value.add()
    value.tag = "embedding.table"
    table = value.maptensor.tensor.add()
    table.dims.extend([2])
    table.tensor_type = "int32"
    table.tensor_content = bytes(8)
    before = _write_ours(io.BytesIO(), SAMPLES[:1], []).getvalue()
    path = _write(tmp_path, before + message.SerializeToString())
    assert _error_of(path).startswith(
        f"{path}: parameter 'embedding.table': maptensor records cannot be moved as bytes"
    )


def test_packed_dims_and_unknown_fields_accepted(tmp_path):
    content = np.arange(6, dtype=np.float32).tobytes()
    unknown = b"\x48\x05" + b"\x55" + bytes(4) + b"\x59" + bytes(8) + b"\x62\x02ab"  # fields 9-12
    tensor = unknown + _tensor((2, 3), content=content, packed=True) + unknown
    path = _write(tmp_path, unknown + _value(b"w", tensor, extra=unknown) + unknown)
    with open_checkpoint(path) as reader:
        assert reader.info("w") == TensorInfo("w", "Float32", (2, 3), 24)
        assert reader.array("w").tobytes() == content


def test_packed_dims_parse_like_protobuf(tmp_path):
    tensor = _tensor((4, 5), dtype=b"Int8", content=bytes(20), packed=True)
    data = _value(b"w", tensor)
    message = checkpoint_pb2.Checkpoint()
    message.ParseFromString(data)
    assert list(message.value[0].tensor.dims) == [4, 5]
    with open_checkpoint(_write(tmp_path, data)) as reader:
        assert reader.info("w").shape == (4, 5)


def test_record_without_name(tmp_path):
    body = b"\x12" + _encode_varint(len(_tensor())) + _tensor()
    path = _write(tmp_path, b"\x0a" + _encode_varint(len(body)) + body)
    assert "has no parameter name (tag)" in _error_of(path)


def test_record_without_tensor(tmp_path):
    assert "contains no tensor" in _error_of(_write(tmp_path, _value(b"w")))


def test_parameter_repeated_later(tmp_path):
    one = record_header(b"a", [1], b"Int8", 1) + b"\x01"
    other = record_header(b"b", [1], b"Int8", 1) + b"\x02"
    path = _write(tmp_path, one + other + one)
    assert "parameter 'a': is repeated at byte" in _error_of(path)


def test_pieces_that_disagree(tmp_path):
    first = record_header(b"w", [2], b"Float32", 4) + bytes(4)
    second = record_header(b"w", [3], b"Float32", 4) + bytes(4)
    assert "parameter 'w': the piece at byte" in _error_of(_write(tmp_path, first + second))


def test_odd_string_content(tmp_path):
    path = _write(tmp_path, record_header(b"note", [0], b"str", 6) + bytes(6))
    assert "not whole UTF-32 code units" in _error_of(path)


def test_invalid_utf32_string(tmp_path):
    path = _write(tmp_path, record_header(b"note", [0], b"str", 4) + (0x110000).to_bytes(4, "little"))
    with open_checkpoint(path) as reader:
        with pytest.raises(CheckpointFormatError, match="parameter 'note': str value is not valid UTF-32"):
            reader.string("note")


def test_only_unknown_fields(tmp_path):
    assert "contains no parameter records" in _error_of(_write(tmp_path, b"\x10\x01\x18\x02"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=300))
def test_random_bytes_never_crash(tmp_path, data):
    path = _write(tmp_path, data, "random.ckpt")
    try:
        with open_checkpoint(path) as reader:
            for info in reader:
                if info.is_string:
                    reader.string(info.name)
                else:
                    reader.array(info.name)
    except CheckpointFormatError as error:
        assert str(error).startswith(f"{path}: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_corrupted_byte_never_crashes(tmp_path, position, byte):
    data = bytearray(_write_ours(io.BytesIO(), SAMPLES[:3], APPEND_ENTRIES[:3]).getvalue())
    data[position % len(data)] = byte
    path = _write(tmp_path, bytes(data), "corrupt.ckpt")
    try:
        with open_checkpoint(path) as reader:
            for info in reader:
                if info.is_string:
                    reader.string(info.name)
                else:
                    reader.array(info.name)
    except CheckpointFormatError as error:
        assert str(error).startswith(f"{path}: ")
