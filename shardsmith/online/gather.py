"""Gathering a rank set onto rank 0 inside an msrun job: `shardsmith gather` and `gather_params`.

Each worker holds one rank's slices: its own rank file (`rank_<r>/` of the source, and no other
rank's), or, inside a training script, its parameters in memory. The workers first exchange
their headers, so every rank decides the same merge job with the same code as `shardsmith
merge` (`engine.prepare_merge`). Then, parameter by parameter:

- a replicated parameter larger than `RAW_REPLICA_LIMIT` is not moved: every rank sends the
  sha256 of its copy, and rank 0 writes its own;
- every other parameter is AllGathered as raw bytes, each rank's slice zero-padded to the
  largest slice of that parameter, so uneven plugin layouts move like even ones. Rank 0 checks
  the copies the layout says are identical (`engine.check_replicas`), assembles the full tensor
  (`slices.build_slice`, by `Layout.copies_into`) and writes it.

Rank 0 writes under a temporary name and renames into place at the end (`output.atomic_output`),
with the manifest `shardsmith merge` writes, so the checkpoint is byte for byte the offline
merge's. At most one parameter is in flight: rank 0 holds its gathered slices and full tensor,
the other ranks one chunk of `chunk_bytes` per rank.

A rank that fails (a missing rank file, an unreadable slice, a failed write on rank 0) reports
it in the next collective, and every rank then raises `DistributedError` with the same message.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import dtypes as dt
from ..engine import Job, ParamMove, Selection, _Arrays, _replica_failure, check_replicas, prepare_merge
from ..errors import RankSetError, ShardsmithError
from ..formats import TensorInfo, detect_format, open_checkpoint, open_writer
from ..jobs import _plan_record
from ..output import atomic_output, check_target
from ..plan import Plan, load_plan
from ..rankset import Source, pick_checkpoint, rank_dirs
from .cluster import CHUNK_BYTES, Cluster, to_words, words_for
from .launch import print_warning, run_in_msrun
from .slices import MemoryReader, build_slice

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# A replicated parameter up to this many bytes is gathered whole instead of by hash, so that
# differing copies are reported with every rank's value, as `shardsmith merge` reports them.
RAW_REPLICA_LIMIT = 128

Write = Callable[[ParamMove, Any], None]


class HeaderSource(Source):
    """A rank set known only by its headers: each rank's file stays with that rank's worker."""

    def __init__(self, paths: Sequence[PathLike], infos: Sequence[Sequence[TensorInfo]]) -> None:
        self.readers = []
        self.paths = [Path(p) for p in paths]
        self._infos = [{info.name: info for info in rank_infos} for rank_infos in infos]
        self.names = list(self._infos[0])

    @property
    def world_size(self) -> int:
        return len(self._infos)


def describe_exception(exc: BaseException, name: Optional[str] = None) -> str:
    """Return one line for an error caught on one rank, naming the parameter when it is known."""
    if isinstance(exc, ShardsmithError):
        return exc.format()
    where = f"parameter '{name}': " if name else ""
    return f"{where}{type(exc).__name__}: {exc}"


class Gatherer:
    """One rank's part of a gather: decide the merge job with the other ranks, then move it.

    `local` is this rank's slices, read like a checkpoint file: iterating it yields TensorInfo
    headers, and it has `path`, `array(name)`, `string(name)` and `release(name)`.
    """

    def __init__(
        self,
        cluster: Cluster,
        local: Any,
        plan: Plan,
        *,
        selection: Selection = Selection(),
        replicas: Optional[str] = None,
        warn: Optional[Callable[[str], None]] = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.cluster = cluster
        self.local = local
        self.plan = plan
        self.selection = selection
        self.replicas = replicas
        self.warn = warn if (warn is not None and cluster.is_root) else (lambda message: None)
        self.chunk_words = max(1, chunk_bytes // 4)
        self.pending: Optional[str] = None  # rank 0's failure, reported at the next collective
        self.source: Optional[HeaderSource] = None
        self.strings: List[Dict[str, str]] = []
        self.job: Optional[Job] = None

    def prepare(self, failure: Optional[str] = None) -> Job:
        """Exchange headers and decide the merge job; `failure` is this rank's setup error, if any."""
        record = None
        if failure is None:
            try:
                record = self._header_record()
            except (ShardsmithError, OSError, ValueError, TypeError) as exc:
                failure = describe_exception(exc)
        records = self.cluster.exchange(record, failure)
        infos = [[TensorInfo(n, d, tuple(s), b) for n, d, s, b in r["params"]] for r in records]
        self.source = HeaderSource([r["path"] for r in records], infos)
        self.strings = [r["strings"] for r in records]
        if self.plan.world_size != self.cluster.world_size:
            where = f" ({self.plan.path})" if self.plan.path else ""
            raise RankSetError(
                f"msrun started {self.cluster.world_size} workers but the plan{where} has world_size "
                f"{self.plan.world_size}",
                hint=f"Start msrun with --worker_num={self.plan.world_size} --local_worker_num=<workers on this host>",
            )
        self.job = prepare_merge(self.source, self.plan, self.selection, self.replicas)
        return self.job

    def _header_record(self) -> Dict[str, Any]:
        params = []
        strings = {}
        for info in self.local:
            params.append([info.name, info.dtype, list(info.shape), info.nbytes])
            if info.is_string:
                strings[info.name] = self.local.string(info.name)
        return {"path": str(self.local.path), "params": params, "strings": strings}

    # -- moving ---------------------------------------------------------------------------

    def run(self, write: Optional[Write]) -> None:
        """Move every parameter of the job; rank 0 passes `write`, which receives each full tensor."""
        assert self.job is not None, "prepare() first"
        for move in self.job.moves:
            if move.dtype == dt.STRING:
                self._move_string(move, write)
                continue
            nbytes = [dt.expected_nbytes(move.dtype, shape) for shape in move.source.slice_shapes]
            try:
                if move.source.is_replicated and nbytes[0] > RAW_REPLICA_LIMIT:
                    self._move_replicated(move, write)
                else:
                    self._move_gathered(move, nbytes, write)
            finally:
                self.local.release(move.name)

    def finish(self, commit: Optional[Callable[[], None]]) -> None:
        """Let rank 0 commit its output, then agree that every rank succeeded."""
        if self.cluster.is_root and self.pending is None and commit is not None:
            try:
                commit()
            except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
                self.pending = describe_exception(exc)
        self.cluster.check(self.pending if self.cluster.is_root else None)

    def _local_array(self, name: str) -> Tuple[Optional[np.ndarray], Optional[str]]:
        if self.pending is not None:
            return None, self.pending
        try:
            return np.asarray(self.local.array(name), order="C"), None
        except (ShardsmithError, OSError, ValueError, TypeError, KeyError) as exc:
            return None, describe_exception(exc, name)

    def _deliver(self, move: ParamMove, write: Optional[Write], make: Callable[[], Any]) -> None:
        """On rank 0, build and write one parameter; a failure becomes the pending report."""
        if not self.cluster.is_root or self.pending is not None or write is None:
            return
        try:
            write(move, make())
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
            self.pending = describe_exception(exc, move.name)

    def _move_string(self, move: ParamMove, write: Optional[Write]) -> None:
        # The values came with the headers, so every rank checks them alike and no collective is needed.
        values = [self.strings[rank][move.name] for rank in range(self.cluster.world_size)]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            _replica_failure(move, f"replicated values differ across ranks ({shown})", self.warn)
        self._deliver(move, write, lambda: values[0])

    def _move_replicated(self, move: ParamMove, write: Optional[Write]) -> None:
        array, failure = self._local_array(move.name)
        digest = np.zeros(8, np.int32)
        if array is not None:
            digest = np.frombuffer(hashlib.sha256(array.reshape(-1).view(np.uint8)).digest(), np.int32).copy()
        digests = self.cluster.all_gather(digest, failure)
        differing = [r for r in range(1, self.cluster.world_size) if not np.array_equal(digests[r], digests[0])]
        if differing:
            # Every rank has received the same digests, so every rank takes this branch alike.
            holders = f"rank {differing[0]}" if len(differing) == 1 else "ranks " + ", ".join(map(str, differing))
            _replica_failure(
                move,
                f"copies that should be identical differ: the copy on {holders} differs from rank 0's "
                f"(compared by the sha256 of the whole tensor)",
                self.warn,
            )
        self._deliver(move, write, lambda: array)

    def _move_gathered(self, move: ParamMove, nbytes: Sequence[int], write: Optional[Write]) -> None:
        array, failure = self._local_array(move.name)
        raw = array.reshape(-1).view(np.uint8) if array is not None else None
        total = words_for(max(nbytes))
        received = np.empty((self.cluster.world_size, total), np.int32) if self.cluster.is_root else None
        # At least one collective per parameter, so that a failure is always reported.
        for start in range(0, max(total, 1), self.chunk_words):
            stop = min(start + self.chunk_words, total)
            words = to_words(raw[start * 4 : stop * 4], stop - start) if raw is not None else np.zeros(stop - start, np.int32)
            gathered = self.cluster.all_gather(words, failure)
            if received is not None:
                received[:, start:stop] = gathered
        if received is None or self.pending is not None:
            return
        storage = dt.storage_dtype(move.dtype)
        readers = []
        for rank in range(self.cluster.world_size):
            content = received[rank].view(np.uint8)[: nbytes[rank]].view(storage)
            readers.append(MemoryReader(f"<rank {rank}>", {move.name: content.reshape(move.source.slice_shapes[rank])}))
        slices = _Arrays(readers, move.name)

        def full_tensor() -> np.ndarray:
            check_replicas(move, slices, None, self.warn)
            return build_slice(move, slices, 0)

        self._deliver(move, write, full_tensor)


# -- shardsmith gather ------------------------------------------------------------------------


def own_rank_file(sources: Sequence[PathLike], select: Optional[str], rank: int, world_size: int) -> Path:
    """Find this rank's checkpoint: `rank_<rank>/` of a rank-set directory, or the rank-th file given.

    Only this rank's directory is looked at, so each host needs only its own ranks' files.
    """
    paths = [Path(p) for p in sources]
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        present = rank_dirs(directory)
        beyond = sorted(r for r in present if r >= world_size)
        if beyond:
            raise RankSetError(
                f"the rank set has rank_{beyond[-1]} but msrun started {world_size} workers",
                path=directory,
                hint="Start msrun with one worker per rank (--worker_num)",
            )
        if not present and world_size == 1:
            return pick_checkpoint(directory, select, rank)
        own = directory / f"rank_{rank}"
        if not own.is_dir():
            raise RankSetError(
                f"rank_{rank} is not found; each worker reads only its own rank's directory",
                path=directory,
            )
        return pick_checkpoint(own, select, rank)
    if len(paths) != world_size:
        raise RankSetError(
            f"{len(paths)} checkpoint files were given but msrun started {world_size} workers; give one file "
            f"per rank, in rank order, or a rank-set directory"
        )
    path = paths[rank]
    if not path.exists():
        raise RankSetError("not found", path=path)
    if path.is_dir():
        raise RankSetError("is a directory; give either one rank-set directory or one file per rank", path=path)
    return path


def _manifest(gatherer: Gatherer, fmt: str) -> Dict[str, Any]:
    assert gatherer.source is not None
    assert gatherer.job is not None
    return {
        "command": "gather",
        "sources": [str(p) for p in gatherer.source.paths],
        "format": fmt,
        "parameters": len(gatherer.job.moves),
        **_plan_record(gatherer.plan, "plan"),
    }


def write_gathered(
    gatherer: Gatherer, output: Path, fmt: str, force: bool, manifest: Dict[str, Any], inputs: Sequence[Path] = ()
) -> None:
    """Run a prepared gather; rank 0 writes `output` atomically with `manifest`.

    `inputs` are the files rank 0 reads: the output must not be one of them, and rank 0 fails
    the job if one changes before the output is committed.
    """
    assert gatherer.job is not None
    assert gatherer.source is not None
    with contextlib.ExitStack() as stack:
        writer = None
        out = None
        if gatherer.cluster.is_root and gatherer.pending is None:
            try:
                out = stack.enter_context(atomic_output(output, directory=False, force=force, inputs=inputs))
                writer = open_writer(out.open(), gatherer.job.entries(0, gatherer.source), fmt)
            except (ShardsmithError, OSError) as exc:
                gatherer.pending = describe_exception(exc)

        def write(move: ParamMove, data: Any) -> None:
            writer.write(move.name, data)

        def commit() -> None:
            writer.close()
            out.commit(manifest)

        gatherer.run(write if writer is not None else None)
        gatherer.finish(commit if writer is not None else None)


def gather_files(
    cluster: Cluster,
    sources: Sequence[PathLike],
    plan: PathLike,
    output: PathLike,
    *,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    warn: Optional[Callable[[str], None]] = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Job:
    """Gather a rank set whose rank r file only worker r reads; rank 0 writes `output`.

    Every rank returns the job it took part in, or raises the same ShardsmithError.
    """
    output = Path(output)
    warn = warn or (lambda message: logger.warning("%s", message))
    failure = None
    reader = None
    plan_obj = Plan(cluster.world_size)
    fmt = ""
    try:
        plan_obj = load_plan(plan)
        fmt = detect_format(output, output_format)
        if cluster.is_root:
            check_target(output, force, directory=False)
        path = own_rank_file(sources, select, cluster.rank, cluster.world_size)
        reader = open_checkpoint(path, input_format)
    except ShardsmithError as exc:
        failure = exc.format()
    try:
        gatherer = Gatherer(
            cluster, reader, plan_obj, selection=selection, replicas=replicas, warn=warn, chunk_bytes=chunk_bytes
        )
        job = gatherer.prepare(failure)
        write_gathered(gatherer, output, fmt, force, _manifest(gatherer, fmt), inputs=[reader.path] if reader else [])
        return job
    finally:
        if reader is not None:
            reader.close()


def run_gather(
    sources: Sequence[PathLike],
    plan: PathLike,
    output: PathLike,
    *,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    output_format: Optional[str] = None,
    force: bool = False,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    device: Optional[str] = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> int:
    """Run `shardsmith gather` in this msrun process and return its exit code.

    In msrun's scheduler process it only serves the cluster. In a worker it reads this rank's
    file and takes part in the gather, and rank 0 writes `output` and prints a summary on
    stdout. A failure is printed on stderr by every rank. `device` ("CPU", "Ascend") is passed
    to `mindspore.set_device` before `init()`; None keeps MindSpore's default.
    """

    def work(cluster: Cluster) -> None:
        job = gather_files(
            cluster, sources, plan, output, select=select, input_format=input_format, output_format=output_format,
            force=force, selection=selection, replicas=replicas, warn=print_warning, chunk_bytes=chunk_bytes,
        )
        if cluster.is_root:
            total = sum(move.target_nbytes(0) for move in job.moves)
            print(f"gather: wrote {len(job.moves)} parameters, {total} bytes of tensor data, to {output}", flush=True)

    return run_in_msrun("gather", work, device=device)


# -- inside a training script -----------------------------------------------------------------


def gather_params(
    params: Any,
    plan: Union[PathLike, Plan],
    output: Optional[PathLike] = None,
    *,
    output_format: Optional[str] = None,
    force: bool = False,
    selection: Selection = Selection(),
    replicas: Optional[str] = None,
    chunk_bytes: int = CHUNK_BYTES,
    warn: Optional[Callable[[str], None]] = None,
) -> Optional[Dict[str, Any]]:
    """Gather this rank's parameters, already in memory, into full tensors on rank 0.

    `params` is a Cell or a dict of name -> Tensor or Parameter. Pass the optimizer to gather
    the network's weights with their optimizer states: its parameters have the names and order
    `mindspore.save_checkpoint(optimizer)` writes. Call it on every rank, after
    `mindspore.communication.init()`, with the same plan.

    With `output`, rank 0 writes a full checkpoint there (atomically, with a manifest) and every
    rank returns None. Without it, rank 0 returns name -> full `mindspore.Tensor` (a `str`
    value stays a str) and the other ranks return None. A failure on any rank raises the same
    DistributedError (or ShardsmithError) on every rank.
    """
    from .tensors import TensorSlices, parameters_of, to_tensor

    cluster = Cluster.from_mindspore()
    plan_obj = plan if isinstance(plan, Plan) else load_plan(plan)
    warn = warn or (lambda message: logger.warning("%s", message))
    failure = None
    local: Any = None
    fmt = ""
    try:
        local = TensorSlices(parameters_of(params), f"<rank {cluster.rank} parameters>")
        fmt = detect_format(output, output_format) if output is not None else ""
        if output is not None and cluster.is_root:
            check_target(Path(output), force, directory=False)
    except (ShardsmithError, TypeError) as exc:
        failure = describe_exception(exc)
    gatherer = Gatherer(cluster, local, plan_obj, selection=selection, replicas=replicas, warn=warn, chunk_bytes=chunk_bytes)
    job = gatherer.prepare(failure)

    if output is not None:
        manifest = {
            "command": "gather",
            "sources": [],
            "format": fmt,
            "parameters": len(job.moves),
            **_plan_record(plan_obj, "plan"),
        }
        write_gathered(gatherer, Path(output), fmt, force, manifest)
        return None

    result: Dict[str, Any] = {}

    def keep(move: ParamMove, data: Any) -> None:
        result[move.name] = data if move.dtype == dt.STRING else to_tensor(data, move.dtype)

    gatherer.run(keep)
    gatherer.finish(None)
    return result if cluster.is_root else None
