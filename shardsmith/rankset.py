"""Finding and opening the checkpoint files of a rank set, or one full checkpoint.

A rank set is a directory whose `rank_<r>/` subdirectories hold one checkpoint each (the layout
MindSpore's own tools write), or an explicit list of files in rank order. A rank directory that
holds several checkpoints (ModelCheckpoint keeps the last few) needs `--select GLOB`: picking the
last in alphabetical order would put step 9 after step 10.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence

from .errors import CheckpointFormatError, RankSetError
from .formats import CheckpointReader, TensorInfo
from .layout import Shape

if TYPE_CHECKING:
    from .encryption import Cipher

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
_RANK_DIR = re.compile(r"^rank_(\d+)$")


def natural_key(name: str) -> List[object]:
    """Sort key that orders numbers by value: net-9_32 before net-10_32."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _checkpoints_in(directory: Path) -> List[Path]:
    found = [p for p in directory.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    return sorted(found, key=lambda p: natural_key(p.name))


def rank_of_path(path: Path) -> Optional[int]:
    """Return r when a parent directory of `path` is named rank_<r>, else None."""
    for parent in path.parents:
        m = _RANK_DIR.match(parent.name)
        if m:
            return int(m.group(1))
    return None


def in_rank_order(files: Sequence[Path]) -> List[Path]:
    """Order rank files given on the command line by the rank in their rank_<r>/ directory.

    A shell glob such as `rank_*/net.ckpt` lists rank_10 before rank_2, which would put slices in
    the wrong places; when every file names its rank, that rank decides. Files that do not name
    a rank are taken in the order given.
    """
    seen: Dict[Path, Path] = {}
    for f in files:
        real = Path(f).resolve()
        if real in seen:
            raise RankSetError(
                f"is given twice (also as {seen[real]}); each rank's file must be given once", path=f
            )
        seen[real] = Path(f)
    ranks = [rank_of_path(Path(f)) for f in files]
    if len(files) < 2 or any(r is None for r in ranks):
        return list(files)
    if sorted(ranks) != list(range(len(files))):
        listed = ", ".join(f"{f} (rank {r})" for f, r in zip(files, ranks))
        raise RankSetError(
            f"the rank files name ranks {sorted(ranks)}, not 0..{len(files) - 1} once each: {listed}",
            hint="Give every rank's file once, or the rank-set directory",
        )
    return [f for _, f in sorted(zip(ranks, files))]


def _select_example(name: str) -> str:
    """Turn the newest checkpoint's name into a glob for every rank: net-10_32.ckpt -> net-10_*.ckpt."""
    return re.sub(r"_\d+(\.\w+)$", r"_*\1", name)


def rank_dirs(directory: Path) -> Dict[int, Path]:
    """Return rank -> `rank_<r>/` subdirectory, for a directory laid out as a rank set."""
    found: Dict[int, Path] = {}
    for child in sorted(directory.iterdir()):
        m = _RANK_DIR.match(child.name)
        if m and child.is_dir():
            rank = int(m.group(1))
            if rank in found:
                # rank_1 and rank_01 would otherwise both be rank 1, and one of them silently lost.
                raise RankSetError(
                    f"{found[rank].name}/ and {child.name}/ are both rank {rank}",
                    path=directory,
                    hint="Keep one directory per rank, named rank_<r>",
                )
            found[rank] = child
    return found


def pick_checkpoint(directory: Path, select: Optional[str], rank: int) -> Path:
    candidates = _checkpoints_in(directory)
    if select is not None:
        candidates = [p for p in candidates if fnmatch.fnmatchcase(p.name, select)]
    if not candidates:
        what = f"matching --select '{select}'" if select else "(.ckpt or .safetensors)"
        raise RankSetError(f"rank {rank}: no checkpoint file {what}", path=directory)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise RankSetError(
            f"rank {rank}: {len(candidates)} checkpoints ({names})",
            path=directory,
            hint=f"Pick one per rank with --select GLOB, e.g. --select '{_select_example(candidates[-1].name)}'",
        )
    return candidates[0]


def resolve_paths(paths: Sequence[Path], select: Optional[str] = None) -> List[Path]:
    """Turn the command line's PATH arguments into checkpoint files in rank order.

    One directory with `rank_<r>/` subdirectories is a rank set; one directory without them must hold
    exactly one checkpoint (or one matching --select); files are taken as given, in rank order.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise RankSetError("no checkpoint given")
    for p in paths:
        if not p.exists():
            raise RankSetError("not found", path=p)
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        ranks = rank_dirs(directory)
        if not ranks:
            return [pick_checkpoint(directory, select, 0)]
        world = max(ranks) + 1
        if len(ranks) != world:
            # Only the first gaps: a stray rank_99999999 must not make a list of every missing rank.
            missing = []
            for r in range(world):
                if r not in ranks:
                    missing.append(f"rank_{r}")
                    if len(missing) == 8:
                        break
            more = world - len(ranks) - len(missing)
            raise RankSetError(
                f"rank directories are not numbered 0..{world - 1}: missing {', '.join(missing)}"
                + (f" and {more} more" if more else ""),
                path=directory,
            )
        return [pick_checkpoint(ranks[r], select, r) for r in range(world)]
    files = []
    for p in paths:
        if p.is_dir():
            raise RankSetError(
                "is a directory; give either one rank-set directory or the rank files in rank order", path=p
            )
        if not p.is_file():
            # Opening a FIFO would block until something writes to it; a device has no end.
            raise RankSetError("is not a regular file", path=p)
        files.append(p)
    return in_rank_order(files)


class Source:
    """The open checkpoint files of a rank set (or of one full checkpoint, world size 1)."""

    def __init__(self, readers: Sequence[CheckpointReader]) -> None:
        self.readers = list(readers)
        self.paths = [r.path for r in self.readers]
        self._infos: List[Dict[str, TensorInfo]] = [{info.name: info for info in r} for r in self.readers]
        self.names: List[str] = list(self._infos[0])

    @property
    def world_size(self) -> int:
        return len(self.readers)

    def info(self, name: str, rank: int = 0) -> Optional[TensorInfo]:
        return self._infos[rank].get(name)

    def infos(self, rank: int = 0) -> Iterator[TensorInfo]:
        return iter(self._infos[rank].values())

    def missing_ranks(self, name: str) -> List[int]:
        return [r for r, infos in enumerate(self._infos) if name not in infos]

    def extra_names(self) -> Dict[int, List[str]]:
        """Return, per rank, the names that rank's file contains and rank 0's does not."""
        first = set(self.names)
        return {r: [n for n in infos if n not in first] for r, infos in enumerate(self._infos) if set(infos) - first}

    def slice_shapes(self, name: str) -> List[Shape]:
        missing = self.missing_ranks(name)
        if missing:
            raise RankSetError(
                f"missing from rank {', '.join(map(str, missing))} "
                f"({', '.join(str(self.paths[r]) for r in missing)})",
                param=name,
            )
        return [tuple(infos[name].shape) for infos in self._infos]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(
    paths: Sequence[Path],
    select: Optional[str] = None,
    format: Optional[str] = None,
    *,
    verify_crc: bool = True,
    cipher: Optional["Cipher"] = None,
) -> Source:
    """Open a rank set or a full checkpoint for reading (headers only until data is asked for).

    A `.ckpt` file with a crc_num trailer is read once whole to check it unless `verify_crc` is false.
    Files MindSpore encrypted are recognised by their first bytes and need `cipher`.
    """
    from .encryption import open_checkpoint

    files = resolve_paths(paths, select)
    readers: List[CheckpointReader] = []
    try:
        for rank, path in enumerate(files):
            try:
                readers.append(open_checkpoint(path, format, cipher=cipher, verify_crc=verify_crc))
            except CheckpointFormatError as error:
                if len(files) == 1:
                    raise
                # The files of a rank set differ only by the rank: say which one is bad.
                raise CheckpointFormatError(
                    f"rank {rank}: {error.message}", path=error.path, param=error.param, hint=error.hint
                ) from None
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return Source(readers)
