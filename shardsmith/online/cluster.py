"""The workers of an msrun job as shardsmith's online jobs use them.

Every collective moves raw bytes as int32 words. MindSpore 2.10's CPU AllGather accepts only
Float32, Float16 and Int32, and it silently narrows Int64 and Float64 to 32 bits: an Int64 2**40
arrives as 0. So int32 is the one type that carries any bytes unchanged. HCCL on Ascend lists
int32 among HcclAllGather's data types (CANN documentation), but that path has not been run
with shardsmith. A BFloat16 or Bool tensor never passes through a cast either way.

Every collective also carries one status word per rank. A rank that has failed joins the next
collective with its status set instead of leaving, every rank sees the failure in the same
collective, and all of them then exchange the messages and raise `DistributedError` together.
No rank waits in a collective that another rank will never join.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, List, Optional, Sequence

import numpy as np

from ..errors import DistributedError

logger = logging.getLogger(__name__)

_WORD = 4  # bytes per int32 word

# Bytes one rank sends in one AllGather. On the CPU backend (MindSpore 2.10, 2 workers on one
# 2-core machine) twenty 4 MiB AllGathers moved about 40 MB/s per rank. A 32 MiB and a 64 MiB
# AllGather each failed once there with "CollectiveWait failed", while ten of 16 MiB went through.
CHUNK_BYTES = 4 * 1024 * 1024


def words_for(nbytes: int) -> int:
    """Return how many int32 words hold `nbytes` bytes."""
    return -(-nbytes // _WORD)


def to_words(data: np.ndarray, nwords: int) -> np.ndarray:
    """Copy the bytes of a C-contiguous array into `nwords` int32 words, zero-padded."""
    words = np.zeros(nwords, np.int32)
    raw = data.reshape(-1).view(np.uint8)
    words.view(np.uint8)[: raw.size] = raw
    return words


class Cluster:
    """This process's rank and world size, and the collectives the online jobs need.

    `all_gather` is the backend: it takes one 1-D int32 array (the same length on every rank)
    and returns every rank's array concatenated in rank order, as `ops.AllGather` does.
    """

    def __init__(self, rank: int, world_size: int, all_gather: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        self._all_gather = all_gather

    @classmethod
    def from_mindspore(cls) -> "Cluster":
        """Build a cluster on MindSpore's world group; `mindspore.communication.init()` must have run."""
        import mindspore
        from mindspore import ops
        from mindspore.communication import GlobalComm, get_group_size, get_rank

        if not GlobalComm.INITED:
            raise DistributedError(
                "the collective communication is not initialized",
                hint="Call mindspore.communication.init() first, in a script that msrun started",
            )
        gather = ops.AllGather()

        def all_gather(words: np.ndarray) -> np.ndarray:
            return gather(mindspore.Tensor(words)).asnumpy()

        return cls(get_rank(), get_group_size(), all_gather)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------

    def _raw_gather(self, words: np.ndarray) -> np.ndarray:
        if words.dtype != np.int32 or words.ndim != 1:
            raise TypeError(f"collectives take 1-D int32 words, got {words.dtype} of shape {words.shape}")
        if self.world_size == 1:
            return words.reshape(1, -1).copy()
        out = np.asarray(self._all_gather(words))
        if out.dtype != np.int32 or out.size != words.size * self.world_size:
            raise DistributedError(
                f"AllGather returned {out.size} {out.dtype} values for {words.size} int32 words from each of "
                f"{self.world_size} ranks"
            )
        return out.reshape(self.world_size, words.size)

    def all_gather(self, words: np.ndarray, failure: Optional[str] = None) -> np.ndarray:
        """Gather `words` (the same length on every rank); return a [world_size, len] array.

        `failure` is this rank's error message, if it has failed: the rank then sends it in place
        of data, and every rank raises `DistributedError` with every failing rank's message.
        """
        status = np.array([1 if failure is not None else 0], np.int32)
        gathered = self._raw_gather(np.concatenate([status, words.astype(np.int32, copy=False)]))
        if gathered[:, 0].any():
            self._fail(failure)
        return gathered[:, 1:]

    def check(self, failure: Optional[str] = None) -> None:
        """Agree that every rank has succeeded so far; raise `DistributedError` on every rank if not."""
        self.all_gather(np.zeros(0, np.int32), failure)

    def exchange(self, value: Any, failure: Optional[str] = None) -> List[Any]:
        """Send a JSON-serializable value to every rank; return every rank's value in rank order."""
        data = b"" if failure is not None else json.dumps(value, separators=(",", ":")).encode("utf-8")
        sizes = self.all_gather(np.array([len(data)], np.int32), failure)[:, 0]
        padded = words_for(int(sizes.max()))
        gathered = self._raw_gather(to_words(np.frombuffer(data, np.uint8), padded))
        return [json.loads(gathered[r].view(np.uint8)[: sizes[r]].tobytes()) for r in range(self.world_size)]

    def _fail(self, failure: Optional[str]) -> None:
        """Exchange the failing ranks' messages and raise the same `DistributedError` on every rank."""
        data = (failure or "").encode("utf-8")
        sizes = self._raw_gather(np.array([len(data)], np.int32))[:, 0]
        gathered = self._raw_gather(to_words(np.frombuffer(data, np.uint8), words_for(int(sizes.max()))))
        messages = []
        for rank in range(self.world_size):
            if sizes[rank]:
                text = gathered[rank].view(np.uint8)[: sizes[rank]].tobytes().decode("utf-8", "replace")
                messages.append((rank, text))
        raise DistributedError(describe_failures(messages, self.world_size))


def describe_failures(messages: Sequence[Any], world_size: int) -> str:
    """Join (rank, message) pairs into one message; identical messages from several ranks appear once."""
    by_text: dict = {}
    for rank, text in messages:
        by_text.setdefault(text, []).append(rank)
    if not by_text:
        return f"another rank of the {world_size} failed"
    parts = []
    for text, ranks in by_text.items():
        who = "rank " + ", ".join(map(str, ranks)) if len(ranks) < world_size else "every rank"
        parts.append(f"{who}: {text}")
    return "; ".join(parts)


def msrun_role() -> Optional[str]:
    """Return the role msrun gave this process (`MS_WORKER` or `MS_SCHED`), or None outside msrun."""
    return os.environ.get("MS_ROLE")
