"""Running a shardsmith command as an msrun job: the scheduler, the workers, and how they exit.

msrun starts the command once per worker (`MS_ROLE=MS_WORKER`) and once more as its scheduler
(`MS_ROLE=MS_SCHED`). The scheduler only serves the cluster, inside `init()`, and does no work.

How a failed job ends matters with msrun (checked with MindSpore 2.10 on CPU, 2 and 4 workers):
as soon as one worker exits non-zero, msrun SIGKILLs every other worker. A worker killed before
it has left the cluster makes the scheduler log "The node: r is timed out" about 30 s later and
exit non-zero. msrun exits 1 when any worker or the scheduler exits non-zero, 0 only when all
of them exit 0. The jobs agree on every failure through their collectives (see `cluster`), so every rank learns
of it at the same point. Then the other ranks print the error and exit 0, and rank 0 exits
non-zero a moment later, once they have left: msrun exits 1 without the scheduler's timeout.
An unexpected exception (a bug) is not caught here; that rank exits non-zero at once and msrun
kills the others, which would otherwise wait in a collective the rank never joins.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

from ..errors import DistributedError, ShardsmithError
from .cluster import Cluster, msrun_role

logger = logging.getLogger(__name__)

# Seconds rank 0 waits before exiting after a failed job, so that the other ranks leave first.
ROOT_EXIT_DELAY = 5.0


def print_error(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr, flush=True)


def print_warning(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def launch_hint(command: str) -> str:
    return (
        f"Start it with msrun, the venv's bin first on PATH: msrun --worker_num=N --local_worker_num=N "
        f"--master_port=PORT --join=True $(command -v shardsmith) {command} ..."
    )


def _set_device(device: Optional[str]) -> None:
    if device is None:
        return
    import mindspore

    mindspore.set_device(device)


def _serve_scheduler(device: Optional[str]) -> int:
    """Serve the cluster as msrun's scheduler; `init()` returns (or ends the process) when it is done."""
    from mindspore.communication import init

    _set_device(device)
    try:
        init()
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print_error(f"the msrun scheduler reported a failed cluster: {first_line}")
        return 1
    return 0


def run_in_msrun(command: str, work: Callable[[Cluster], None], *, device: Optional[str] = None) -> int:
    """Run `work` on every msrun worker and return this process's exit code.

    `work` raises ShardsmithError on failure, on every rank together, because the jobs agree on
    every failure. Every rank prints the message. Rank 0 returns the error's exit code and the
    other ranks return 0, so that msrun's exit code is rank 0's (see the module docstring).
    """
    role = msrun_role()
    if role is None:
        print_error(f"shardsmith {command} runs inside an msrun job, and MS_ROLE is not set. {launch_hint(command)}")
        return 1
    if role == "MS_SCHED":
        return _serve_scheduler(device)

    from mindspore.communication import init, release

    try:
        _set_device(device)
        init()
        cluster = Cluster.from_mindspore()
    except (RuntimeError, ValueError, DistributedError) as exc:
        print_error(f"joining the msrun cluster failed: {exc}")
        return 1
    logger.info("rank %d of %d: starting %s", cluster.rank, cluster.world_size, command)

    try:
        work(cluster)
    except ShardsmithError as exc:
        print_error(exc.format())
        release()
        if not cluster.is_root:
            return 0
        time.sleep(ROOT_EXIT_DELAY)
        return exc.exit_code
    release()
    return 0
