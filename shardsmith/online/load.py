"""Loading one rank's slices for a new world size, inside a training script.

`load_rank_slice` builds the parameters rank r needs under a plan, straight from a full
checkpoint (as `shardsmith split` would lay them out) or from a rank set of any other size (as
`shardsmith reshard` would), and returns them ready for `mindspore.load_param_into_net`. The
decision is the offline job's (`engine.prepare_split` / `prepare_reshard`), but only rank r's
slice is assembled. Each box is sliced out of a memory-mapped source file, so a rank reads the
file headers and the pages of its own boxes, never the other ranks' data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .. import dtypes as dt
from ..engine import Job, Selection, _Arrays, prepare_reshard, prepare_split
from ..errors import DistributedError, RankSetError, ShardsmithError
from ..formats import CheckpointReader, open_checkpoint
from ..plan import Plan, load_plan
from ..rankset import Source, resolve_paths
from .slices import build_slice

PathLike = Union[str, Path]


def open_source_lazily(
    paths: Sequence[PathLike], select: Optional[str] = None, format: Optional[str] = None, *, verify_crc: Any = False
) -> Source:
    """Open a checkpoint or rank set reading headers only.

    `verify_crc` is a bool for every file, or a function of the file's index that returns
    whether to check that file's CRC, which reads the whole file.
    """
    files = resolve_paths([Path(p) for p in paths], select)
    readers: List[CheckpointReader] = []
    try:
        for index, path in enumerate(files):
            check = verify_crc(index) if callable(verify_crc) else bool(verify_crc)
            readers.append(open_checkpoint(path, format, verify_crc=check))
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return Source(readers)


def _as_plan(plan: Union[PathLike, Plan]) -> Plan:
    return plan if isinstance(plan, Plan) else load_plan(plan)


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple:
    if rank is not None and world_size is not None:
        return rank, world_size
    from mindspore.communication import GlobalComm, get_group_size, get_rank

    if not GlobalComm.INITED:
        raise DistributedError(
            "rank and world_size are not given and the collective communication is not initialized",
            hint="Call mindspore.communication.init() first, or pass rank= and world_size=",
        )
    return (get_rank() if rank is None else rank), (get_group_size() if world_size is None else world_size)


def plan_rank_slice(source: Source, plan: Plan, source_plan: Optional[Plan], selection: Selection) -> Job:
    """Decide the move from `source` to the layout of `plan`: a split of a full checkpoint, or a reshard."""
    if source_plan is None:
        if source.world_size != 1:
            raise RankSetError(
                f"the source is a rank set of {source.world_size} files; pass source_plan=, the plan it is laid "
                f"out by",
                path=source.paths[0].parent.parent,
            )
        return prepare_split(source, plan, selection)
    return prepare_reshard(source, source_plan, plan, selection)


def load_rank_slice(
    source: Union[PathLike, Sequence[PathLike]],
    plan: Union[PathLike, Plan],
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    *,
    source_plan: Union[PathLike, Plan, None] = None,
    select: Optional[str] = None,
    input_format: Optional[str] = None,
    selection: Selection = Selection(),
    verify_crc: bool = False,
) -> Dict[str, Any]:
    """Return rank `rank`'s parameters under `plan`, as name -> mindspore.Parameter.

    `source` is a full checkpoint, or a rank set (a directory of `rank_<r>/`, or the files in rank
    order) laid out by `source_plan`. The result contains every selected entry of the checkpoint,
    optimizer states and scalars included, each named as in the checkpoint. A `str` entry stays
    a str, as `mindspore.load_checkpoint` returns it. Pass it to `mindspore.load_param_into_net`
    for the network and for the optimizer.

    `rank` and `world_size` default to `get_rank()` and `get_group_size()` (after
    `mindspore.communication.init()`); `world_size` must equal the plan's.

    NOTE: copies that a source rank set holds several times are read once, from the lowest rank
    holding them, and not compared; `shardsmith merge --dry-run` checks them. A file's CRC is
    checked only with `verify_crc=True`, which reads every source file whole on every rank. A
    `.ckpt` tensor over 512 MiB is stored in several records, which the reader joins in memory,
    so every rank reads such a tensor whole.
    """
    plan_obj = _as_plan(plan)
    source_plan_obj = _as_plan(source_plan) if source_plan is not None else None
    rank, world_size = _rank_and_world(rank, world_size)
    if world_size != plan_obj.world_size:
        where = f" ({plan_obj.path})" if plan_obj.path else ""
        raise ShardsmithError(f"world size {world_size} differs from the plan's world_size {plan_obj.world_size}{where}")
    if not 0 <= rank < world_size:
        raise ShardsmithError(f"rank {rank} is not in 0..{world_size - 1}")

    from .tensors import to_parameter

    paths = [source] if isinstance(source, (str, Path)) else list(source)
    result: Dict[str, Any] = {}
    with open_source_lazily(paths, select, input_format, verify_crc=verify_crc) as opened:
        job = plan_rank_slice(opened, plan_obj, source_plan_obj, selection)
        for move in job.moves:
            if move.dtype == dt.STRING:
                result[move.name] = opened.readers[0].string(move.name)
                continue
            arrays = _Arrays(opened.readers, move.name)
            try:
                result[move.name] = to_parameter(build_slice(move, arrays, rank), move.dtype, move.name)
            finally:
                arrays.release()
    return result
