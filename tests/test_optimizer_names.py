"""The `mirror` strategy's name table against the checkpoints MindSpore's optimizers really write.

Each case builds a tiny network with a 2-D weight and a 1-D bias and saves the optimizer with
`mindspore.save_checkpoint`. The saved names and shapes must be exactly the ones listed here, so a
MindSpore release that renames a state fails this test rather than shardsmith's merges. Then
`parameter_of` must map every optimizer state to its parameter and no scalar to anything.
"""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor, nn  # noqa: E402

from shardsmith.strategies.mirror import parameter_of  # noqa: E402

W_SHAPE = (4, 6)
B_SHAPE = (6,)

# What each optimizer saves besides the parameters, for parameters named W and B:
# {state name: (parameter it belongs to, saved shape)}, then the scalars (0-d, or [1] for
# global_step and AdaFactor's afactor_step), which belong to no parameter.
OPTIMIZERS = {
    "Momentum": (
        lambda params: nn.Momentum(params, learning_rate=0.1, momentum=0.9),
        {"moments.W": ("W", W_SHAPE), "moments.B": ("B", B_SHAPE)},
        {"global_step": (1,), "learning_rate": (), "momentum": ()},
    ),
    "Adam": (
        lambda params: nn.Adam(params, learning_rate=0.1),
        {
            "moment1.W": ("W", W_SHAPE),
            "moment1.B": ("B", B_SHAPE),
            "moment2.W": ("W", W_SHAPE),
            "moment2.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": (), "beta1_power": (), "beta2_power": ()},
    ),
    "AdamWeightDecay": (
        lambda params: nn.AdamWeightDecay(params, learning_rate=0.1),
        {
            "adam_m.W": ("W", W_SHAPE),
            "adam_m.B": ("B", B_SHAPE),
            "adam_v.W": ("W", W_SHAPE),
            "adam_v.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": ()},
    ),
    "Lamb": (
        lambda params: nn.Lamb(params, learning_rate=0.1),
        {
            "lamb_m.W": ("W", W_SHAPE),
            "lamb_m.B": ("B", B_SHAPE),
            "lamb_v.W": ("W", W_SHAPE),
            "lamb_v.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": ()},
    ),
    "Adagrad": (
        lambda params: nn.Adagrad(params, learning_rate=0.1),
        {"accum.W": ("W", W_SHAPE), "accum.B": ("B", B_SHAPE)},
        {"global_step": (1,), "learning_rate": ()},
    ),
    "RMSProp": (
        lambda params: nn.RMSProp(params, learning_rate=0.1),
        {
            "mean_square.W": ("W", W_SHAPE),
            "mean_square.B": ("B", B_SHAPE),
            "moment.W": ("W", W_SHAPE),
            "moment.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": ()},
    ),
    "FTRL": (
        lambda params: nn.FTRL(params),
        {
            "moments.W": ("W", W_SHAPE),
            "moments.B": ("B", B_SHAPE),
            "linear.W": ("W", W_SHAPE),
            "linear.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": ()},
    ),
    "SGD": (
        lambda params: nn.SGD(params, learning_rate=0.1, momentum=0.9),
        {
            "accum.W": ("W", W_SHAPE),
            "accum.B": ("B", B_SHAPE),
            "stat.W": ("W", W_SHAPE),
            "stat.B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": (), "momentum": ()},
    ),
    # AdaFactor factors the second moment of a 2-D parameter into one entry per row and one per
    # column and keeps a [1] placeholder for the unfactored form. A 1-D parameter gets the
    # unfactored form and two placeholders. These names join prefix and parameter with "_".
    "AdaFactor": (
        lambda params: nn.AdaFactor(params),
        {
            "exp_avg.W": ("W", W_SHAPE),
            "exp_avg.B": ("B", B_SHAPE),
            "exp_avg_sq_row_W": ("W", W_SHAPE[:1]),
            "exp_avg_sq_row_B": ("B", (1,)),
            "exp_avg_sq_col_W": ("W", W_SHAPE[1:]),
            "exp_avg_sq_col_B": ("B", (1,)),
            "exp_avg_sq_W": ("W", (1,)),
            "exp_avg_sq_B": ("B", B_SHAPE),
        },
        {"global_step": (1,), "learning_rate": (), "afactor_step": (1,)},
    ),
}

# Plain names as in a hand-built cell, and dotted ones as nn.Dense inside a network produces.
PARAM_NAMES = [("w", "b"), ("fc.weight", "fc.bias")]


class _TinyNet(nn.Cell):
    def __init__(self, weight_name: str, bias_name: str) -> None:
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(W_SHAPE, np.float32)), name=weight_name)
        self.bias = Parameter(Tensor(np.ones(B_SHAPE, np.float32)), name=bias_name)

    def construct(self, x):
        return (x @ self.weight + self.bias).sum()


def _expected(table: dict, weight_name: str, bias_name: str) -> dict:
    """Substitute the real parameter names for the W and B placeholders of a table entry."""

    def rename(text: str) -> str:
        if text.endswith("W"):
            return text[:-1] + weight_name
        if text.endswith("B"):
            return text[:-1] + bias_name
        return text

    return {rename(state): (rename(param), shape) for state, (param, shape) in table.items()}


def _saved(make_optimizer, weight_name: str, bias_name: str, path) -> dict:
    net = _TinyNet(weight_name, bias_name)
    optimizer = make_optimizer(net.trainable_params())
    ms.save_checkpoint(optimizer, str(path))
    return {name: tuple(value.shape) for name, value in ms.load_checkpoint(str(path)).items()}


@pytest.fixture(scope="module", params=list(OPTIMIZERS), ids=list(OPTIMIZERS))
def optimizer_name(request):
    return request.param


@pytest.mark.parametrize("weight_name,bias_name", PARAM_NAMES, ids=["plain", "dotted"])
def test_saved_names_match_table(optimizer_name, weight_name, bias_name, tmp_path):
    make_optimizer, states, scalars = OPTIMIZERS[optimizer_name]
    saved = _saved(make_optimizer, weight_name, bias_name, tmp_path / "opt.ckpt")

    expected = {weight_name: W_SHAPE, bias_name: B_SHAPE, **scalars}
    for state, (_, shape) in _expected(states, weight_name, bias_name).items():
        expected[state] = shape
    assert saved == expected


@pytest.mark.parametrize("weight_name,bias_name", PARAM_NAMES, ids=["plain", "dotted"])
def test_states_resolve_to_parameter(optimizer_name, weight_name, bias_name, tmp_path):
    make_optimizer, states, _ = OPTIMIZERS[optimizer_name]
    saved = _saved(make_optimizer, weight_name, bias_name, tmp_path / "opt.ckpt")
    names = list(saved)

    for state, (param, _) in _expected(states, weight_name, bias_name).items():
        assert parameter_of(state, names) == param, state


@pytest.mark.parametrize("weight_name,bias_name", PARAM_NAMES, ids=["plain", "dotted"])
def test_scalars_resolve_to_nothing(optimizer_name, weight_name, bias_name, tmp_path):
    make_optimizer, _, scalars = OPTIMIZERS[optimizer_name]
    saved = _saved(make_optimizer, weight_name, bias_name, tmp_path / "opt.ckpt")
    names = list(saved)

    for scalar in scalars:
        assert parameter_of(scalar, names) is None, scalar


@pytest.mark.parametrize("weight_name,bias_name", PARAM_NAMES, ids=["plain", "dotted"])
def test_parameters_are_not_states(optimizer_name, weight_name, bias_name, tmp_path):
    make_optimizer, _, _ = OPTIMIZERS[optimizer_name]
    names = list(_saved(make_optimizer, weight_name, bias_name, tmp_path / "opt.ckpt"))

    assert parameter_of(weight_name, names) is None
    assert parameter_of(bias_name, names) is None
