"""`convert` between .ckpt and .safetensors, with MindSpore as the oracle on both ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardsmith import dtypes, jobs
from shardsmith.convert import convert
from shardsmith.errors import CheckpointFormatError, OutputExistsError, ShardsmithError
from shardsmith.formats import TensorInfo, open_checkpoint, open_writer

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402

RNG = np.random.default_rng(11)


def _storage(dtype: str, shape) -> np.ndarray:
    """Return random content in storage dtype, with NaNs, infinities and -0.0 in the float types."""
    storage = dtypes.storage_dtype(dtype)
    if dtype == "Bool":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dtype == "BFloat16":
        words = (RNG.standard_normal(size=shape).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        # A quiet NaN, -inf, -0.0. MindSpore quiets a NaN payload when it builds a bfloat16
        # Tensor from float32, so payloads are tested apart, on a file shardsmith writes.
        special = [0x7FC0, 0xFF80, 0x8000]
        words.reshape(-1)[:3] = special[: words.size]
        return words
    if storage.kind == "f":
        values = RNG.standard_normal(size=shape).astype(storage)
        if values.size >= 3:
            quiet_nan_with_payload = {2: 0x7E01, 4: 0x7FC00001, 8: 0x7FF8000000000001}[storage.itemsize]
            values.view(f"u{storage.itemsize}").reshape(-1)[0] = quiet_nan_with_payload
            values.reshape(-1)[1:3] = [-np.inf, -0.0]
        return values
    info = np.iinfo(storage)
    return RNG.integers(info.min, info.max, size=shape, dtype=storage, endpoint=True)


def _tensor(dtype: str, array: np.ndarray) -> Tensor:
    if dtype == "BFloat16":
        return Tensor((array.astype(np.uint32) << 16).view(np.float32), dtype=mstype.bfloat16)
    if dtype == "Int4":
        return Tensor(array, dtype=mstype.qint4x2)
    return Tensor(array)


# Every tensor dtype, a 3-D tensor and two 0-d ones.
SAMPLES = {f"net.{dtype.lower()}": (dtype, _storage(dtype, (3, 5))) for dtype in dtypes.DTYPES}
SAMPLES["net.float32_3d"] = ("Float32", _storage("Float32", (2, 3, 4)))
SAMPLES["net.scalar"] = ("Float64", _storage("Float64", ()))
SAMPLES["net.int64_scalar"] = ("Int64", np.array(7, "<i8"))


def _save(path: Path, samples=SAMPLES, **kwargs) -> Path:
    params = [{"name": name, "data": Parameter(_tensor(dtype, array), name)} for name, (dtype, array) in samples.items()]
    ms.save_checkpoint(params, str(path), **kwargs)
    return path


def _contents(path: Path):
    with open_checkpoint(path) as reader:
        return [
            (i.name, i.dtype, i.shape, reader.string(i.name) if i.is_string else reader.array(i.name).tobytes())
            for i in reader
        ]


def _mindspore_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    array = value.asnumpy()
    return array.view(np.uint16).tobytes() if value.dtype == mstype.bfloat16 else array.tobytes()


def test_round_trip_every_dtype_bit_exact(tmp_path):
    original = _save(tmp_path / "net.ckpt")

    convert([original], tmp_path / "net.safetensors")
    convert([tmp_path / "net.safetensors"], tmp_path / "back.ckpt")

    assert _contents(tmp_path / "net.safetensors") == _contents(original)
    # save_checkpoint and shardsmith write the same records, so the file comes back byte for byte.
    assert (tmp_path / "back.ckpt").read_bytes() == original.read_bytes()
    for name, (dtype, array) in SAMPLES.items():
        entry = next(e for e in _contents(tmp_path / "net.safetensors") if e[0] == name)
        assert entry[1] == dtype
        assert entry[3] == array.tobytes(), name


def test_bfloat16_nan_payload_kept(tmp_path):
    words = np.array([[0x7FC1, 0xFFC3, 0x7F81], [0x0001, 0x8000, 0x3F80]], "<u2")  # NaNs with payloads, a signalling NaN
    source = tmp_path / "raw.ckpt"
    with open_writer(source, [TensorInfo.of_array("w", "BFloat16", words)], "ckpt") as writer:
        writer.write("w", words)

    convert([source], tmp_path / "raw.safetensors")
    convert([tmp_path / "raw.safetensors"], tmp_path / "back.ckpt")

    assert _contents(tmp_path / "raw.safetensors") == [("w", "BFloat16", (2, 3), words.tobytes())]
    assert (tmp_path / "back.ckpt").read_bytes() == source.read_bytes()


def test_mindspore_loads_written_safetensors(tmp_path):
    original = _save(tmp_path / "net.ckpt")

    convert([original], tmp_path / "net.safetensors")

    theirs = ms.load_checkpoint(str(original))
    ours = ms.load_checkpoint(str(tmp_path / "net.safetensors"), format="safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        assert ours[name].shape == value.shape, name
        assert _mindspore_bytes(ours[name]) == _mindspore_bytes(value), name


def test_mindspore_safetensors_to_ckpt(tmp_path):
    samples = {name: spec for name, spec in SAMPLES.items() if spec[0] != "BFloat16"}
    # MindSpore 2.10 with numpy 2 cannot save BFloat16 to safetensors, so this file leaves it out.
    theirs = _save(tmp_path / "theirs.safetensors", samples, format="safetensors")

    convert([theirs], tmp_path / "ours.ckpt")

    assert sorted(_contents(tmp_path / "ours.ckpt")) == sorted(_contents(theirs))
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert sorted(loaded) == sorted(samples)


def test_str_entries_rejected_for_safetensors(tmp_path):
    original = _save(tmp_path / "net.ckpt", append_dict={"note": "epoch 3", "epoch_num": 3})

    with pytest.raises(CheckpointFormatError, match=r"parameter 'note': holds str entries \('note'\)"):
        convert([original], tmp_path / "net.safetensors")
    assert not (tmp_path / "net.safetensors").exists()

    convert([original], tmp_path / "net.safetensors", exclude=["note"])
    names = [entry[0] for entry in _contents(tmp_path / "net.safetensors")]
    assert "note" not in names
    assert "epoch_num" in names


def test_str_entries_kept_in_ckpt(tmp_path):
    original = _save(tmp_path / "net.ckpt", append_dict={"note": "héllo ✓"})

    convert([original], tmp_path / "copy.ckpt", crc_check=True)

    assert ("note", "str", (0,), "héllo ✓") in _contents(tmp_path / "copy.ckpt")
    loaded = ms.load_checkpoint(str(tmp_path / "copy.ckpt"), crc_check=True)
    assert loaded["note"] == "héllo ✓"


def test_rank_set_keeps_rank_dirs_and_names(tmp_path):
    source = tmp_path / "set"
    for rank in range(3):
        (source / f"rank_{rank}").mkdir(parents=True)
        _save(source / f"rank_{rank}" / f"net-2_{rank}.ckpt")

    report = convert([source], tmp_path / "out")

    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.safetensors")) == [
        f"rank_{rank}/net-2_{rank}.safetensors" for rank in range(3)
    ]
    assert report.parameters == len(SAMPLES)
    for rank in range(3):
        assert _contents(tmp_path / "out" / f"rank_{rank}" / f"net-2_{rank}.safetensors") == _contents(
            source / f"rank_{rank}" / f"net-2_{rank}.ckpt"
        )


def test_merge_across_formats(tmp_path):
    samples = {"w": ("BFloat16", _storage("BFloat16", (8, 4))), "b": ("Float32", _storage("Float32", (4,)))}
    full = _save(tmp_path / "full.ckpt", samples)
    plan = tmp_path / "plan.toml"
    plan.write_text('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    jobs.split(full, plan, tmp_path / "ckpt_set")
    convert([tmp_path / "ckpt_set"], tmp_path / "st_set", format="safetensors")

    jobs.merge([tmp_path / "st_set"], plan, tmp_path / "merged.ckpt")
    jobs.merge([tmp_path / "ckpt_set"], plan, tmp_path / "merged.safetensors")

    assert (tmp_path / "merged.ckpt").read_bytes() == full.read_bytes()
    assert _contents(tmp_path / "merged.safetensors") == _contents(full)
    loaded = ms.load_checkpoint(str(tmp_path / "merged.safetensors"), format="safetensors")
    assert _mindspore_bytes(loaded["w"]) == samples["w"][1].tobytes()


def test_existing_output_needs_force(tmp_path):
    original = _save(tmp_path / "net.ckpt", {"w": ("Float32", _storage("Float32", (2, 2)))})
    target = tmp_path / "net.safetensors"
    target.write_bytes(b"old")

    with pytest.raises(OutputExistsError, match="output exists"):
        convert([original], target)
    assert target.read_bytes() == b"old"

    convert([original], target, force=True)
    assert _contents(target) == _contents(original)


def test_dry_run_writes_nothing(tmp_path):
    original = _save(tmp_path / "net.ckpt", {"w": ("Float32", _storage("Float32", (2, 2)))})

    report = convert([original], tmp_path / "net.safetensors", dry_run=True)

    assert report.dry_run
    assert report.files == [{"path": "net.safetensors", "bytes": 16}]
    assert list(tmp_path.iterdir()) == [original]


def test_verify_and_format_choice(tmp_path):
    original = _save(tmp_path / "net.ckpt", {"w": ("Int4", _storage("Int8", (2, 4)))})

    convert([original], tmp_path / "out.bin", verify=True)
    convert([original], tmp_path / "again.bin", format="ckpt", verify=True)

    assert _contents_as(tmp_path / "out.bin", "safetensors") == _contents(original)
    assert (tmp_path / "again.bin").read_bytes() == original.read_bytes()


def _contents_as(path: Path, fmt: str):
    with open_checkpoint(path, fmt) as reader:
        return [(i.name, i.dtype, i.shape, reader.array(i.name).tobytes()) for i in reader]


def test_unknown_format_rejected(tmp_path):
    original = _save(tmp_path / "net.ckpt", {"w": ("Float32", _storage("Float32", (2, 2)))})
    with pytest.raises(ShardsmithError, match="unknown format 'npz'"):
        convert([original], tmp_path / "x", format="npz")
