"""Train the hand-written hybrid-parallel MLP of model.py under msrun, on CPU workers.

A fresh run (4 workers: LAYOUTS[4]) trains --steps steps, saves each rank's slices of the network
and of its Adam state as OUT/rank_<r>/net.ckpt, then trains --extra-steps more and writes
OUT/reference.json: the losses after the checkpoint and the model's output on a fixed input at
the checkpoint. Those are what a merged or resharded copy of the checkpoint must reproduce.

    msrun --worker_num=4 --local_worker_num=4 --master_port=P --join=True \\
        train.py --out OUT --steps 5 --extra-steps 2 --check-grads

A resumed run (--resume SOURCE --plan PLAN) loads its rank's slices under PLAN, its own world
size, with shardsmith.online.load_rank_slice. SOURCE is a full checkpoint or a rank set of any
world size laid out by --source-plan. The run then trains --steps steps from the step stored in
the checkpoint and writes the losses and its output on the fixed input to --record.

msrun also starts this script once as its scheduler process, where `init()` serves the cluster.
So everything that depends on the rank happens after `init()`, and the scheduler returns there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_group_size, get_rank, init, release

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import (  # noqa: E402
    LAYOUTS,
    FullNet,
    ParallelNet,
    TrainState,
    batch,
    initial_weights,
    make_optimizer,
    mse,
    probe_input,
    slice_of,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for rank_<r>/net.ckpt and reference.json")
    parser.add_argument("--steps", type=int, default=5, help="steps to train before saving (or in total when resuming)")
    parser.add_argument("--extra-steps", type=int, default=2, help="steps to train after saving, for the reference losses")
    parser.add_argument("--check-grads", action="store_true", help="compare the first step's gradients with a single-device run")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from: a full file or a rank set")
    parser.add_argument("--plan", type=Path, help="shardsmith plan of this run's world size (with --resume)")
    parser.add_argument(
        "--source-plan",
        type=Path,
        help="plan the --resume rank set is laid out by (default: --plan); not used for a full checkpoint",
    )
    parser.add_argument("--record", type=Path, help="JSON file for the losses of a resumed run")
    args = parser.parse_args()
    if args.resume is None and args.out is None:
        parser.error("give --out for a fresh run or --resume with --plan and --record")
    if args.resume is not None and (args.plan is None or args.record is None):
        parser.error("--resume needs --plan and --record")
    return args


class Trainer:
    """One rank's network, optimizer and training step."""

    def __init__(self, net: ParallelNet) -> None:
        self.net = net
        self.optimizer = make_optimizer(net)
        self.params = self.optimizer.parameters
        self.grad_fn = ms.value_and_grad(self.loss, None, self.params)

    def loss(self, x, target):
        return mse(self.net(x), target)

    def gradients(self, x, target):
        loss, grads = self.grad_fn(x, target)
        return loss, self.net.sync_grads(self.params, grads)

    def step(self, step: int) -> float:
        x, target = (Tensor(a) for a in batch(step))
        loss, grads = self.gradients(x, target)
        self.optimizer(grads)
        return float(loss.asnumpy())

    def global_step(self) -> int:
        return int(self.optimizer.global_step.asnumpy().reshape(-1)[0])

    def probe(self) -> List[List[float]]:
        return self.net(Tensor(probe_input())).asnumpy().tolist()


def check_gradients(trainer: Trainer, weights: Dict[str, np.ndarray], rank: int) -> None:
    """Compare the loss and each gradient slice of step 0 with the full network's on one device.

    A communication op with the wrong backward pass still trains without error, but its gradients
    are off by a factor of the world size (MindSpore's AllReduce backward is another AllReduce).
    The example's numbers mean nothing until this check passes.
    """
    layout = LAYOUTS[get_group_size()]
    x, target = (Tensor(a) for a in batch(0))
    loss, grads = trainer.gradients(x, target)

    full = FullNet(weights)
    full_params = {p.name: p for p in full.trainable_params()}
    names = list(full_params)
    full_grad_fn = ms.value_and_grad(lambda x, t: mse(full(x), t), None, [full_params[n] for n in names])
    full_loss, full_grads = full_grad_fn(x, target)
    full_grads = dict(zip(names, (g.asnumpy() for g in full_grads)))

    failures = []
    if not np.allclose(loss.asnumpy(), full_loss.asnumpy(), rtol=1e-5, atol=1e-7):
        failures.append(f"loss {loss.asnumpy()} differs from the single-device loss {full_loss.asnumpy()}")
    for param, grad in zip(trainer.params, grads):
        expected = slice_of(param.name, full_grads[param.name], layout, rank)
        if not np.allclose(grad.asnumpy(), expected, rtol=1e-4, atol=1e-6):
            error = np.abs(grad.asnumpy() - expected).max()
            failures.append(f"gradient of {param.name} differs from the single-device one by up to {error:.3g}")
    if failures:
        raise SystemExit(f"rank {rank}: gradient check failed:\n  " + "\n  ".join(failures))
    print(f"rank {rank}: step-0 loss and all {len(grads)} gradient slices match the single-device run")


def load_slices(trainer: Trainer, args: argparse.Namespace, rank: int) -> None:
    """Load this rank's slices of the network and of its optimizer state from `args.resume`."""
    from shardsmith.online import load_rank_slice

    source_plan = args.source_plan
    if source_plan is None and args.resume.is_dir():
        source_plan = args.plan
    params = load_rank_slice(
        str(args.resume), str(args.plan), source_plan=str(source_plan) if source_plan else None
    )
    for cell in (trainer.net, trainer.optimizer):
        not_loaded, _ = ms.load_param_into_net(cell, params, strict_load=True)
        if not_loaded:
            raise SystemExit(
                f"rank {rank}: parameters missing from the slices loaded from {args.resume}: "
                f"{', '.join(not_loaded)}. Check that --plan is the layout of this run's world size."
            )


def format_losses(losses: List[float]) -> str:
    return ", ".join(f"{loss:.7f}" for loss in losses)


def fresh_run(args: argparse.Namespace, rank: int, world_size: int) -> None:
    weights = initial_weights()
    trainer = Trainer(ParallelNet(weights, LAYOUTS[world_size], rank))
    if args.check_grads:
        check_gradients(trainer, weights, rank)

    losses = [trainer.step(step) for step in range(args.steps)]
    probe_output = trainer.probe()
    path = args.out / f"rank_{rank}" / "net.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(TrainState(trainer.net, trainer.optimizer), str(path), append_dict={"step_num": args.steps})
    print(f"rank {rank}: losses of steps 0-{args.steps - 1}: {format_losses(losses)}; saved {path}")

    after = [trainer.step(step) for step in range(args.steps, args.steps + args.extra_steps)]
    print(f"rank {rank}: losses of the {len(after)} steps after the checkpoint: {format_losses(after)}")
    if rank == 0:
        reference = {
            "world_size": world_size,
            "checkpoint_step": args.steps,
            "losses_before_checkpoint": losses,
            "losses_after_checkpoint": after,
            "probe_output": probe_output,
        }
        (args.out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")


def resumed_run(args: argparse.Namespace, rank: int, world_size: int) -> None:
    # The initial weights only give the cells their shapes; every value is then overwritten.
    trainer = Trainer(ParallelNet(initial_weights(), LAYOUTS[world_size], rank))
    load_slices(trainer, args, rank)

    start = trainer.global_step()
    probe_output = trainer.probe()
    losses = [trainer.step(step) for step in range(start, start + args.steps)]
    print(f"rank {rank}: resumed at step {start} on {world_size} ranks; losses: {format_losses(losses)}")
    if rank == 0:
        record = {"world_size": world_size, "start_step": start, "losses": losses, "probe_output": probe_output}
        args.record.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    ms.set_device("CPU")
    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return
    rank, world_size = get_rank(), get_group_size()
    if world_size not in LAYOUTS:
        raise SystemExit(f"no layout for world size {world_size}: model.LAYOUTS has {sorted(LAYOUTS)}")
    if args.resume is None:
        fresh_run(args, rank, world_size)
    else:
        resumed_run(args, rank, world_size)
    release()


if __name__ == "__main__":
    main()
