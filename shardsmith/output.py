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
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence

from . import __version__
from .errors import OutputExistsError, ShardsmithError

logger = logging.getLogger(__name__)

_TMP_MARK = ".shardsmith-"
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.shardsmith-(?P<pid>\d+)\.(?P<kind>tmp|old)$")
MANIFEST_NAME = "manifest.json"
MANIFEST_SUFFIX = ".manifest.json"

# Signals that end a job while it writes. Each becomes an exception, so the temporaries are removed.
_TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def temp_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}.tmp")


def _aside_path_for(target: Path) -> Path:
    """Return the name an existing directory output takes while its replacement is renamed in."""
    return target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}.old")


def manifest_path_for(target: Path) -> Path:
    """Return the manifest path of a single-file output, beside it: `OUT.manifest.json`."""
    return target.with_name(target.name + MANIFEST_SUFFIX)


def _identity(path: Path) -> tuple:
    """Return what changes when a file is rewritten in place or replaced by a rename."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Clean up after writers of `target` that no longer run (killed, or the machine went down).

    Their temporaries of the output and of its manifest are deleted. An old directory output
    that was moved aside for a replacement that never arrived is put back in place.
    """
    parent = target.parent
    try:
        children = sorted(parent.iterdir())
    except OSError:
        return
    names = {target.name, manifest_path_for(target).name}
    for child in children:
        m = _TMP_PATTERN.match(child.name)
        if not m or m.group("name") not in names:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            if m.group("kind") == "old" and m.group("name") == target.name and not target.exists():
                logger.warning("restoring %s, moved aside by a run that did not finish", target)
                os.replace(child, target)
                continue
            logger.info("removing a leftover temporary output %s", child)
            _remove(child)
        except OSError as error:
            # Cleanup is best effort: the new temporary has another name, so a leftover that
            # cannot be removed does not stop this run.
            logger.warning("failed to remove %s: %s", child, error.strerror or error)


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


def _not_written_by_shardsmith(directory: Path) -> List[str]:
    """Return the files under `directory` that its shardsmith manifest does not list (all, without one).

    Empty rank_<r>/ folders count as ours: they are what an interrupted rank set leaves.
    """
    listed = set()
    manifest = directory / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if str(data.get("tool", "")).startswith("shardsmith"):
            listed = {str(f["path"]) for f in data.get("files", []) if isinstance(f, dict) and "path" in f}
            listed.add(MANIFEST_NAME)
    except (OSError, ValueError, AttributeError, TypeError):
        listed = set()
    foreign = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not re.fullmatch(r"rank_\d+", relative) and not any(p.startswith(relative + "/") for p in listed):
                if not any(path.iterdir()):
                    foreign.append(relative + "/")
            continue
        if relative not in listed:
            foreign.append(relative)
    return foreign


def check_target(target: Path, force: bool, *, directory: bool, inputs: Sequence[Path] = ()) -> None:
    """Raise unless `target` may be written: it does not exist, is an empty directory, or --force.

    Replacing the output must never remove an input, so `target` may neither be one of `inputs`
    nor contain one, even with --force.
    """
    resolved = target.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "contains"
            raise OutputExistsError(
                f"the output {what} the input {path}; replacing it would destroy the input",
                path=target,
                hint="Write the output somewhere else",
            )
    if not directory and not force:
        manifest = manifest_path_for(target)
        if manifest.exists():
            raise OutputExistsError(
                f"the manifest beside the output, {manifest.name}, exists", path=manifest, hint="Pass --force to replace it"
            )
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
    if directory:
        foreign = _not_written_by_shardsmith(target)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"output directory holds files its shardsmith manifest does not list ({shown}); --force replaces "
                "only a rank set shardsmith wrote, so that no other run's checkpoints or logs are deleted",
                path=target,
                hint="Remove those files or choose another output directory",
            )
    if not directory and not (target.is_file() or target.is_symlink()):
        # --force must not turn /dev/null or a FIFO into a checkpoint file.
        raise OutputExistsError("output exists and is not a regular file, so --force does not replace it", path=target)


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

    @property
    def raw(self) -> BinaryIO:
        """The file underneath, for a writer that hashes on another thread (`shardsmith.pipeline`).

        Whoever writes to it directly must feed the same bytes to `sha256` and add them to `size`.
        """
        return self._file


@contextmanager
def _termination_as_exception() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit while writing, so the cleanup runs (SIGINT already raises)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, handler) for signum in _TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and the terminating signals until the block ends, so a rename pair is not cut."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    deferred = {signal.SIGINT, *_TERMINATING_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputFiles:
    """The files one job writes, under a temporary root that is renamed into place at the end.

    For a single checkpoint the root is the file itself; for a rank set it is a directory holding
    `rank_<r>/` subdirectories and the manifest.
    """

    def __init__(self, target: Path, *, directory: bool, force: bool, inputs: Sequence[Path] = ()) -> None:
        self.target = Path(target)
        # A checkpoint that a running job rewrites while it is read makes a mix of two steps.
        self._inputs = {Path(p): _identity(Path(p)) for p in inputs}
        self.directory = directory
        self.force = force
        self.temp = temp_path_for(self.target)
        self.files: Dict[str, HashingFile] = {}
        self._handles: List[BinaryIO] = []
        self._order: List[str] = []
        self._manifest_temp: Optional[Path] = None
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
                continue
            try:
                handle.close()
            except OSError:
                # Closing flushes the buffer, which fails again on a full disk; the file is
                # being deleted, and close() releases the descriptor even when it raises.
                pass

    def commit(self, manifest: Optional[Dict[str, Any]] = None) -> None:
        """Sync every file, write the manifest, and rename the output into place.

        A manifest never describes a file it does not match: inside a directory output it is
        renamed in with the files; beside a single file, the old manifest is removed before the
        new file is renamed in and the new manifest only follows it.
        """
        self._check_inputs_unchanged()
        self._close_handles(sync=True)
        data = json.dumps(self.manifest(manifest), indent=2).encode() + b"\n" if manifest is not None else None
        if self.directory:
            if data is not None:
                _write_synced(self.temp / MANIFEST_NAME, data)
            for sub in [self.temp, *self.temp.rglob("*")]:
                if sub.is_dir():
                    _fsync_dir(sub)
            self._rename_directory()
        else:
            manifest_target = manifest_path_for(self.target)
            if data is not None:
                self._manifest_temp = temp_path_for(manifest_target)
                _write_synced(self._manifest_temp, data)
            with _signals_deferred():
                if manifest_target.exists():
                    manifest_target.unlink()
                os.replace(self.temp, self.target)
                self.committed = True
                if data is not None:
                    os.replace(self._manifest_temp, manifest_target)
                    self._manifest_temp = None
        _fsync_dir(self.target.parent)

    def _check_inputs_unchanged(self) -> None:
        for path, identity in self._inputs.items():
            try:
                now = _identity(path)
            except OSError as error:
                raise ShardsmithError(f"input disappeared while it was read: {error.strerror or error}", path=path) from None
            if now != identity:
                raise ShardsmithError(
                    "input changed while it was read (is a job still writing it?), so the output could mix "
                    "two versions of it",
                    path=path,
                    hint="Run again once the input is complete",
                )

    def _rename_directory(self) -> None:
        # rename() cannot replace a non-empty directory: move the old output aside first, and
        # put it back if the new one cannot take its place, so one of the two is always there.
        with _signals_deferred():
            aside = None
            if self.target.exists():
                aside = _aside_path_for(self.target)
                os.replace(self.target, aside)
            try:
                os.replace(self.temp, self.target)
            except BaseException:
                if aside is not None:
                    os.replace(aside, self.target)
                raise
            self.committed = True
        if aside is not None:
            _remove(aside)

    def abort(self) -> None:
        self._close_handles(sync=False)
        _remove(self.temp)
        if self._manifest_temp is not None:
            _remove(self._manifest_temp)
            self._manifest_temp = None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_output(
    target: Path, *, directory: bool, force: bool, inputs: Sequence[Path] = ()
) -> Iterator[OutputFiles]:
    """Yield an `OutputFiles`; on success the caller calls `commit`, on any exception nothing remains.

    The target is checked before any work starts, so a refused overwrite costs nothing.
    """
    target = Path(target)
    remove_stale_temps(target)
    check_target(target, force, directory=directory, inputs=inputs)
    out = OutputFiles(target, directory=directory, force=force, inputs=inputs)
    try:
        with _termination_as_exception():
            if directory:
                out.temp.mkdir()
            yield out
    except OSError as exc:
        out.abort()
        raise ShardsmithError(f"writing the output failed: {exc.strerror or exc}", path=target) from exc
    finally:
        if not out.committed:
            out.abort()


ProgressCallback = Callable[[int], None]
