"""Offline jobs on files: merge, split and reshard, from paths to a committed output.

This is the Python API behind the commands: open the sources, decide the job (`engine`), write
every target file under a temporary name, optionally read it back, write the manifest, and rename
into place. Nothing here prints; progress and warnings go to the callbacks the caller passes.

All target files are written at once through a `WritePipeline`; `max_inflight` (bytes, default
`pipeline.DEFAULT_MAX_INFLIGHT`) caps what is queued for writing, and so the memory in flight.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from . import dtypes as dt

from .engine import Job, Selection, _Arrays, as_bytes, execute, prepare_merge, prepare_reshard, prepare_split, slice_chunks
from .errors import LayoutError, PlanError, ShardsmithError, ValidationError
from .formats import FORMATS, detect_format, open_checkpoint, open_writer
from .output import OutputFiles, atomic_output
from .pipeline import DEFAULT_MAX_INFLIGHT, WritePipeline
from .plan import Plan, load_plan
from .rankset import Source, open_source

if TYPE_CHECKING:
    from .encryption import Cipher

SUFFIXES = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


@dataclass
class Progress:
    """Callbacks a caller passes to follow a job: `start(total_bytes)`, `advance(bytes)`, `warn(message)`."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[int], None] = lambda n: None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class Report:
    """The outcome of a job: what it wrote, or for a dry run what it would write."""

    kind: str
    dry_run: bool
    target: Path
    parameters: int
    files: List[Dict[str, object]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    total_bytes: int = 0


def _plan_record(plan: Plan, key: str) -> Dict[str, object]:
    record: Dict[str, object] = {f"{key}_world_size": plan.world_size}
    if plan.path is not None:
        data = plan.path.read_bytes()
        record[key] = {"path": str(plan.path), "sha256": hashlib.sha256(data).hexdigest(), "text": data.decode("utf-8", "replace")}
    return record


def _rank_file(rank: int, prefix: str, fmt: str) -> str:
    return f"rank_{rank}/{prefix}{rank}{SUFFIXES[fmt]}"


def _write_job(
    job: Job,
    source: Source,
    out: OutputFiles,
    fmt: str,
    *,
    prefix: str,
    crc_check: bool,
    max_inflight: int,
    progress: Progress,
    warnings: List[str],
) -> List[Path]:
    """Open one writer per target rank, move every parameter, and close the writers in order.

    The writers queue their bytes on a `WritePipeline`, which writes all target files at once.
    """
    writers = []
    handles = []
    paths = []
    with WritePipeline(max_inflight) as pipeline:
        for rank in range(job.target_world):
            relative = None if not out.directory else _rank_file(rank, prefix, fmt)
            handles.append(pipeline.file(out.open(relative)))
            paths.append(out.temp / relative if relative else out.temp)
            writers.append(open_writer(handles[rank], job.entries(rank, source), fmt, crc_check=crc_check))

        def write(rank: int, name: str, data: object) -> None:
            if isinstance(data, str):
                writers[rank].write(name, data)
            else:
                writers[rank].write_chunks(name, data)

        def warn(message: str) -> None:
            warnings.append(message)
            progress.warn(message)

        def written(callback: Callable[[], None], ranks: Optional[Sequence[int]]) -> None:
            pipeline.call_when_written(callback, None if ranks is None else [handles[r] for r in ranks])

        execute(job, source, write, written=written, progress=progress.advance, warn=warn)
        for writer in writers:
            writer.close()
    return paths


def verify_written(job: Job, source: Source, paths: Sequence[Path], fmt: str) -> None:
    """Read the written files back and compare every slice with what the layout says it must be."""
    readers = [open_checkpoint(p, fmt) for p in paths]
    try:
        for move in job.moves:
            for rank, reader in enumerate(readers):
                if move.name not in reader:
                    raise ValidationError("missing from the written file", path=paths[rank], param=move.name)
                if move.dtype == dt.STRING:
                    if reader.string(move.name) != source.readers[0].string(move.name):
                        raise ValidationError("the written value differs from the source", path=paths[rank], param=move.name)
                    continue
                arrays = _Arrays(source.readers, move.name)
                try:
                    expected = (chunk for chunk, _ in slice_chunks(move, arrays, rank))
                    if not _same_content(reader.array(move.name), expected):
                        raise ValidationError("the written bytes differ from the source", path=paths[rank], param=move.name)
                finally:
                    arrays.release()
                    reader.release(move.name)
    finally:
        for reader in readers:
            reader.close()


def _same_content(written: np.ndarray, chunks: Iterable[np.ndarray]) -> bool:
    """Compare a written tensor with the expected content, chunk by chunk, in C order."""
    data = written.reshape(-1).view(np.uint8)
    position = 0
    for chunk in chunks:
        expected = np.frombuffer(as_bytes(chunk), np.uint8)
        if not np.array_equal(data[position : position + len(expected)], expected):
            return False
        position += len(expected)
    return position == len(data)


def _finish(
    job: Job,
    source: Source,
    target: Path,
    *,
    directory: bool,
    fmt: str,
    prefix: str,
    force: bool,
    dry_run: bool,
    verify: bool,
    crc_check: bool,
    max_inflight: int,
    progress: Progress,
    manifest: Dict[str, object],
    inputs: Sequence[Path] = (),
) -> Report:
    inputs = [*source.paths, *(Path(p) for p in inputs)]
    report = Report(job.kind, dry_run, target, len(job.moves), total_bytes=job.total_bytes())
    for message in job.warnings:
        report.warnings.append(message)
        progress.warn(message)
    progress.start(report.total_bytes)
    if dry_run:
        from .output import check_target

        check_target(target, force, directory=directory, inputs=inputs)
        for rank in range(job.target_world):
            # Opening a writer checks what the format can hold (a str entry in safetensors) before any byte is written.
            open_writer(_NullFile(), job.entries(rank, source), fmt, crc_check=crc_check)

        def warn(message: str) -> None:
            report.warnings.append(message)
            progress.warn(message)

        execute(job, source, None, progress=progress.advance, warn=warn)
        for rank in range(job.target_world):
            name = _rank_file(rank, prefix, fmt) if directory else target.name
            report.files.append({"path": name, "tensor_bytes": sum(m.target_nbytes(rank) for m in job.moves)})
        return report
    with atomic_output(target, directory=directory, force=force, inputs=inputs) as out:
        paths = _write_job(
            job, source, out, fmt, prefix=prefix, crc_check=crc_check, max_inflight=max_inflight, progress=progress,
            warnings=report.warnings,
        )
        if verify:
            verify_written(job, source, paths, fmt)
        manifest = {
            "command": job.kind,
            "sources": [str(p) for p in source.paths],
            "format": fmt,
            "parameters": len(job.moves),
            **manifest,
        }
        out.commit(manifest)
        report.files = out.manifest({})["files"]
    return report


def _open(sources: Sequence[Path], select: Optional[str], format: Optional[str], cipher: Optional["Cipher"] = None) -> Source:
    return open_source([Path(s) for s in sources], select, format, cipher=cipher)


def merge(
    sources: Sequence[Path],
    plan: Path,
    output: Path,
    *,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    crc_check: bool = False,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    cipher: Optional["Cipher"] = None,
    progress: Progress = Progress(),
) -> Report:
    """Merge a rank set into one full checkpoint at `output`."""
    output = Path(output)
    fmt = detect_format(output, output_format)
    plan_obj = load_plan(plan)
    check_crc_format(fmt, crc_check)
    with _open(sources, select, input_format, cipher) as source:
        with _blame_plan(plan_obj):
            job = prepare_merge(source, plan_obj, selection, replicas)
        return _finish(
            job, source, output, directory=False, fmt=fmt, prefix="", force=force, dry_run=dry_run,
            verify=verify, crc_check=crc_check, max_inflight=max_inflight, progress=progress, manifest=_plan_record(plan_obj, "plan"),
            inputs=[plan],
        )


def split(
    full: Path,
    plan: Path,
    output_dir: Path,
    *,
    selection: Selection = Selection(),
    prefix: str = "checkpoint_",
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    crc_check: bool = False,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    cipher: Optional["Cipher"] = None,
    progress: Progress = Progress(),
) -> Report:
    """Split one full checkpoint into a rank set under `output_dir`."""
    check_prefix(prefix)
    plan_obj = load_plan(plan)
    with _open([full], select, input_format, cipher) as source:
        fmt = _dir_format(source, output_format)
        check_crc_format(fmt, crc_check)
        with _blame_plan(plan_obj):
            job = prepare_split(source, plan_obj, selection)
        return _finish(
            job, source, Path(output_dir), directory=True, fmt=fmt, prefix=prefix, force=force, dry_run=dry_run,
            verify=verify, crc_check=crc_check, max_inflight=max_inflight, progress=progress, manifest=_plan_record(plan_obj, "plan"),
            inputs=[plan],
        )


def reshard(
    sources: Sequence[Path],
    plan: Path,
    to_plan: Path,
    output_dir: Path,
    *,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    prefix: str = "checkpoint_",
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    crc_check: bool = False,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    cipher: Optional["Cipher"] = None,
    progress: Progress = Progress(),
) -> Report:
    """Move a rank set laid out by `plan` to the layout of `to_plan`, without a full checkpoint."""
    check_prefix(prefix)
    plan_obj = load_plan(plan)
    to_plan_obj = load_plan(to_plan)
    with _open(sources, select, input_format, cipher) as source:
        fmt = _dir_format(source, output_format)
        check_crc_format(fmt, crc_check)
        with _blame_plan(plan_obj):
            job = prepare_reshard(source, plan_obj, to_plan_obj, selection, replicas)
        manifest = {**_plan_record(plan_obj, "plan"), **_plan_record(to_plan_obj, "to_plan")}
        return _finish(
            job, source, Path(output_dir), directory=True, fmt=fmt, prefix=prefix, force=force, dry_run=dry_run,
            verify=verify, crc_check=crc_check, max_inflight=max_inflight, progress=progress, manifest=manifest,
            inputs=[plan, to_plan],
        )


def check_prefix(prefix: str) -> None:
    """Reject a --prefix that would put rank files outside their rank_<r>/ directory."""
    if "/" in prefix or "\\" in prefix or prefix.startswith(".") or "\0" in prefix:
        raise ShardsmithError(
            f"--prefix '{prefix}' must be a plain file-name prefix (no '/', '\\', or leading '.'): "
            "rank r's file is rank_<r>/<prefix><r>.ckpt"
        )


def check_crc_format(fmt: str, crc_check: bool) -> None:
    if crc_check and fmt != "ckpt":
        raise ShardsmithError(
            "--crc is available for .ckpt output only: a safetensors CRC sits in the header, which would mean "
            "writing every file twice; write .ckpt with --crc, or safetensors without it"
        )


@contextmanager
def _blame_plan(plan: Plan) -> Iterator[None]:
    """Name the plan file in a layout error that names no file: the plan is what does not fit."""
    try:
        yield
    except (LayoutError, PlanError, ValidationError) as exc:
        if exc.path is None and plan.path is not None:
            exc.path = plan.path
        raise


class _NullFile:
    """A sink for the writers a dry run opens only to have them check their entries."""

    def write(self, data: object) -> int:
        return len(memoryview(data).cast("B")) if not isinstance(data, (bytes, bytearray)) else len(data)

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return 0


def _dir_format(source: Source, override: Optional[str]) -> str:
    if override is not None:
        if override not in FORMATS:
            raise ShardsmithError(f"unknown format '{override}' (expected one of: {', '.join(FORMATS)})")
        return override
    return source.readers[0].format
