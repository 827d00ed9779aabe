"""Encrypted checkpoints: files MindSpore encrypted with enc_key are read, and what shardsmith
encrypts MindSpore's load_checkpoint(dec_key=...) reads, for AES-GCM, AES-CBC and SM4-CBC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardsmith import engine
from shardsmith.convert import convert
from shardsmith.encryption import (
    ENC_MODES,
    KEY_ENV,
    Cipher,
    EncryptedCkptWriter,
    cipher_from_options,
    encryption_mode,
    load_key,
    open_checkpoint,
    open_writer,
)
from shardsmith.errors import CheckpointFormatError, ShardsmithError
from shardsmith.formats import TensorInfo
from shardsmith.formats import open_checkpoint as open_plain
from shardsmith.plan import loads_plan
from shardsmith.rankset import Source

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor  # noqa: E402
from mindspore.common import dtype as mstype  # noqa: E402

KEY = b"0123456789ABCDEF"
KEY_32 = bytes(range(32))
RNG = np.random.default_rng(5)

PARAMS = {
    "fc.weight": Tensor(RNG.standard_normal((40, 30)).astype(np.float32)),
    "fc.bias": Tensor(RNG.standard_normal((30,)).astype(np.float16)),
    "emb": Tensor(RNG.standard_normal((12, 6)).astype(np.float32), dtype=mstype.bfloat16),
    "ids": Tensor(RNG.integers(-5, 5, size=(3, 4)).astype(np.int64)),
}
APPEND = {"note": "épreuve ✓", "epoch_num": 4}


def _save(path: Path, params=PARAMS, append=APPEND, **kwargs) -> Path:
    ms.save_checkpoint(
        [{"name": name, "data": Parameter(value, name)} for name, value in params.items()],
        str(path),
        append_dict=dict(append) if append else None,
        **kwargs,
    )
    return path


def _contents(reader):
    return [
        (i.name, i.dtype, i.shape, reader.string(i.name) if i.is_string else reader.array(i.name).tobytes())
        for i in reader
    ]


def _mindspore_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode()
    array = value.asnumpy()
    return array.view(np.uint16).tobytes() if value.dtype == mstype.bfloat16 else array.tobytes()


@pytest.mark.parametrize("mode", ENC_MODES)
def test_read_mindspore_encrypted(tmp_path, mode):
    plain = _save(tmp_path / "plain.ckpt")
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode=mode)

    assert encryption_mode(encrypted) == mode
    assert encryption_mode(plain) is None
    with open_checkpoint(encrypted, cipher=Cipher(KEY, mode)) as reader, open_plain(plain) as expected:
        assert _contents(reader) == _contents(expected)


@pytest.mark.parametrize("mode", ENC_MODES)
def test_mindspore_reads_our_encrypted(tmp_path, mode):
    plain = _save(tmp_path / "plain.ckpt")
    target = tmp_path / "ours.ckpt"

    with open_plain(plain) as reader:
        with open_writer(target, list(reader), "ckpt", cipher=Cipher(KEY, mode)) as writer:
            for info in reader:
                writer.write(info.name, reader.string(info.name) if info.is_string else reader.array(info.name))

    assert encryption_mode(target) == mode
    loaded = ms.load_checkpoint(str(target), dec_key=KEY, dec_mode=mode)
    expected = ms.load_checkpoint(str(plain))
    assert list(loaded) == list(expected)
    for name, value in expected.items():
        assert _mindspore_bytes(loaded[name]) == _mindspore_bytes(value), name


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
def test_small_blocks_span_records(tmp_path, mode):
    # Blocks of 1000 plaintext bytes cut headers and contents, which MindSpore's decryption
    # allows; both readers must join them.
    plain = _save(tmp_path / "plain.ckpt")
    target = tmp_path / "blocks.ckpt"
    with open_plain(plain) as reader:
        with EncryptedCkptWriter(target, list(reader), Cipher(KEY_32, mode), block_size=1000) as writer:
            for info in reader:
                writer.write(info.name, reader.string(info.name) if info.is_string else reader.array(info.name))

    with open_checkpoint(target, cipher=Cipher(KEY_32, mode)) as reader, open_plain(plain) as expected:
        assert _contents(reader) == _contents(expected)
    loaded = ms.load_checkpoint(str(target), dec_key=KEY_32, dec_mode=mode)
    assert _mindspore_bytes(loaded["fc.weight"]) == PARAMS["fc.weight"].asnumpy().tobytes()


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
def test_tensor_across_mindspore_blocks(tmp_path, mode):
    # 72 MiB: more than one 64 MiB block, so a full CBC block's padding is found by the probe.
    big = np.arange(18 * 1024 * 1024, dtype=np.float32).reshape(18, -1)
    encrypted = _save(tmp_path / "big.ckpt", {"big": Tensor(big), "tail": PARAMS["fc.bias"]}, None, enc_key=KEY, enc_mode=mode)

    with open_checkpoint(encrypted, cipher=Cipher(KEY, mode)) as reader:
        assert reader.names() == ["big", "tail"]
        assert np.array_equal(reader.array("big"), big)
        assert reader.array("tail").tobytes() == PARAMS["fc.bias"].asnumpy().tobytes()


def test_wrong_key(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode="AES-GCM")
    with pytest.raises(CheckpointFormatError, match=r"enc.ckpt: decrypting the block at byte 0 with AES-GCM failed"):
        open_checkpoint(encrypted, cipher=Cipher(b"x" * 16, "AES-GCM"))


def test_wrong_mode(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode="AES-CBC")
    with pytest.raises(CheckpointFormatError, match=r"encrypted with AES-CBC, not AES-GCM\. Pass --enc-mode AES-CBC"):
        open_checkpoint(encrypted, cipher=Cipher(KEY, "AES-GCM"))


def test_missing_key(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode="SM4-CBC")
    with pytest.raises(CheckpointFormatError, match=r"the file is encrypted \(SM4-CBC\)\. Pass --key-file"):
        open_checkpoint(encrypted)


def test_tampered_block_rejected(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode="AES-GCM")
    data = bytearray(encrypted.read_bytes())
    data[-5] ^= 0x01
    tampered = tmp_path / "tampered.ckpt"
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="decrypting the block at byte 0 with AES-GCM failed"):
        with open_checkpoint(tampered, cipher=Cipher(KEY, "AES-GCM")) as reader:
            _contents(reader)


def test_truncated_file_rejected(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", enc_key=KEY, enc_mode="AES-CBC")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(encrypted.read_bytes()[:-20])
    with pytest.raises(CheckpointFormatError, match="which the file cannot hold"):
        open_checkpoint(truncated, cipher=Cipher(KEY, "AES-CBC"))


def test_merge_encrypted_rank_set(tmp_path):
    # The readers plug into the engine like plain ones: merge an encrypted 2-rank set.
    full = RNG.standard_normal((8, 4)).astype(np.float32)
    cipher = Cipher(KEY, "AES-CBC")
    paths = [
        _save(tmp_path / f"rank{r}.ckpt", {"w": Tensor(full[4 * r : 4 * r + 4])}, None, enc_key=KEY, enc_mode="AES-CBC")
        for r in range(2)
    ]
    plan = loads_plan('world_size = 2\n[[param]]\nmatch = "w"\nstrategy = "row"\n')
    written = {}

    def collect(rank, name, data):
        # The engine hands over an array or an iterator of C-order byte chunks.
        written[name] = data.tobytes() if isinstance(data, np.ndarray) else b"".join(bytes(c) for c in data)

    with Source([open_checkpoint(p, cipher=cipher) for p in paths]) as source:
        job = engine.prepare_merge(source, plan)
        engine.execute(job, source, collect)
    assert written["w"] == full.tobytes()


def test_convert_decrypts_and_encrypts(tmp_path):
    encrypted = _save(tmp_path / "enc.ckpt", PARAMS, None, enc_key=KEY, enc_mode="AES-GCM")
    cipher = Cipher(KEY, "AES-GCM")

    convert([encrypted], tmp_path / "plain.safetensors", cipher=cipher)
    convert([tmp_path / "plain.safetensors"], tmp_path / "again.ckpt", cipher=cipher.with_mode("SM4-CBC"), encrypt=True)

    assert encryption_mode(tmp_path / "plain.safetensors") is None
    loaded = ms.load_checkpoint(str(tmp_path / "again.ckpt"), dec_key=KEY, dec_mode="SM4-CBC")
    for name, value in PARAMS.items():
        assert _mindspore_bytes(loaded[name]) == _mindspore_bytes(value), name


def test_convert_rejects_encrypted_safetensors(tmp_path):
    plain = _save(tmp_path / "plain.ckpt", PARAMS, None)
    with pytest.raises(ShardsmithError, match="only .ckpt checkpoints can be encrypted"):
        convert([plain], tmp_path / "x.safetensors", cipher=Cipher(KEY), encrypt=True)


def test_encryption_rejects_crc(tmp_path):
    with pytest.raises(CheckpointFormatError, match="a CRC and encryption cannot be combined"):
        open_writer(tmp_path / "x.ckpt", [TensorInfo("w", "Float32", (1,), 4)], "ckpt", cipher=Cipher(KEY), crc_check=True)


def test_load_key_from_file(tmp_path):
    raw = tmp_path / "key.bin"
    raw.write_bytes(KEY)
    with_newline = tmp_path / "key.txt"
    with_newline.write_bytes(KEY + b"\n")
    assert load_key(raw, environ={}) == KEY
    assert load_key(with_newline, environ={}) == KEY
    # The file wins over the environment.
    assert load_key(raw, environ={KEY_ENV: KEY_32.hex()}) == KEY


def test_load_key_bad_length(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"0123456789")
    with pytest.raises(ShardsmithError, match=r"short.bin: the key file contains 10 bytes, but a key is 16, 24 or 32 raw bytes"):
        load_key(short, environ={})


def test_load_key_from_environment():
    assert load_key(None, environ={KEY_ENV: KEY_32.hex().upper()}) == KEY_32
    assert load_key(None, environ={}) is None
    with pytest.raises(ShardsmithError, match=r"\$SHARDSMITH_KEY is not hex digits") as error:
        load_key(None, environ={KEY_ENV: "not-a-secret-key"})
    assert "not-a-secret-key" not in str(error.value)
    with pytest.raises(ShardsmithError, match="contains a 3-byte key"):
        load_key(None, environ={KEY_ENV: "abcdef"})


def test_cipher_checks_and_hides_key():
    assert "0123" not in repr(Cipher(KEY))
    with pytest.raises(ShardsmithError, match="a SM4-CBC key is 16 bytes, but the key given is 32 bytes"):
        Cipher(KEY_32, "SM4-CBC")
    with pytest.raises(ShardsmithError, match="unknown encryption mode 'AES-ECB'"):
        Cipher(KEY, "AES-ECB")


def test_enc_mode_needs_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ShardsmithError, match="--enc-mode needs a key"):
        cipher_from_options(None, "AES-CBC")
    assert cipher_from_options(None, None) is None
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    assert cipher_from_options(None, "AES-CBC") == Cipher(KEY, "AES-CBC")
