"""Write the example's full checkpoint and its plan: a two-layer MLP after one Adam step.

OUT/full.ckpt contains the network's weights, Adam's moments and scalars, as
`mindspore.save_checkpoint(optimizer)` writes them. OUT/plan.toml lays them out over
--world-size ranks the Megatron way: the first layer split by output features (rows of its
weight and its bias), the second by input features (columns of its weight); the moments follow
their parameters and the rest is replicated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import nn

PLAN = """\
world_size = {world_size}

[[param]]
match = "0.*"
strategy = "row"

[[param]]
match = "2.weight"
strategy = "column"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for full.ckpt and plan.toml")
    parser.add_argument("--world-size", type=int, default=2, help="ranks the plan splits over (divides 32)")
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_seed(0)
    net = nn.SequentialCell(nn.Dense(16, 32), nn.ReLU(), nn.Dense(32, 8))
    optimizer = nn.Adam(net.trainable_params(), learning_rate=1e-3)

    def loss_fn(x, y):
        return ((net(x) - y) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((4, 16)).astype(np.float32))
    y = ms.Tensor(rng.standard_normal((4, 8)).astype(np.float32))
    _, grads = grad_fn(x, y)
    optimizer(grads)

    args.out.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(optimizer, str(args.out / "full.ckpt"))
    (args.out / "plan.toml").write_text(PLAN.format(world_size=args.world_size), encoding="utf-8")


if __name__ == "__main__":
    main()
