"""The .safetensors codec against MindSpore 2.10 and the safetensors library as oracles."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardsmith import dtypes
from shardsmith.errors import CheckpointFormatError
from shardsmith.formats import TensorInfo, open_checkpoint, open_writer
from shardsmith.formats.safetensors import crc32_combine

ms = pytest.importorskip("mindspore")
safetensors = pytest.importorskip("safetensors")
from mindspore import Tensor  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402

RNG = np.random.default_rng(7)


def _random(dtype: str, shape) -> np.ndarray:
    storage = dtypes.storage_dtype(dtype)
    if dtype == "Bool":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dtype == "BFloat16":
        # Quarter steps are exact in bfloat16, so the words survive MindSpore's float32 input.
        values = np.asarray(RNG.integers(-300, 300, size=shape) / 4, np.float32)
        return (values.view(np.uint32) >> np.uint32(16)).astype("<u2")
    if storage.kind == "f":
        return RNG.standard_normal(size=shape).astype(storage)
    info = np.iinfo(storage)
    return RNG.integers(info.min, info.max, size=shape, dtype=storage, endpoint=True)


def _to_mindspore(dtype: str, array: np.ndarray) -> Tensor:
    if dtype == "BFloat16":
        as_float = (np.asarray(array, np.uint32) << np.uint32(16)).view(np.float32)
        return Tensor(as_float, dtype=mstype.bfloat16)
    if dtype == "Int4":
        return Tensor(array, dtype=mstype.qint4x2)
    return Tensor(array)


# MindSpore cannot save str values to safetensors (numpy's <U type has no safetensors dtype).
SAMPLES = [(f"layer.{dtype.lower()}", dtype, _random(dtype, (3, 4))) for dtype in dtypes.DTYPES]
SAMPLES += [("scalar.f64", "Float64", _random("Float64", ())), ("scalar.i32", "Int32", _random("Int32", ()))]
PLAIN_SAMPLES = [sample for sample in SAMPLES if sample[1] != "Int4"]
# MindSpore 2.10's safetensors crc_check calls bytes() on each numpy array, in save_checkpoint and
# load_checkpoint alike, which fails on 0-d arrays ("negative count") and on its bfloat16 type
# ("cannot include dtype 'E' in a buffer").
CRC_SAMPLES = [sample for sample in SAMPLES if sample[2].ndim and sample[1] != "BFloat16"]


def _save_with_mindspore(path: Path, samples=SAMPLES, **kwargs) -> Path:
    save_list = [{"name": name, "data": _to_mindspore(dtype, array)} for name, dtype, array in samples]
    ms.save_checkpoint(save_list, str(path), format="safetensors", **kwargs)
    return path


def _write_ours(target, samples, **kwargs):
    entries = [TensorInfo.of_array(name, dtype, array) for name, dtype, array in samples]
    with open_writer(target, entries, "safetensors", **kwargs) as writer:
        for name, _, array in samples:
            writer.write(name, array)
    return target


def _split(data: bytes):
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _in_file_order(samples, path: Path):
    """Return ``samples`` in the data order of the file at ``path``.

    safetensors.numpy.save_file orders tensors by its dtype enum, then by name.
    """
    header, _ = _split(path.read_bytes())
    position = {name: index for index, name in enumerate(header)}
    return sorted(samples, key=lambda sample: position[sample[0]])


# -- reading what MindSpore writes -----------------------------------------------------------


def test_read_mindspore_file_exactly(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.safetensors")
    loaded = ms.load_checkpoint(str(path), format="safetensors")
    with open_checkpoint(path) as reader:
        assert reader.format == "safetensors"
        assert reader.names() == [name for name, _, _ in _in_file_order(SAMPLES, path)]
        assert reader.names()[:3] == ["layer.uint64", "layer.int64", "layer.float64"]
        for name, dtype, value in SAMPLES:
            assert reader.info(name) == TensorInfo(name, dtype, value.shape, value.nbytes)
            array = reader.array(name)
            assert array.dtype == dtypes.storage_dtype(dtype)
            assert array.tobytes() == value.tobytes() == loaded[name].get_bytes()
            assert str(loaded[name].dtype) == dtype
            assert not array.flags.writeable


def test_read_int4_mark(tmp_path):
    path = _save_with_mindspore(tmp_path / "q.safetensors", [("q", "Int4", _random("Int4", (2, 4)))])
    header, _ = _split(path.read_bytes())
    assert header["q"]["dtype"] == "I8"
    assert header["__metadata__"] == {"format": "ms", "q": "Int4"}
    with open_checkpoint(path) as reader:
        assert reader.info("q").dtype == "Int4"
        assert reader.metadata == {"format": "ms", "q": "Int4"}


def test_read_append_dict_scalars(tmp_path):
    path = _save_with_mindspore(tmp_path / "net.safetensors", SAMPLES[:1], append_dict={"epoch_num": 4, "lr": 0.25})
    with open_checkpoint(path) as reader:
        assert reader.info("epoch_num") == TensorInfo("epoch_num", "Int64", (), 8)
        assert int(reader.array("epoch_num")) == 4
        assert reader.info("lr") == TensorInfo("lr", "Float32", (), 4)


# -- writing -------------------------------------------------------------------------------------


def test_write_bytes_identical_to_mindspore(tmp_path):
    theirs = _save_with_mindspore(tmp_path / "theirs.safetensors", PLAIN_SAMPLES)
    ours = _write_ours(tmp_path / "ours.safetensors", _in_file_order(PLAIN_SAMPLES, theirs))
    assert ours.read_bytes() == theirs.read_bytes()


def test_copy_matches_mindspore_up_to_metadata_order(tmp_path):
    # MindSpore's metadata key order comes from a Rust HashMap and changes from run to run.
    theirs = _save_with_mindspore(tmp_path / "theirs.safetensors", CRC_SAMPLES, crc_check=True)
    with open_checkpoint(theirs) as reader:
        with open_writer(tmp_path / "ours.safetensors", list(reader), "safetensors", crc_check=True) as writer:
            for info in reader:
                writer.write(info.name, reader.array(info.name))
    their_header, their_data = _split(theirs.read_bytes())
    our_header, our_data = _split((tmp_path / "ours.safetensors").read_bytes())
    assert our_data == their_data
    assert our_header == their_header
    assert list(our_header) == list(their_header)


@pytest.mark.parametrize("samples, crc_check", [(SAMPLES, False), (CRC_SAMPLES, True)])
def test_mindspore_loads_our_order(tmp_path, samples, crc_check):
    ours = _write_ours(tmp_path / "ours.safetensors", list(reversed(samples)), crc_check=crc_check)
    with open_checkpoint(ours) as reader:
        assert reader.names() == [name for name, _, _ in reversed(samples)]
    loaded = ms.load_checkpoint(str(ours), format="safetensors", crc_check=crc_check)
    for name, dtype, value in samples:
        assert str(loaded[name].dtype) == dtype
        assert tuple(loaded[name].shape) == value.shape
        assert loaded[name].get_bytes() == value.tobytes()


def test_safetensors_library_reads_ours(tmp_path):
    ours = _write_ours(tmp_path / "ours.safetensors", PLAIN_SAMPLES, crc_check=True)
    with safetensors.safe_open(str(ours), framework="numpy") as opened:
        for name, _, value in PLAIN_SAMPLES:
            assert opened.get_tensor(name).tobytes() == value.tobytes()


def test_bfloat16_written_as_raw_words(tmp_path):
    words = np.array([[0x3F80, 0xC020], [0x7F80, 0x0001]], "<u2")  # 1.0, -2.5, inf, a subnormal
    ours = _write_ours(tmp_path / "bf.safetensors", [("w", "BFloat16", words)])
    (name, tensor), = safetensors.deserialize(ours.read_bytes())
    assert name == "w"
    assert tensor["dtype"] == "BF16"
    assert tensor["shape"] == [2, 2]
    assert bytes(tensor["data"]) == words.tobytes()
    with open_checkpoint(ours) as reader:
        assert reader.info("w") == TensorInfo("w", "BFloat16", (2, 2), 8)
        assert np.array_equal(reader.array("w"), words)


def test_str_entry_rejected(tmp_path):
    with pytest.raises(CheckpointFormatError, match="parameter 'note': str values cannot be stored in safetensors"):
        open_writer(tmp_path / "x.safetensors", [TensorInfo.of_string("note", "x")], "safetensors")


def test_empty_checkpoint(tmp_path):
    theirs = tmp_path / "theirs.safetensors"
    ms.save_checkpoint([], str(theirs), format="safetensors")
    ours = _write_ours(tmp_path / "ours.safetensors", [])
    assert ours.read_bytes() == theirs.read_bytes()
    with open_checkpoint(ours) as reader:
        assert len(reader) == 0


def test_zero_size_tensor(tmp_path):
    samples = [("empty", "Float32", np.zeros((0, 3), np.float32)), ("w", "Int8", _random("Int8", (2,)))]
    theirs = _save_with_mindspore(tmp_path / "theirs.safetensors", samples)
    ours = _write_ours(tmp_path / "ours.safetensors", _in_file_order(samples, theirs))
    assert ours.read_bytes() == theirs.read_bytes()
    with open_checkpoint(ours) as reader:
        assert reader.array("empty").shape == (0, 3)


def test_non_contiguous_array(tmp_path):
    full = _random("Float32", (6, 8))
    ours = _write_ours(tmp_path / "ours.safetensors", [("t", "Float32", full.T), ("c", "Float32", full[:, ::3])])
    with open_checkpoint(ours) as reader:
        assert np.array_equal(reader.array("t"), full.T)
        assert np.array_equal(reader.array("c"), full[:, ::3])


def test_write_chunks_matches_write(tmp_path):
    expected = _write_ours(io.BytesIO(), SAMPLES, crc_check=True).getvalue()
    buffer = io.BytesIO()
    entries = [TensorInfo.of_array(name, dtype, array) for name, dtype, array in SAMPLES]
    with open_writer(buffer, entries, "safetensors", crc_check=True) as writer:
        for name, _, array in SAMPLES:
            content = array.tobytes()
            writer.write_chunks(name, (content[start : start + 5] for start in range(0, len(content), 5)))
    assert buffer.getvalue() == expected


# -- crc_num ------------------------------------------------------------------------------------


def test_crc32_combine_matches_zlib():
    generator = random.Random(3)
    for _ in range(50):
        left = generator.randbytes(generator.randrange(0, 300))
        right = generator.randbytes(generator.randrange(0, 300))
        combined = crc32_combine(zlib.crc32(left), zlib.crc32(right), len(right))
        assert combined == zlib.crc32(left + right)


def test_crc_metadata_verified(tmp_path):
    theirs = _save_with_mindspore(tmp_path / "theirs.safetensors", CRC_SAMPLES, crc_check=True)
    with open_checkpoint(theirs) as reader:
        assert "crc_num" in reader.metadata
    _, data = _split(theirs.read_bytes())
    damaged = bytearray(theirs.read_bytes())
    damaged[len(damaged) - len(data) + 5] ^= 0x01
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointFormatError, match=r"damaged\.safetensors: CRC-32 check failed"):
        open_checkpoint(path)
    with open_checkpoint(path, verify_crc=False) as reader:
        assert len(reader) == len(CRC_SAMPLES)


def test_our_crc_matches_mindspore(tmp_path):
    theirs = _save_with_mindspore(tmp_path / "theirs.safetensors", CRC_SAMPLES, crc_check=True)
    ours = _write_ours(tmp_path / "ours.safetensors", list(reversed(CRC_SAMPLES)), crc_check=True)
    assert _split(ours.read_bytes())[0]["__metadata__"] == _split(theirs.read_bytes())[0]["__metadata__"]


def test_short_crc_keeps_reserved_header(tmp_path):
    # The header reserves 10 digits for crc_num; a shorter CRC leaves extra padding spaces.
    for seed in range(1000):
        sample = [("w", "Int32", np.array([seed], np.int32))]
        if zlib.crc32(np.array([seed], np.int32).tobytes(), zlib.crc32(b"w")) < 10**9:
            break
    ours = _write_ours(tmp_path / "ours.safetensors", sample, crc_check=True)
    header, _ = _split(ours.read_bytes())
    assert len(header["__metadata__"]["crc_num"]) < 10
    assert ms.load_checkpoint(str(ours), format="safetensors", crc_check=True)["w"].get_bytes() == sample[0][2].tobytes()
    with open_checkpoint(ours) as reader:
        assert reader.names() == ["w"]


def test_crc_needs_seekable_target():
    class Pipe(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            return len(data)

    with pytest.raises(CheckpointFormatError, match="crc_check needs a seekable target"):
        open_writer(Pipe(), [TensorInfo("w", "Int8", (1,), 1)], "safetensors", crc_check=True)


# -- hostile input ------------------------------------------------------------------------------


def _file(tmp_path, data: bytes, name="x.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _with_header(header, data: bytes = b"", size=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if size is None else size) + raw + data


def _error_of(path) -> str:
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path)
    return str(caught.value)


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_empty_file(tmp_path):
    path = _file(tmp_path, b"")
    assert _error_of(path) == f"{path}: file is empty"


def test_too_short(tmp_path):
    assert "is 3 bytes, too short for the 8-byte safetensors header size" in _error_of(_file(tmp_path, b"abc"))


def test_huge_header_size(tmp_path):
    path = _file(tmp_path, _with_header(b"{}", size=1 << 62))
    assert "declares a 4611686018427387904-byte header, more than the 100000000-byte limit" in _error_of(path)


def test_header_past_end(tmp_path):
    path = _file(tmp_path, _with_header(b"{}", size=1000))
    assert "truncated: declares a 1000-byte header but only 2 bytes follow" in _error_of(path)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"{not json", "the header is not valid JSON"),
        (b"[1, 2]", "the header is a JSON list, not an object"),
        (b"[" * 100000 + b"]" * 100000, "the header is not valid JSON"),
        (b"\xff\xfe", "the header is not UTF-8 text"),
        (b'{"w": 1, "w": 2}', "the header names 'w' twice"),
        (json.dumps({"__metadata__": [1]}).encode(), "__metadata__ must map names to strings"),
        (json.dumps({"__metadata__": {"a": 1}}).encode(), "__metadata__ must map names to strings"),
    ],
)
def test_invalid_header(tmp_path, header, message):
    assert message in _error_of(_file(tmp_path, _with_header(header)))


@pytest.mark.parametrize(
    "description, data, message",
    [
        ("nonsense", bytes(8), "parameter 'w': invalid header: the tensor description is not an object"),
        ({**W, "dtype": "F8_E4M3"}, bytes(8), "parameter 'w': safetensors dtype 'F8_E4M3' has no MindSpore equivalent"),
        ({**W, "dtype": 5}, bytes(8), "parameter 'w': invalid header: dtype is missing"),
        ({**W, "shape": [-2]}, bytes(8), "parameter 'w': has a negative dim in shape [-2]"),
        ({**W, "shape": [2.0]}, bytes(8), "parameter 'w': invalid header: shape [2.0] is not a list of integers"),
        ({**W, "shape": [True, 2]}, bytes(8), "is not a list of integers"),
        ({**W, "shape": [1 << 20, 1 << 20]}, bytes(8), "content is 8 bytes but shape [1048576, 1048576]"),
        ({**W, "shape": [1 << 40, 1 << 40]}, bytes(8), "is too large for any array"),
        ({**W, "shape": [3]}, bytes(8), "parameter 'w': content is 8 bytes but shape [3] of Float32 needs 12"),
        ({**W, "data_offsets": [8, 0]}, bytes(8), "data_offsets [8, 0] are not ascending"),
        ({**W, "data_offsets": [0]}, bytes(8), "is not a pair of integers"),
        (W, bytes(5), "parameter 'w': truncated: data_offsets [0, 8] end past the 5 bytes of data in the file"),
        ({**W, "data_offsets": [4, 12]}, bytes(12), "parameter 'w': data_offsets start at 4, but the previous tensor ends at 0"),
        (W, bytes(12), "4 bytes follow the last tensor's data"),
    ],
)
def test_invalid_tensor(tmp_path, description, data, message):
    path = _file(tmp_path, _with_header({"w": description}, data))
    assert message in _error_of(path)


def test_overlapping_tensors(tmp_path):
    header = {"a": W, "b": W}
    assert "parameter 'b': data_offsets start at 0, but the previous tensor ends at 8" in _error_of(
        _file(tmp_path, _with_header(header, bytes(8)))
    )


def test_every_truncation_is_an_error(tmp_path):
    data = _write_ours(io.BytesIO(), SAMPLES[:4], crc_check=True).getvalue()
    for size in range(1, len(data)):
        path = _file(tmp_path, data[:size], "cut.safetensors")
        with pytest.raises(CheckpointFormatError) as caught:
            open_checkpoint(path)
        assert str(caught.value).startswith(f"{path}: ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(max_size=200), data=st.binary(max_size=64))
def test_random_header_never_crashes(tmp_path, header, data):
    path = _file(tmp_path, _with_header(header, data), "random.safetensors")
    try:
        with open_checkpoint(path) as reader:
            for info in reader:
                reader.array(info.name)
    except CheckpointFormatError as error:
        assert str(error).startswith(f"{path}: ")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["F32", "I8", "BF16", "BOOL", "U64", "X"]) | st.text(max_size=3),
    shape=json_values,
    offsets=json_values,
    metadata=json_values,
    data=st.binary(max_size=40),
)
def test_random_json_header_never_crashes(tmp_path, dtype, shape, offsets, metadata, data):
    header = {"__metadata__": metadata, "w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
    path = _file(tmp_path, _with_header(header, data), "random.safetensors")
    try:
        with open_checkpoint(path) as reader:
            for info in reader:
                reader.array(info.name)
    except CheckpointFormatError as error:
        assert str(error).startswith(f"{path}: ")
