"""A small MLP, once as a single-device network and once with hand-written model parallelism.

    x -> ln -> fc1 -> relu -> fc2 -> tanh -> fc3 -> y

`FullNet` is the plain network. `ParallelNet` holds one rank's slices of the same parameters,
under the same names, and computes the same function with collective operations:

- `ln.gamma`, `ln.beta`, `fc2.bias`: replicated on every rank.
- `fc1` is column-parallel (Megatron's term: its output features are split). Rank r holds rows
  block r of `fc1.weight` [HIDDEN, IN] (nn.Dense stores [out, in]) and block r of `fc1.bias`.
- `fc2` is row-parallel (its input features are split): rank r holds columns block r of
  `fc2.weight` [MID, HIDDEN] and adds `fc2.bias` after the AllReduce of the partial products.
- `fc3.weight` [OUT, MID] is split as an a x b grid: rank r = i * b + j holds block (i, j).
  `fc3.bias` is split in `a` blocks along dim 0, rank r holding block i, so the b ranks of one grid
  row hold copies of it.

The slicing here is written by hand on purpose: it is the independent reference that shardsmith's
merges and splits are checked against, so it must not use shardsmith.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

IN, HIDDEN, MID, OUT = 12, 32, 16, 8
BATCH = 16
SEED = 20240607
LEARNING_RATE = 0.01


@dataclass(frozen=True)
class Layout:
    """The split of the network for one world size: the part count of fc1 and fc2, fc3's grid."""

    world_size: int
    hidden_parts: int
    grid: Tuple[int, int]


# plan_4.toml and plan_2.toml describe these two layouts in shardsmith's plan format.
LAYOUTS = {
    4: Layout(world_size=4, hidden_parts=4, grid=(2, 2)),
    2: Layout(world_size=2, hidden_parts=2, grid=(1, 2)),
}


def initial_weights() -> Dict[str, np.ndarray]:
    """Return the full parameters every run starts from, drawn from a fixed seed."""
    rng = np.random.RandomState(SEED)

    def dense(fan_out: int, fan_in: int) -> Tuple[np.ndarray, np.ndarray]:
        bound = 1.0 / np.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        bias = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        return weight, bias

    weights = {
        "ln.gamma": (1.0 + 0.1 * rng.standard_normal(IN)).astype(np.float32),
        "ln.beta": (0.1 * rng.standard_normal(IN)).astype(np.float32),
    }
    for name, (fan_out, fan_in) in {"fc1": (HIDDEN, IN), "fc2": (MID, HIDDEN), "fc3": (OUT, MID)}.items():
        weights[f"{name}.weight"], weights[f"{name}.bias"] = dense(fan_out, fan_in)
    return weights


def batch(step: int) -> Tuple[np.ndarray, np.ndarray]:
    """Return the (input, target) batch of one training step; every rank draws the same one."""
    rng = np.random.RandomState(SEED + 1 + step)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    target = np.sin(x[:, :OUT] + x[:, OUT - IN :].sum(axis=1, keepdims=True) / 4).astype(np.float32)
    return x, target


def probe_input() -> np.ndarray:
    """Return the fixed input on which the parallel and the merged networks are compared."""
    return np.random.RandomState(SEED - 1).standard_normal((4, IN)).astype(np.float32)


def slice_of(name: str, full: np.ndarray, layout: Layout, rank: int) -> np.ndarray:
    """Return rank's slice of the full parameter `name` under `layout`."""
    a, b = layout.grid
    i, j = divmod(rank, b)
    if name in ("fc1.weight", "fc1.bias"):
        return np.split(full, layout.hidden_parts, axis=0)[rank % layout.hidden_parts]
    if name == "fc2.weight":
        return np.split(full, layout.hidden_parts, axis=1)[rank % layout.hidden_parts]
    if name == "fc3.weight":
        return np.split(np.split(full, a, axis=0)[i], b, axis=1)[j]
    if name == "fc3.bias":
        return np.split(full, a, axis=0)[i]
    return full


class CopyToParallel(nn.Cell):
    """Identity forward; AllReduce of the gradient backward.

    It sits where a replicated activation enters split layers. Each rank's backward pass yields
    only its own slices' share of the activation's gradient, and the sum over ranks is the whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromParallel(nn.Cell):
    """AllReduce forward; identity backward.

    Every rank computes the same loss from the reduced output, so each rank's gradient of that
    output is already the whole gradient. MindSpore's own AllReduce backward is another AllReduce,
    which would multiply it by the world size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class ColumnParallelDense(nn.Cell):
    """A dense layer whose output features are split: rank r computes its block of the output."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = Parameter(Tensor(bias), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.matmul(x, self.weight) + self.bias


class RowParallelDense(nn.Cell):
    """A dense layer whose input features are split: partial products are summed by AllReduce."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = Parameter(Tensor(bias), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.reduce = ReduceFromParallel()

    def construct(self, x_block):
        return self.reduce(self.matmul(x_block, self.weight)) + self.bias


class GridParallelDense(nn.Cell):
    """A dense layer whose weight is split as an a x b grid of blocks; rank i * b + j holds (i, j).

    The rank multiplies input block j by its weight block and places the product in output block i
    of a zero output. AllReduce then sums all ranks' products into the full output. Only the rank
    with j == 0 adds the bias block, so that the sum counts it once. The other copies of that block
    get a zero gradient, which is why `sync_bias_grad` sums the gradient over the grid row.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, grid: Tuple[int, int], rank: int) -> None:
        super().__init__()
        a, b = grid
        self.i, self.j = divmod(rank, b)
        self.out_features = weight.shape[0] * a
        self.rows = weight.shape[0]
        self.cols = weight.shape[1]
        self.adds_bias = self.j == 0
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = Parameter(Tensor(bias), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.copy = CopyToParallel()
        self.reduce = ReduceFromParallel()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        x_block = self.copy(x)[:, self.j * self.cols : (self.j + 1) * self.cols]
        partial = self.matmul(x_block, self.weight)
        if self.adds_bias:
            partial = partial + self.bias
        before = self.i * self.rows
        after = self.out_features - before - self.rows
        padded = ops.pad(partial, (before, after))
        return self.reduce(padded)

    def sync_bias_grad(self, grad):
        """Sum the bias gradient over the ranks that hold copies of this bias block."""
        before = self.i * self.rows
        padded = ops.pad(grad, (before, self.out_features - before - self.rows))
        return self.all_reduce(padded)[before : before + self.rows]


class FullNet(nn.Cell):
    """The network on one device, with the full parameters."""

    def __init__(self, weights: Dict[str, np.ndarray]) -> None:
        super().__init__()
        self.ln = nn.LayerNorm((IN,))
        self.fc1 = nn.Dense(IN, HIDDEN)
        self.fc2 = nn.Dense(HIDDEN, MID)
        self.fc3 = nn.Dense(MID, OUT)
        for name, param in self.parameters_and_names():
            param.set_data(Tensor(weights[name]))

    def construct(self, x):
        h = ops.relu(self.fc1(self.ln(x)))
        return self.fc3(ops.tanh(self.fc2(h)))


class ParallelNet(nn.Cell):
    """One rank's part of the network; with the slices of FullNet's weights it computes FullNet."""

    def __init__(self, weights: Dict[str, np.ndarray], layout: Layout, rank: int) -> None:
        super().__init__()
        sliced = {name: slice_of(name, value, layout, rank) for name, value in weights.items()}
        self.ln = nn.LayerNorm((IN,))
        self.ln.gamma.set_data(Tensor(sliced["ln.gamma"]))
        self.ln.beta.set_data(Tensor(sliced["ln.beta"]))
        self.copy = CopyToParallel()
        self.fc1 = ColumnParallelDense(sliced["fc1.weight"], sliced["fc1.bias"])
        self.fc2 = RowParallelDense(sliced["fc2.weight"], sliced["fc2.bias"])
        self.fc3 = GridParallelDense(sliced["fc3.weight"], sliced["fc3.bias"], layout.grid, rank)

    def construct(self, x):
        h = ops.relu(self.fc1(self.copy(self.ln(x))))
        return self.fc3(ops.tanh(self.fc2(h)))

    def sync_grads(self, params, grads):
        """Complete the gradients of parameters whose copies each saw only part of the gradient."""
        return tuple(
            self.fc3.sync_bias_grad(grad) if param is self.fc3.bias else grad
            for param, grad in zip(params, grads)
        )


def mse(output, target):
    return ((output - target) ** 2).mean()


class TrainState(nn.Cell):
    """The network and its optimizer under one cell, saved as one checkpoint like TrainOneStepCell.

    `auto_prefix=False` keeps the parameter names the network gives them (`fc1.weight`, not
    `network.fc1.weight`), as MindSpore's own wrapper cells do.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.optimizer = optimizer


def make_optimizer(network: nn.Cell) -> nn.Optimizer:
    return nn.Adam(network.trainable_params(), learning_rate=LEARNING_RATE)
