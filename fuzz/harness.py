"""What the fuzz targets share: where inputs are written and what counts as a finding.

The readers take a path (they memory-map the file), so each input is written to one scratch
file on a tmpfs and opened from there. A `ShardsmithError` is the expected outcome of a bad
input; any other exception, a crash, a hang or a memory blow-up is a finding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# /dev/shm keeps millions of rewrites off the disk; fall back to the temp directory elsewhere.
_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()

_scratch_fds = {}


def scratch_path(suffix: str) -> Path:
    """Return a path to a per-process scratch file that nothing else can see.

    libFuzzer ends the process with C's exit(), which skips Python's atexit handlers, so the file
    is unlinked at once and reached through its descriptor under /proc/self/fd.
    """
    fd, name = tempfile.mkstemp(prefix="shardsmith-fuzz-", suffix=suffix, dir=_SCRATCH_DIR)
    os.unlink(name)
    path = Path(f"/proc/self/fd/{fd}")
    _scratch_fds[path] = fd
    return path


def write_input(path: Path, data: bytes) -> None:
    fd = _scratch_fds[path]
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def read_every_entry(reader) -> None:
    """Touch the content of every entry, the way merge and verify read them."""
    for info in reader:
        if info.is_string:
            reader.string(info.name)
            continue
        array = reader.array(info.name)
        if array.size:
            # Read the first and last element so the mapping is really dereferenced.
            flat = array.reshape(-1)
            flat[0].tobytes()
            flat[-1].tobytes()
        reader.release(info.name)
