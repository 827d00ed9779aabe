"""Merge, split and reshard with the work divided over the workers of an msrun job.

Every worker opens the whole source, reading the headers and then only the pages of the boxes
it needs. It decides the same job as the offline command (`engine.prepare_*`) and writes its
share:

- split and reshard: target rank t's file is written by worker `t % workers`, and worker
  `i % workers` checks the copies of the i-th parameter;
- merge: the output's byte layout follows from the headers alone (a `.ckpt` record's size
  from its name, dtype, dims and content size; a `.safetensors` file's offsets from its
  header), so rank 0 creates the file at its final size and each worker writes one
  contiguous run of parameters, balanced by bytes, at its offset. For `--crc` each worker
  reports the CRC-32 of its run and rank 0 combines them into MindSpore's trailer.

Rank 0 owns the output: it creates the temporary root, writes the manifest (every file's
sha256, from each worker's read-back of what it wrote) and renames everything into place once
all workers agree they succeeded. The files and the manifest are the offline command's, byte
for byte. Each source file's CRC, when it has one, is checked by one worker (file i by worker
`i % workers`).

When to use it: for checkpoints of hundreds of GB on a shared parallel file system (Lustre,
GPFS, a cloud file store), where one process cannot use the storage's bandwidth and the
cluster's hosts can. On a single local disk it brings little: the offline commands already
write all target files at once, and the disk is the limit. It needs every source file visible
on every host; `shardsmith gather` is the tool when each host has only its own ranks' files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import dtypes as dt
from ..engine import Job, ParamMove, Selection, _Arrays, check_replicas, check_strings, prepare_merge, prepare_reshard, prepare_split
from ..errors import ShardsmithError
from ..formats import TensorInfo, detect_format, open_writer
from ..formats import ckpt as ckpt_format
from ..formats.safetensors import crc32_combine
from ..jobs import SUFFIXES, _plan_record
from ..output import atomic_output, check_target
from ..plan import Plan, load_plan
from ..rankset import Source
from .cluster import Cluster
from .gather import describe_exception
from .launch import print_warning, run_in_msrun
from .load import open_source_lazily
from .slices import build_slice

PathLike = Union[str, Path]

KINDS = ("merge", "split", "reshard")

# Bytes read at once when a written file is hashed for the manifest.
_HASH_READ_SIZE = 16 * 1024 * 1024


@dataclass
class _Recorded:
    """A file another worker wrote, as the manifest lists it: its size and sha256."""

    size: int
    digest: str

    @property
    def sha256(self) -> "_Recorded":
        return self

    def hexdigest(self) -> str:
        return self.digest


def _hash_file(path: Path, start: int = 0) -> Tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while True:
            block = handle.read(_HASH_READ_SIZE)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class _CrcFile:
    """A binary file that computes the CRC-32 and the count of the bytes written through it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self.size


def _rank_file(rank: int, prefix: str, fmt: str) -> str:
    return f"rank_{rank}/{prefix}{rank}{SUFFIXES[fmt]}"


def _output_format(kind: str, source: Source, output: Path, override: Optional[str]) -> str:
    if kind == "merge":
        return detect_format(output, override)
    if override is not None:
        return detect_format(output, override)
    return source.readers[0].format


# -- merge: byte layout of the output ----------------------------------------------------------


def _ckpt_entry_size(info: TensorInfo) -> int:
    """Return the bytes `CkptWriter` writes for one entry: its records' headers and content."""
    name = info.name.encode("utf-8")
    if info.is_string:
        return len(ckpt_format.record_header(name, [0], b"str", info.nbytes)) + info.nbytes
    dtype = info.dtype.encode("ascii")
    piece = ckpt_format.PIECE_SIZE
    sizes = [min(piece, info.nbytes - start) for start in range(0, info.nbytes, piece)] or [0]
    return sum(len(ckpt_format.record_header(name, info.shape, dtype, size)) + size for size in sizes)


def file_layout(entries: Sequence[TensorInfo], fmt: str, crc_check: bool) -> Tuple[bytes, List[int], int]:
    """Return (bytes before the first entry, each entry's offset, total file size) of a merge output."""
    if fmt == "ckpt":
        prefix = b""
        sizes = [_ckpt_entry_size(info) for info in entries]
        trailer = ckpt_format.CRC_TRAILER_SIZE if crc_check else 0
    else:
        if crc_check:
            raise ShardsmithError(
                "a distributed merge writes a CRC only into .ckpt files, because a .safetensors CRC goes in the "
                "header, before the data",
                hint="Merge to .ckpt, or run shardsmith merge --crc",
            )
        sink = io.BytesIO()
        open_writer(sink, entries, fmt)  # writes the header and nothing else until entries come
        prefix = sink.getvalue()
        sizes = [info.nbytes for info in entries]
        trailer = 0
    offsets = []
    position = len(prefix)
    for size in sizes:
        offsets.append(position)
        position += size
    return prefix, offsets, position + trailer


def share_by_bytes(offsets: Sequence[int], end: int, workers: int) -> List[int]:
    """Return each entry's worker: contiguous runs in order, each about 1/workers of the bytes."""
    if not offsets:
        return []
    start = offsets[0]
    span = max(end - start, 1)
    return [min(workers - 1, (offset - start) * workers // span) for offset in offsets]


# -- the job ------------------------------------------------------------------------------------


class _Worker:
    """One worker's part of a distributed job."""

    def __init__(self, cluster: Cluster, job: Job, source: Source, fmt: str, report: Callable[[str], None]):
        self.cluster = cluster
        self.job = job
        self.source = source
        self.fmt = fmt
        self.warnings: List[str] = []
        self.report = report  # prints the warnings of every worker, on rank 0

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def _value(self, move: ParamMove, arrays: _Arrays, target_rank: int) -> Any:
        if move.dtype == dt.STRING:
            return check_strings(move, self.source, self.warn)
        return build_slice(move, arrays, target_rank)

    def write_rank_files(self, root: Path, prefix: str, crc_check: bool) -> List[Dict[str, Any]]:
        """Write the target rank files this worker owns; return their manifest records."""
        world = self.cluster.world_size
        owned = [t for t in range(self.job.target_world) if t % world == self.cluster.rank]
        handles = {}
        writers = {}
        try:
            for target in owned:
                path = root / _rank_file(target, prefix, self.fmt)
                handles[target] = open(path, "r+b")
                writers[target] = open_writer(handles[target], self.job.entries(target, self.source), self.fmt, crc_check=crc_check)
            for index, move in enumerate(self.job.moves):
                arrays = _Arrays(self.source.readers, move.name)
                try:
                    if index % world == self.cluster.rank and move.dtype != dt.STRING:
                        check_replicas(move, arrays, self.source, self.warn)
                    for target in owned:
                        writers[target].write(move.name, self._value(move, arrays, target))
                finally:
                    arrays.release()
            records = []
            for target in owned:
                writers[target].close()
                _sync_close(handles.pop(target))
                relative = _rank_file(target, prefix, self.fmt)
                size, digest = _hash_file(root / relative)
                records.append({"rank": target, "path": relative, "bytes": size, "sha256": digest})
            return records
        finally:
            for handle in handles.values():
                handle.close()

    def write_merge_run(self, temp: Path, entries: Sequence[TensorInfo], offsets: Sequence[int], owners: Sequence[int], end: int) -> Dict[str, int]:
        """Write this worker's run of entries of a merge at its offset; return the run's CRC and size."""
        mine = [i for i, owner in enumerate(owners) if owner == self.cluster.rank]
        if not mine:
            return {"crc": 0, "size": 0}
        first, last = mine[0], mine[-1]
        stop = offsets[last + 1] if last + 1 < len(offsets) else end
        with open(temp, "r+b") as handle:
            handle.seek(offsets[first])
            counted = _CrcFile(handle)
            if self.fmt == "ckpt":
                writer = open_writer(counted, entries[first : last + 1], "ckpt")
            for index in mine:
                move = self.job.moves[index]
                arrays = _Arrays(self.source.readers, move.name)
                try:
                    if move.dtype != dt.STRING:
                        check_replicas(move, arrays, self.source, self.warn)
                    value = self._value(move, arrays, 0)
                    if self.fmt == "ckpt":
                        writer.write(move.name, value)
                    else:
                        counted.write(np.asarray(value, order="C").reshape(-1).view(np.uint8))
                finally:
                    arrays.release()
            if self.fmt == "ckpt":
                writer.close()
            if offsets[first] + counted.size != stop:
                raise ShardsmithError(
                    f"worker {self.cluster.rank} wrote {counted.size} bytes for parameters {first}-{last} but the "
                    f"layout of the output reserves {stop - offsets[first]}; the merge layout does not match the writer",
                    path=temp,
                )
            _sync_close(handle)
        return {"crc": counted.crc, "size": counted.size}


def _sync_close(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def distribute(
    cluster: Cluster,
    kind: str,
    sources: Sequence[PathLike],
    plan: PathLike,
    output: PathLike,
    *,
    to_plan: Optional[PathLike] = None,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    prefix: str = "checkpoint_",
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    crc_check: bool = False,
    warn: Callable[[str], None] = print_warning,
) -> Job:
    """Run one merge, split or reshard over every worker of `cluster`; rank 0 commits `output`.

    Every rank returns the job, or raises the same ShardsmithError.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    output = Path(output)
    directory = kind != "merge"
    failure = None
    source: Optional[Source] = None
    job: Optional[Job] = None
    fmt = ""
    plan_obj: Optional[Plan] = None
    to_plan_obj: Optional[Plan] = None
    world, rank = cluster.world_size, cluster.rank
    try:
        plan_obj = load_plan(plan)
        if kind == "reshard":
            if to_plan is None:
                raise ShardsmithError("a reshard needs to_plan, the plan of the rank set to write")
            to_plan_obj = load_plan(to_plan)
        paths = [Path(p) for p in sources]
        source = open_source_lazily(paths, select, input_format, verify_crc=lambda index: index % world == rank)
        if kind == "merge":
            job = prepare_merge(source, plan_obj, selection, replicas)
        elif kind == "split":
            job = prepare_split(source, plan_obj, selection)
        else:
            job = prepare_reshard(source, plan_obj, to_plan_obj, selection, replicas)
        fmt = _output_format(kind, source, output, output_format)
        if cluster.is_root:
            check_target(output, force, directory=directory)
    except ShardsmithError as exc:
        failure = exc.format()
    try:
        cluster.check(failure)
        assert source is not None
        assert job is not None
        assert plan_obj is not None
        manifest = {"command": kind, "sources": [str(p) for p in source.paths], "format": fmt, "parameters": len(job.moves)}
        manifest.update(_plan_record(plan_obj, "plan"))
        if to_plan_obj is not None:
            manifest.update(_plan_record(to_plan_obj, "to_plan"))
        worker = _Worker(cluster, job, source, fmt, warn)
        if directory:
            _run_rank_files(cluster, worker, output, force, prefix, crc_check, manifest)
        else:
            _run_merge(cluster, worker, output, force, crc_check, manifest)
        return job
    finally:
        if source is not None:
            source.close()


def _report_warnings(cluster: Cluster, worker: _Worker, shared: Sequence[Dict[str, Any]]) -> None:
    if cluster.is_root:
        for record in shared:
            for message in record["warnings"]:
                worker.report(message)


def _run_rank_files(cluster: Cluster, worker: _Worker, output: Path, force: bool, prefix: str, crc_check: bool, manifest: Dict[str, Any]) -> None:
    pending: Optional[str] = None
    with contextlib.ExitStack() as stack:
        out = None
        temp = ""
        if cluster.is_root:
            try:
                out = stack.enter_context(atomic_output(output, directory=True, force=force, inputs=worker.source.paths))
                # Create every file here so that the manifest lists them in rank order.
                # NOTE: rank 0 keeps one descriptor per target rank open until the commit, as
                # the offline commands do, so the target world size is bound by `ulimit -n`.
                for target in range(worker.job.target_world):
                    out.open(_rank_file(target, prefix, worker.fmt))
                temp = str(out.temp)
            except (ShardsmithError, OSError) as exc:
                pending = describe_exception(exc)
        temp = cluster.exchange(temp, pending)[0]

        failure = None
        records: List[Dict[str, Any]] = []
        try:
            records = worker.write_rank_files(Path(temp), prefix, crc_check)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
            failure = describe_exception(exc)
        shared = cluster.exchange({"files": records, "warnings": worker.warnings}, failure)
        _report_warnings(cluster, worker, shared)

        if out is not None:
            try:
                for record in sorted((r for s in shared for r in s["files"]), key=lambda r: r["rank"]):
                    out.files[record["path"]] = _Recorded(record["bytes"], record["sha256"])
                out.commit(manifest)
            except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
                pending = describe_exception(exc)
        cluster.check(pending if cluster.is_root else None)


def _run_merge(cluster: Cluster, worker: _Worker, output: Path, force: bool, crc_check: bool, manifest: Dict[str, Any]) -> None:
    entries = worker.job.entries(0, worker.source)
    prefix, offsets, end = file_layout(entries, worker.fmt, crc_check)
    owners = share_by_bytes(offsets, end - (ckpt_format.CRC_TRAILER_SIZE if crc_check else 0), cluster.world_size)
    pending: Optional[str] = None
    with contextlib.ExitStack() as stack:
        out = None
        temp = ""
        if cluster.is_root:
            try:
                out = stack.enter_context(atomic_output(output, directory=False, force=force, inputs=worker.source.paths))
                handle = out.open()
                handle.write(prefix)
                handle.flush()
                os.truncate(out.temp, end)
                temp = str(out.temp)
            except (ShardsmithError, OSError) as exc:
                pending = describe_exception(exc)
        temp = cluster.exchange(temp, pending)[0]

        failure = None
        run = {"crc": 0, "size": 0}
        try:
            run = worker.write_merge_run(Path(temp), entries, offsets, owners, end - (ckpt_format.CRC_TRAILER_SIZE if crc_check else 0))
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
            failure = describe_exception(exc)
        shared = cluster.exchange({"run": run, "warnings": worker.warnings}, failure)
        _report_warnings(cluster, worker, shared)

        if out is not None:
            try:
                if crc_check:
                    crc = 0
                    for record in shared:
                        crc = crc32_combine(crc, record["run"]["crc"], record["run"]["size"])
                    with open(out.temp, "r+b") as trailer:
                        trailer.seek(end - ckpt_format.CRC_TRAILER_SIZE)
                        trailer.write(ckpt_format.CRC_MARK + crc.to_bytes(10, "big"))
                        _sync_close(trailer)
                size, digest = _hash_file(out.temp)
                out.files[output.name] = _Recorded(size, digest)
                out.commit(manifest)
            except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
                pending = describe_exception(exc)
        cluster.check(pending if cluster.is_root else None)


def run_distributed(
    kind: str,
    sources: Sequence[PathLike],
    plan: PathLike,
    output: PathLike,
    *,
    to_plan: Optional[PathLike] = None,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    prefix: str = "checkpoint_",
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    crc_check: bool = False,
    device: Optional[str] = None,
) -> int:
    """Run a merge, split or reshard in this msrun process, divided over the workers; return the exit code.

    In msrun's scheduler process it only serves the cluster. Rank 0 prints a summary on stdout
    and the warnings on stderr; every rank prints a failure on stderr.
    """

    def work(cluster: Cluster) -> None:
        job = distribute(
            cluster, kind, sources, plan, output, to_plan=to_plan, selection=selection, replicas=replicas,
            prefix=prefix, select=select, input_format=input_format, output_format=output_format, force=force,
            crc_check=crc_check,
        )
        if cluster.is_root:
            total = job.total_bytes()
            print(
                f"{kind}: wrote {len(job.moves)} parameters, {total} bytes of tensor data, to {output} "
                f"with {cluster.world_size} workers",
                flush=True,
            )

    return run_in_msrun(kind, work, device=device)
