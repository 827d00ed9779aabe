"""The write pipeline: every file's bytes in order, hashed, within the in-flight cap, errors raised."""

from __future__ import annotations

import hashlib
import errno
import threading
from pathlib import Path

import pytest

from shardsmith.output import HashingFile
from shardsmith.pipeline import WritePipeline


def _chunks(seed: int, count: int, size: int):
    return [hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32) for i in range(count)]


@pytest.mark.parametrize("max_inflight", [1, 100, 1 << 20])
def test_files_written_in_order_and_hashed(tmp_path, max_inflight):
    expected = {}
    with WritePipeline(max_inflight, workers=3) as pipeline:
        targets = []
        for index in range(4):
            path = tmp_path / f"out{index}.bin"
            hashing = HashingFile(open(path, "wb"))
            targets.append((path, hashing, pipeline.file(hashing)))
        for round_ in range(20):
            for index, (path, _, pipelined) in enumerate(targets):
                for chunk in _chunks(index * 100 + round_, 3, 320):
                    pipelined.write(chunk)
                    expected.setdefault(path, []).append(chunk)
        for _, hashing, pipelined in targets:
            pipelined.flush()
            hashing.raw.close()
    for path, hashing, _ in targets:
        content = b"".join(expected[path])
        assert path.read_bytes() == content
        assert hashing.sha256.hexdigest() == hashlib.sha256(content).hexdigest()
        assert hashing.size == len(content)


def test_in_flight_bytes_stay_under_cap(tmp_path):
    seen = []
    with WritePipeline(1000, workers=2) as pipeline:
        hashing = HashingFile(open(tmp_path / "out.bin", "wb"))
        pipelined = pipeline.file(hashing)
        for chunk in _chunks(1, 50, 320):
            pipelined.write(chunk)
            seen.append(pipeline.budget.used)
        pipelined.flush()
        hashing.raw.close()
    assert max(seen) <= 1000
    assert pipeline.budget.used == 0


def test_callback_runs_after_earlier_writes(tmp_path):
    sizes_at_callback = []
    done = threading.Event()
    with WritePipeline(1 << 20, workers=4) as pipeline:
        files = [HashingFile(open(tmp_path / f"out{i}.bin", "wb")) for i in range(3)]
        pipelined = [pipeline.file(f) for f in files]
        for p in pipelined:
            for chunk in _chunks(2, 10, 3200):
                p.write(chunk)

        def callback():
            sizes_at_callback.extend(f.size for f in files)
            done.set()

        pipeline.call_when_written(callback)
        for p in pipelined:
            p.flush()
        for f in files:
            f.raw.close()
    assert done.is_set()
    assert sizes_at_callback == [32000, 32000, 32000]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_raises_on_next_write():
    # /dev/full fails every write with ENOSPC, as a full disk does.
    with pytest.raises(OSError) as caught:
        with WritePipeline(4096, workers=2) as pipeline:
            hashing = HashingFile(open("/dev/full", "wb", buffering=0))
            pipelined = pipeline.file(hashing)
            try:
                for chunk in _chunks(3, 100, 3200):
                    pipelined.write(chunk)
                pipelined.flush()
            finally:
                hashing.raw.close()
    assert caught.value.errno == errno.ENOSPC


def test_error_leaves_pipeline_drained(tmp_path):
    pipeline = WritePipeline(1 << 20, workers=2)
    hashing = HashingFile(open(tmp_path / "out.bin", "wb"))
    with pytest.raises(RuntimeError, match="producer failed"):
        with pipeline:
            pipelined = pipeline.file(hashing)
            for chunk in _chunks(4, 20, 3200):
                pipelined.write(chunk)
            raise RuntimeError("producer failed")
    hashing.raw.close()
    assert pipeline.budget.used == 0
    with pytest.raises(RuntimeError):
        pipeline.executor.submit(print)  # the pool is shut down
    assert Path(tmp_path / "out.bin").stat().st_size <= 20 * 3200
