"""`shardsmith convert`: rewrite a checkpoint or a rank set in another format, byte for byte.

Every tensor keeps its dtype, shape and bytes; only the container changes (`.ckpt` and
`.safetensors`, either way, and optionally MindSpore's encryption or CRC). A rank set keeps its
`rank_<r>/` directories and file names, with the new suffix. One parameter is read and written
at a time, and the output appears only when complete.

A `str` entry (an `append_dict` string) has no safetensors dtype. MindSpore 2.10 fails on one
too (`save_checkpoint(..., format="safetensors")` and `ckpt_to_safetensors` raise
`SafetensorError: Unknown dtype "str..."`), so converting one to safetensors is rejected, and
`exclude` leaves such entries out explicitly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from . import encryption
from .engine import same_bytes
from .errors import CheckpointFormatError, ShardsmithError, ValidationError
from .formats import FORMATS, CheckpointReader, TensorInfo
from .jobs import SUFFIXES, Progress, Report, check_crc_format
from .output import OutputFiles, atomic_output, check_target
from .rankset import rank_dirs, resolve_paths


@dataclass(frozen=True)
class _FileTask:
    source: Path
    relative: Optional[str]  # path inside a rank-set output; None for a single file


def _plan_files(sources: Sequence[Path], select: Optional[str], fmt: str) -> List[_FileTask]:
    """Pair each source file with its place in the output: a rank set keeps rank_<r>/ and the file stem."""
    files = resolve_paths(sources, select)
    single_dir = len(sources) == 1 and sources[0].is_dir()
    is_rank_set = len(files) > 1 or (single_dir and bool(rank_dirs(sources[0])))
    if not is_rank_set:
        return [_FileTask(files[0], None)]
    return [_FileTask(path, f"rank_{rank}/{path.stem}{SUFFIXES[fmt]}") for rank, path in enumerate(files)]


def output_format(sources: Sequence[Path], output: Path, requested: Optional[str], select: Optional[str] = None) -> str:
    """Return the format to write: `requested`, else the output file's suffix, else the other format than the source's."""
    if requested is not None:
        if requested not in FORMATS:
            raise ShardsmithError(f"unknown format '{requested}' (expected one of: {', '.join(FORMATS)})")
        return requested
    suffix = output.suffix.lower()[1:]
    if suffix in FORMATS:
        return suffix
    first = resolve_paths(sources, select)[0]
    source_format = first.suffix.lower()[1:]
    if source_format not in FORMATS:
        raise ShardsmithError("cannot tell which format to write", path=output, hint="Pass --format ckpt or --format safetensors")
    return "safetensors" if source_format == "ckpt" else "ckpt"


def _entries(reader: CheckpointReader, exclude: Sequence[str], fmt: str) -> List[TensorInfo]:
    entries = [info for info in reader if not any(fnmatch.fnmatchcase(info.name, glob) for glob in exclude)]
    if fmt == "safetensors":
        strings = [info.name for info in entries if info.is_string]
        if strings:
            shown = ", ".join(f"'{name}'" for name in strings[:5]) + (" …" if len(strings) > 5 else "")
            raise CheckpointFormatError(
                f"holds str entries ({shown}), which safetensors cannot store; MindSpore 2.10 cannot save "
                "them in that format either",
                path=reader.path,
                param=strings[0],
                hint="Leave them out with --exclude NAME, or keep the .ckpt format",
            )
    if not entries:
        raise ShardsmithError("every parameter is excluded, so there is nothing to write", path=reader.path)
    return entries


def _copy(reader: CheckpointReader, writer, entries: Sequence[TensorInfo], progress: Progress) -> None:
    for info in entries:
        if info.is_string:
            writer.write(info.name, reader.string(info.name))
        else:
            writer.write(info.name, reader.array(info.name))
            reader.release(info.name)
        progress.advance(info.nbytes)


def _verify(reader: CheckpointReader, path: Path, fmt: str, entries: Sequence[TensorInfo], cipher) -> None:
    with encryption.open_checkpoint(path, fmt, cipher=cipher) as written:
        if written.names() != [info.name for info in entries]:
            raise ValidationError("the written file's parameters differ from the source's", path=path)
        for info in entries:
            if written.info(info.name).dtype != info.dtype or written.info(info.name).shape != info.shape:
                raise ValidationError("the written dtype or shape differs from the source", path=path, param=info.name)
            if info.is_string:
                equal = written.string(info.name) == reader.string(info.name)
            else:
                equal = same_bytes(written.array(info.name), reader.array(info.name))
                written.release(info.name)
                reader.release(info.name)
            if not equal:
                raise ValidationError("the written bytes differ from the source", path=path, param=info.name)


def convert(
    sources: Sequence[Path],
    output: Path,
    *,
    format: Optional[str] = None,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    exclude: Sequence[str] = (),
    cipher: Optional[encryption.Cipher] = None,
    encrypt: bool = False,
    crc_check: bool = False,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    progress: Progress = Progress(),
) -> Report:
    """Rewrite a checkpoint file (to a file) or a rank set (to a directory) in `format`.

    `cipher` decrypts inputs MindSpore encrypted (recognised by their first bytes); with
    `encrypt` it also encrypts the output, which must then be `.ckpt`.
    """
    sources = [Path(s) for s in sources]
    output = Path(output)
    fmt = output_format(sources, output, format, select)
    if encrypt and cipher is None:
        raise ShardsmithError(f"encrypting the output needs a key: pass --key-file or set ${encryption.KEY_ENV}")
    if encrypt and fmt != "ckpt":
        raise ShardsmithError("only .ckpt checkpoints can be encrypted; MindSpore 2.10 rejects enc_key for safetensors")
    write_cipher = cipher if encrypt else None
    check_crc_format(fmt, crc_check)

    tasks = _plan_files(sources, select, fmt)
    directory = tasks[0].relative is not None

    readers: List[CheckpointReader] = []
    try:
        for task in tasks:
            readers.append(encryption.open_checkpoint(task.source, input_format, cipher=cipher))
        entries = [_entries(reader, exclude, fmt) for reader in readers]
        total = sum(info.nbytes for rank_entries in entries for info in rank_entries)
        report = Report("convert", dry_run, output, len(entries[0]), total_bytes=total)
        progress.start(total)
        if dry_run:
            check_target(output, force, directory=directory, inputs=sources)
            for task, rank_entries in zip(tasks, entries):
                report.files.append({"path": task.relative or output.name, "bytes": sum(i.nbytes for i in rank_entries)})
            return report
        with atomic_output(output, directory=directory, force=force, inputs=sources) as out:
            paths = _write_all(out, tasks, readers, entries, fmt, write_cipher, crc_check, progress)
            if verify:
                for reader, path, rank_entries in zip(readers, paths, entries):
                    _verify(reader, path, fmt, rank_entries, write_cipher)
            out.commit(
                {
                    "command": "convert",
                    "sources": [str(task.source) for task in tasks],
                    "format": fmt,
                    "encrypted": write_cipher.mode if write_cipher else None,
                    "parameters": len(entries[0]),
                }
            )
            report.files = out.manifest({})["files"]
        return report
    finally:
        for reader in readers:
            reader.close()


def _write_all(
    out: OutputFiles,
    tasks: Sequence[_FileTask],
    readers: Sequence[CheckpointReader],
    entries: Sequence[Sequence[TensorInfo]],
    fmt: str,
    cipher: Optional[encryption.Cipher],
    crc_check: bool,
    progress: Progress,
) -> List[Path]:
    paths = []
    for task, reader, rank_entries in zip(tasks, readers, entries):
        handle = out.open(task.relative)
        paths.append(out.temp / task.relative if task.relative else out.temp)
        with encryption.open_writer(handle, rank_entries, fmt, cipher=cipher, crc_check=crc_check) as writer:
            _copy(reader, writer, rank_entries, progress)
    return paths

