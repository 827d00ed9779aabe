"""Writing several output files at once, each in order, with the sha256 computed beside the writes.

The engine produces every output file's bytes in order on one thread; `PipelinedFile.write`
only queues them. A bounded thread pool then works through each file's queue in two lanes:
one writes the buffers, the other feeds the same buffers to the file's sha256 for the manifest.
Both the write system call and hashlib release the GIL on large buffers. The copy into the
page cache, the hashing and the producer's next reads and band copies therefore run at the
same time, and several rank files are written at once. A cap on the bytes queued across all
files bounds the memory in flight: the producer blocks until enough of them are written and
hashed.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Deque, List, Optional, Sequence

from .formats.base import write_all
from .output import HashingFile

MIB = 1024 * 1024

# Bytes queued for writing and hashing across all output files, unless the caller sets another cap.
DEFAULT_MAX_INFLIGHT = 32 * MIB


def default_workers() -> int:
    """Return the pool size: two threads per core (at most 8), so a lane blocked on the disk leaves a core busy."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


class _Budget:
    """Bytes queued but not yet written and hashed, capped at `limit`.

    A buffer larger than the cap is let through when nothing else is queued, so a single large
    write cannot wait forever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._changed:
            while self.used and self.used + nbytes > self.limit:
                self._changed.wait()
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._changed:
            self.used -= nbytes
            self._changed.notify_all()


class _Lane:
    """Calls run one at a time in the order they were queued, each as its own pool task.

    Running one call per task, not the whole queue, lets the pool take turns between lanes.
    """

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self._queue: Deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(call)
            if self._running:
                return
            self._running = True
        self._executor.submit(self._run_next)

    def _run_next(self) -> None:
        with self._lock:
            call = self._queue.popleft()
        call()  # never raises: PipelinedFile._run records every error on the pipeline
        with self._lock:
            if not self._queue:
                self._running = False
                return
        self._executor.submit(self._run_next)


class _Item:
    """One queued buffer, done once both lanes have handled it."""

    __slots__ = ("data", "remaining", "callback")

    def __init__(self, data: memoryview, callback: Optional[Callable[[], None]]) -> None:
        self.data = data
        self.remaining = 2
        self.callback = callback


class WritePipeline:
    """The thread pool and the in-flight cap shared by the files of one job.

    Use it as a context manager. Leaving the block normally waits for every queued write. When
    an exception leaves it, what is still queued is dropped and only the writes under way are
    waited for, so the caller can close and delete the files safely.
    """

    def __init__(self, max_inflight: int = DEFAULT_MAX_INFLIGHT, workers: Optional[int] = None) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1 byte, got {max_inflight}")
        self.budget = _Budget(max_inflight)
        self.executor = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="shardsmith-io")
        self.files: List[PipelinedFile] = []
        self.error: Optional[BaseException] = None
        self.cancelled = False

    def file(self, target: HashingFile) -> "PipelinedFile":
        """Wrap one output file; its writes are queued on this pipeline."""
        pipelined = PipelinedFile(self, target)
        self.files.append(pipelined)
        return pipelined

    def call_when_written(self, callback: Callable[[], None], files: Optional[Sequence["PipelinedFile"]] = None) -> None:
        """Call `callback` (on a pool thread) once everything queued so far on `files` (default all) is written."""
        files = list(self.files if files is None else files)
        if not files:
            callback()
            return
        remaining = [len(files)]
        lock = threading.Lock()

        def one_done() -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                callback()

        for pipelined in files:
            pipelined.queue(memoryview(b""), one_done)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        for pipelined in self.files:
            pipelined.wait()

    def __enter__(self) -> "WritePipeline":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.cancelled = True
        try:
            self.wait()
        finally:
            self.executor.shutdown(wait=True)
        if exc_type is None:
            self.raise_error()


class PipelinedFile:
    """A write-only file whose writes are queued and carried out by a `WritePipeline`'s threads.

    `write` returns as soon as the buffer is queued, so the buffer must not change afterwards:
    the engine only writes bytes objects, views of read-only mappings, and new band buffers.
    `flush` waits until everything queued is written and raises the first error any write hit.
    """

    def __init__(self, pipeline: WritePipeline, target: HashingFile) -> None:
        self.pipeline = pipeline
        self.target = target
        self._write_lane = _Lane(pipeline.executor)
        self._hash_lane = _Lane(pipeline.executor)
        self._pending = 0
        self._idle = threading.Condition()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.queue(view, None)
        return len(view)

    def queue(self, data: memoryview, callback: Optional[Callable[[], None]]) -> None:
        self.pipeline.raise_error()
        self.pipeline.budget.acquire(len(data))
        with self._idle:
            self._pending += 1
        item = _Item(data, callback)
        self._write_lane.submit(lambda: self._run(item, self._write_item))
        self._hash_lane.submit(lambda: self._run(item, self._hash_item))

    def _write_item(self, data: memoryview) -> None:
        write_all(self.target.raw, data)
        self.target.size += len(data)

    def _hash_item(self, data: memoryview) -> None:
        self.target.sha256.update(data)

    def _run(self, item: _Item, step: Callable[[memoryview], None]) -> None:
        pipeline = self.pipeline
        try:
            if pipeline.error is None and not pipeline.cancelled and len(item.data):
                step(item.data)
        except BaseException as error:  # handed to the producer thread by raise_error()
            if pipeline.error is None:
                pipeline.error = error
        with self._idle:
            item.remaining -= 1
            done = item.remaining == 0
        if not done:
            return
        pipeline.budget.release(len(item.data))
        try:
            if item.callback is not None and pipeline.error is None and not pipeline.cancelled:
                item.callback()
        except BaseException as error:
            if pipeline.error is None:
                pipeline.error = error
        item.data = memoryview(b"")
        with self._idle:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()

    def wait(self) -> None:
        with self._idle:
            while self._pending:
                self._idle.wait()

    def flush(self) -> None:
        self.wait()
        self.pipeline.raise_error()
        self.target.flush()

    def seekable(self) -> bool:
        # The sha256 in the manifest covers the bytes in the order they were written.
        return False

    def tell(self) -> int:
        self.wait()
        return self.target.tell()
