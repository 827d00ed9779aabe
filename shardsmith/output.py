"""Writing outputs so that a failed run leaves nothing behind.

Every output is built under a temporary name beside its target (same directory, so the final
rename is atomic on one filesystem), fsynced, and renamed into place only when complete. The
temporary name carries the writer's pid: a later run removes leftovers whose process is gone
(after a `kill -9` or a power cut), so a rerun never trips over them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional

from . import __version__
from .errors import OutputExistsError, ShardsmithError

logger = logging.getLogger(__name__)

_TMP_MARK = ".shardsmith-"
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.shardsmith-(?P<pid>\d+)\.tmp$")
MANIFEST_NAME = "manifest.json"


def temp_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Delete temporaries of `target` left by processes that no longer run."""
    parent = target.parent
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        m = _TMP_PATTERN.match(child.name)
        if not m or m.group("name") != target.name:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        logger.info("removing a leftover temporary output %s", child)
        _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_target(target: Path, force: bool, *, directory: bool) -> None:
    """Raise unless `target` may be written: it does not exist, is an empty directory, or --force."""
    if not target.exists() and not target.is_symlink():
        if not target.parent.exists():
            raise ShardsmithError("the output's parent directory does not exist", path=target.parent)
        return
    if directory and target.is_dir() and not any(target.iterdir()):
        return
    if not force:
        raise OutputExistsError("output exists", path=target, hint="Pass --force to replace it")
    if directory != target.is_dir():
        kind = "a directory" if target.is_dir() else "a file"
        raise OutputExistsError(f"output exists and is {kind}; remove it first", path=target)


class HashingFile:
    """A write-only binary file that computes the sha256 of what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
        self.sha256.update(view)
        written = self._file.write(view)
        self.size += len(view)
        return written

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self.size


@contextmanager
def _termination_as_exception() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while writing, so the cleanup below runs (SIGINT already raises)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OutputFiles:
    """The files one job writes, under a temporary root that is renamed into place at the end.

    For a single checkpoint the root is the file itself; for a rank set it is a directory holding
    `rank_<r>/` subdirectories and the manifest.
    """

    def __init__(self, target: Path, *, directory: bool, force: bool) -> None:
        self.target = Path(target)
        self.directory = directory
        self.force = force
        self.temp = temp_path_for(self.target)
        self.files: Dict[str, HashingFile] = {}
        self._handles: List[BinaryIO] = []
        self._order: List[str] = []
        self.committed = False

    def open(self, relative: Optional[str] = None) -> HashingFile:
        """Open one output file for writing; `relative` is its path inside a directory output."""
        if self.directory:
            if relative is None:
                raise ValueError("a directory output needs a relative path for each file")
            path = self.temp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            key = relative
        else:
            path = self.temp
            key = self.target.name
        handle = open(path, "xb")
        self._handles.append(handle)
        wrapped = HashingFile(handle)
        self.files[key] = wrapped
        self._order.append(key)
        return wrapped

    def manifest(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "tool": f"shardsmith {__version__}",
            **extra,
            "files": [{"path": key, "bytes": self.files[key].size, "sha256": self.files[key].sha256.hexdigest()} for key in self._order],
        }

    def _close_handles(self, sync: bool) -> None:
        for handle in self._handles:
            if handle.closed:
                continue
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
            handle.close()

    def commit(self, manifest: Optional[Dict[str, Any]] = None) -> None:
        self._close_handles(sync=True)
        if manifest is not None:
            data = json.dumps(self.manifest(manifest), indent=2).encode() + b"\n"
            if self.directory:
                manifest_path = self.temp / MANIFEST_NAME
            else:
                manifest_path = self.target.with_name(self.target.name + ".manifest.json")
                manifest_temp = temp_path_for(manifest_path)
                _write_synced(manifest_temp, data)
                os.replace(manifest_temp, manifest_path)
                manifest_path = None
            if manifest_path is not None:
                _write_synced(manifest_path, data)
        if self.directory:
            for sub in self.temp.rglob("*"):
                if sub.is_dir():
                    _fsync_dir(sub)
        old = None
        if self.target.exists():
            # Move the old output aside first, so a crash between the two renames keeps one of them.
            old = self.target.with_name(f".{self.target.name}{_TMP_MARK}{os.getpid()}.old")
            os.replace(self.target, old)
        os.replace(self.temp, self.target)
        _fsync_dir(self.target.parent)
        if old is not None:
            _remove(old)
        self.committed = True

    def abort(self) -> None:
        self._close_handles(sync=False)
        _remove(self.temp)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_output(target: Path, *, directory: bool, force: bool) -> Iterator[OutputFiles]:
    """Yield an `OutputFiles`; on success the caller calls `commit`, on any exception nothing remains.

    The target is checked before any work starts, so a refused overwrite costs nothing.
    """
    target = Path(target)
    check_target(target, force, directory=directory)
    remove_stale_temps(target)
    out = OutputFiles(target, directory=directory, force=force)
    if directory:
        out.temp.mkdir()
    try:
        with _termination_as_exception():
            yield out
    except OSError as exc:
        out.abort()
        raise ShardsmithError(f"writing the output failed: {exc.strerror or exc}", path=target) from exc
    finally:
        if not out.committed:
            out.abort()


ProgressCallback = Callable[[int], None]
