"""Inside a training job: load this rank's slices of a full checkpoint, then gather them back.

Run under msrun, one worker per rank of the plan:

    msrun --worker_num=2 --local_worker_num=2 --master_port=PORT --join=True \\
        resume_and_gather.py --full OUT/full.ckpt --plan OUT/plan.toml --out OUT/from_memory.ckpt

Each rank reads only its own boxes of --full (`load_rank_slice`), where a training script
would load them into its network and optimizer with `mindspore.load_param_into_net` and train.
Then every rank hands its parameters to `gather_params`, and rank 0 writes the full checkpoint
to --out. Nothing changed them, so --out equals --full byte for byte.

msrun also starts this script once as its scheduler (MS_ROLE=MS_SCHED), where `init()` serves
the cluster; everything that depends on the rank comes after `init()`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mindspore as ms
from mindspore.communication import get_rank, init, release

from shardsmith.online import gather_params, load_rank_slice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=Path, required=True, help="the full checkpoint to load slices of")
    parser.add_argument("--plan", type=Path, required=True, help="the plan of this job's world size")
    parser.add_argument("--out", type=Path, required=True, help="the full checkpoint rank 0 writes")
    parser.add_argument("--device", default="CPU", help="mindspore.set_device target: CPU or Ascend")
    args = parser.parse_args()

    ms.set_device(args.device)
    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return

    params = load_rank_slice(args.full, args.plan)
    shapes = ", ".join(f"{name} {list(p.shape)}" for name, p in params.items() if not isinstance(p, str))
    print(f"rank {get_rank()} holds {shapes}", flush=True)

    gather_params(params, args.plan, args.out)
    if get_rank() == 0:
        print(f"rank 0 wrote {args.out}", flush=True)
    release()


if __name__ == "__main__":
    main()
