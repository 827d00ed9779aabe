"""Format detection, the public entry points and the dtype table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardsmith import dtypes
from shardsmith.errors import CheckpointFormatError
from shardsmith.formats import FORMATS, TensorInfo, detect_format, open_checkpoint, open_writer
from shardsmith.formats.base import iter_c_order


@pytest.mark.parametrize(
    "path, override, expected",
    [
        ("rank_0/net.ckpt", None, "ckpt"),
        ("rank_0/net.CKPT", None, "ckpt"),
        ("model.safetensors", None, "safetensors"),
        ("model.bin", "safetensors", "safetensors"),
        ("model.safetensors", "ckpt", "ckpt"),
    ],
)
def test_detect_format(path, override, expected):
    assert detect_format(path, override) == expected


def test_detect_format_unknown_suffix():
    with pytest.raises(CheckpointFormatError, match=r"^rank_2/x\.bin: cannot tell the checkpoint format from the suffix '\.bin'"):
        detect_format("rank_2/x.bin")


def test_detect_format_unknown_override():
    with pytest.raises(CheckpointFormatError, match=r"unknown checkpoint format 'pt'; expected one of ckpt, safetensors"):
        detect_format("x.ckpt", "pt")


def test_formats_tuple():
    assert FORMATS == ("ckpt", "safetensors")


@pytest.mark.parametrize("fmt", FORMATS)
def test_override_reads_any_suffix(tmp_path, fmt):
    path = tmp_path / "weights.bin"
    entries = [TensorInfo("w", "Float32", (2,), 8)]
    with open_writer(path, entries, fmt) as writer:
        writer.write("w", np.array([1.5, -2.0], np.float32))
    with open_checkpoint(path, fmt) as reader:
        assert reader.format == fmt
        assert list(reader) == entries
        assert reader.array("w").tolist() == [1.5, -2.0]


def test_wrong_format_gives_one_error(tmp_path):
    for fmt, other in [("ckpt", "safetensors"), ("safetensors", "ckpt")]:
        path = tmp_path / f"w.{fmt}"
        with open_writer(path, [TensorInfo("w", "Int8", (1,), 1)], fmt) as writer:
            writer.write("w", np.zeros(1, np.int8))
        with pytest.raises(CheckpointFormatError, match=rf"w\.{fmt}: .*(header|not a valid checkpoint)"):
            open_checkpoint(path, other)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("crc_check", [False, True])
def test_has_crc(tmp_path, fmt, crc_check):
    path = tmp_path / f"w.{fmt}"
    with open_writer(path, [TensorInfo("w", "Int8", (2,), 2)], fmt, crc_check=crc_check) as writer:
        writer.write("w", np.arange(2, dtype=np.int8))
    with open_checkpoint(path) as reader:
        assert reader.has_crc is crc_check


def test_metadata_of_each_format(tmp_path):
    for fmt, expected in [("ckpt", {}), ("safetensors", {"format": "ms"})]:
        path = tmp_path / f"w.{fmt}"
        with open_writer(path, [TensorInfo("w", "Int8", (1,), 1)], fmt) as writer:
            writer.write("w", np.zeros(1, np.int8))
        with open_checkpoint(path) as reader:
            assert reader.metadata == expected


def test_fifo_is_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointFormatError, match=r"pipe\.ckpt: is not a regular file"):
        open_checkpoint(fifo)


REGRESSIONS = [path for fmt in FORMATS for path in sorted((Path(__file__).parent / "regressions" / fmt).glob("*"))]


@pytest.mark.parametrize("path", REGRESSIONS, ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_regression_inputs_fail_cleanly(path):
    fmt = path.parent.name
    try:
        with open_checkpoint(path, fmt) as reader:
            for info in reader:
                if info.is_string:
                    reader.string(info.name)
                else:
                    reader.array(info.name)
    except CheckpointFormatError as error:
        assert str(error).startswith(f"{path}: ")


def test_open_writer_unknown_format(tmp_path):
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format 'npz'"):
        open_writer(tmp_path / "x.npz", [], "npz")


def test_reader_closes(tmp_path):
    path = tmp_path / "w.ckpt"
    with open_writer(path, [TensorInfo("w", "Int8", (3,), 3)], "ckpt") as writer:
        writer.write("w", np.arange(3, dtype=np.int8))
    reader = open_checkpoint(path)
    kept = reader.array("w")
    reader.close()
    assert kept.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="closed"):
        reader.array("w")
    reader.close()


@pytest.mark.parametrize("chunk_size", [2, 3, 16, 48, 1 << 20])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.int16).reshape(3, 4, 5).transpose(2, 0, 1),
        np.arange(100, dtype=np.int16)[::3],
        np.arange(60, dtype=np.int16).reshape(6, 10)[:, 2:9],
        np.arange(60, dtype=np.int16).reshape(6, 10),
    ],
)
def test_iter_c_order_chunks(array, chunk_size):
    chunks = list(iter_c_order(array, chunk_size))
    assert b"".join(bytes(chunk) for chunk in chunks) == np.ascontiguousarray(array).tobytes()
    assert max(len(chunk) for chunk in chunks) <= chunk_size


def test_writer_target_cannot_be_created(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"x\.ckpt: cannot be created: No such file or directory"):
        open_writer(tmp_path / "missing" / "x.ckpt", [], "ckpt")


def test_tensor_info_helpers():
    info = TensorInfo.of_array("w", "BFloat16", np.zeros((2, 3), "<u2"))
    assert info == TensorInfo("w", "BFloat16", (2, 3), 12)
    assert info.storage_dtype == np.dtype("<u2")
    assert info.storage_shape == (2, 3)
    assert not info.is_string
    assert TensorInfo.of_string("note", "ab") == TensorInfo("note", "str", (0,), 8)
    assert TensorInfo.of_string("note", "").nbytes == 4


# -- the dtype table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, storage, safetensors",
    [
        ("Int8", "<i1", "I8"),
        ("UInt8", "<u1", "U8"),
        ("Int16", "<i2", "I16"),
        ("UInt16", "<u2", "U16"),
        ("Int32", "<i4", "I32"),
        ("UInt32", "<u4", "U32"),
        ("Int64", "<i8", "I64"),
        ("UInt64", "<u8", "U64"),
        ("Float16", "<f2", "F16"),
        ("Float32", "<f4", "F32"),
        ("Float64", "<f8", "F64"),
        ("Bool", "?", "BOOL"),
        ("BFloat16", "<u2", "BF16"),
        ("Int4", "<i1", "I8"),
    ],
)
def test_dtype_table(name, storage, safetensors):
    assert dtypes.storage_dtype(name) == np.dtype(storage)
    assert dtypes.itemsize(name) == np.dtype(storage).itemsize
    assert dtypes.safetensors_name(name) == safetensors
    mark = "Int4" if name == "Int4" else None
    assert dtypes.from_safetensors(safetensors, mark) == name


def test_dtype_names_match_mindspore():
    serialization = pytest.importorskip("mindspore.train.serialization")
    assert set(dtypes.DTYPE_NAMES) == set(serialization.tensor_to_ms_type)


def test_unknown_dtypes():
    with pytest.raises(KeyError, match="unknown tensor dtype 'Complex64'"):
        dtypes.storage_dtype("Complex64")
    with pytest.raises(KeyError, match="unknown tensor dtype 'str'"):
        dtypes.itemsize("str")
    with pytest.raises(KeyError, match="'F8_E4M3' has no MindSpore equivalent"):
        dtypes.from_safetensors("F8_E4M3")
    assert dtypes.is_known("str")
    assert not dtypes.is_known("float32")


def test_storage_shape_and_packing():
    assert dtypes.storage_shape("Int4", (4, 8)) == (4, 8)
    assert dtypes.storage_shape("Float32", ()) == ()
    assert dtypes.expected_nbytes("Int4", (4, 8)) == 32
    assert dtypes.expected_nbytes("Float64", ()) == 8
    assert dtypes.packed_last_dim("Int4")
    assert not dtypes.packed_last_dim("Int8")


def test_int4_storage_matches_mindspore():
    ms = pytest.importorskip("mindspore")
    packed = np.array([[0x21, -0x79], [0x65, 0x07]], np.int8)
    tensor = ms.Tensor(packed, dtype=ms.qint4x2)
    assert tuple(tensor.shape) == (2, 2)
    assert tensor.itemsize == dtypes.itemsize("Int4")
    assert tensor.get_bytes() == packed.tobytes()


def test_to_float64_bfloat16_matches_mindspore():
    ms = pytest.importorskip("mindspore")
    values = np.array([1.0, -2.5, 3.140625, 65280.0, -0.0, np.inf], np.float32)
    words = (values.view(np.uint32) >> 16).astype("<u2")
    tensor = ms.Tensor(values, dtype=ms.bfloat16)
    assert tensor.get_bytes() == words.tobytes()
    expected = tensor.astype(ms.float32).asnumpy().astype(np.float64)
    assert np.array_equal(dtypes.to_float64(words, "BFloat16"), expected)


def test_to_float64_other_dtypes():
    assert dtypes.to_float64(np.array([True, False]), "Bool").tolist() == [1.0, 0.0]
    assert dtypes.to_float64(np.array([-3], np.int64), "Int64").tolist() == [-3.0]
    unpacked = dtypes.to_float64(np.array([[0x21, -0x79]], np.int8), "Int4")
    assert unpacked.tolist() == [[1.0, 2.0, 7.0, -8.0]]
    with pytest.raises(TypeError, match="storage array"):
        dtypes.to_float64(np.zeros(2, np.float32), "BFloat16")
    with pytest.raises(TypeError, match="no numeric value"):
        dtypes.to_float64(np.zeros(2, np.float32), "str")
