"""`mirror`: an optimizer state takes the layout of the parameter it belongs to.

MindSpore optimizers name a state by prefixing the parameter's name (`Parameter.clone(prefix=…)`
in mindspore/nn/optim, 2.10). Most prefixes end in a dot; AdaFactor's factored second moment
uses `exp_avg_sq_row_`, `exp_avg_sq_col_` and `exp_avg_sq_` without one.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence, Tuple

from ..errors import LayoutError
from ..hookspecs import hookimpl
from ..layout import Layout, Shape
from .base import LayoutContext, Option, Strategy

# Longest first, so `moments.` wins over `moment.` and `exp_avg_sq_row_` over `exp_avg_sq_`.
_KNOWN_PREFIXES = {
    "moments.",  # Momentum, FTRL
    "moment1.",  # Adam, LazyAdam, AdamOffload
    "moment2.",
    "vhat.",  # Adam with use_amsgrad
    "adam_m.",  # AdamWeightDecay
    "adam_v.",
    "lamb_m.",  # Lamb
    "lamb_v.",
    "accum.",  # Adagrad, ProximalAdagrad, SGD
    "stat.",  # SGD
    "mean_square.",  # RMSProp
    "mean_grad.",  # RMSProp centered
    "moment.",  # RMSProp
    "linear.",  # FTRL
    "exp_avg.",  # AdaFactor, AdamW, AdaMax
    "exp_avg_sq.",  # experimental AdamW
    "max_exp_avg_sq.",
    "exp_inf.",  # AdaMax
    "accum_update.",  # Adadelta
    "prev.",  # Rprop
    "step_size.",
    "ax.",  # experimental ASGD
    "ax_.",  # nn.ASGD
    "momentum_buf.",  # mint.optim.SGD
    "exp_avg_sq_row_",  # AdaFactor, factored: one entry per row of the parameter
    "exp_avg_sq_col_",  # AdaFactor, factored: one entry per column
    "exp_avg_sq_",  # AdaFactor: the full second moment, or a (1,) placeholder
}
OPTIMIZER_STATE_PREFIXES: Tuple[str, ...] = tuple(sorted(_KNOWN_PREFIXES, key=lambda p: (-len(p), p)))

# Prefixes that are also common module names. Their optimizers always save a second state next to
# them, so a name counts as such a state only when that twin is in the checkpoint too.
COMPANION_PREFIXES = {
    "linear.": "moments.",  # FTRL: moments. and linear.
    "moment.": "mean_square.",  # RMSProp: mean_square. and moment.
    "stat.": "accum.",  # SGD with momentum: accum. and stat.
    "prev.": "step_size.",  # Rprop: prev. and step_size.
}

ROW_STATE_PREFIXES = ("exp_avg_sq_row_",)
COLUMN_STATE_PREFIXES = ("exp_avg_sq_col_",)


@functools.lru_cache(maxsize=64)
def _prefixes_with(extra: Tuple[str, ...]) -> Tuple[str, ...]:
    return tuple(sorted(set(OPTIMIZER_STATE_PREFIXES) | set(extra), key=lambda p: (-len(p), p)))


def parameter_of(state_name: str, param_names: Iterable[str], extra_prefixes: Sequence[str] = ()) -> Optional[str]:
    """Return the parameter an optimizer state belongs to, or None when `state_name` is not a state.

    A name counts as a state only when stripping a known prefix leaves the name of another
    parameter in the same checkpoint, so `global_step` or a parameter that happens to start with
    `linear.` is never mistaken for one.
    """
    names = param_names if isinstance(param_names, (set, frozenset, dict)) else set(param_names)
    for prefix in _prefixes_with(tuple(extra_prefixes)):
        if state_name.startswith(prefix):
            rest = state_name[len(prefix) :]
            if not rest or rest == state_name or rest not in names:
                continue
            companion = COMPANION_PREFIXES.get(prefix)
            if companion is not None and companion + rest not in names:
                # `linear.weight` next to `weight` is far more often an nn.Dense called `linear`
                # than FTRL's state, which never comes without its `moments.` twin.
                continue
            return rest
    return None


def state_prefix(state_name: str, param: str) -> str:
    return state_name[: len(state_name) - len(param)]


class Mirror(Strategy):
    name = "mirror"
    description = (
        "An optimizer state: the layout of its parameter. Row/column states of a factored optimizer "
        "follow the dimensions they keep; a (1,) placeholder is replicated."
    )
    options = {"of": Option("str", "the parameter this state belongs to (default: from the state's name)", default=None)}

    def parent(self, ctx: LayoutContext) -> str:
        parent = self.values["of"] or parameter_of(ctx.name, ctx.names, ctx.mirror_prefixes)
        if parent is None:
            raise LayoutError(
                "strategy 'mirror' found no parameter this state belongs to (no known optimizer prefix "
                "followed by a parameter name); set option 'of' in the plan",
                param=ctx.name,
            )
        if parent not in ctx.names:
            raise LayoutError(f"strategy 'mirror': parameter '{parent}' is not in the checkpoint", param=ctx.name)
        return parent

    def _kept_dims(self, shape: Shape, parent_layout: Layout, parent: str, ctx: LayoutContext, *, full: bool):
        """Return the parent dims this state keeps, or None when it is a (1,) placeholder."""
        parent_shape = parent_layout.full_shape if full else parent_layout.slice_shapes[0]
        ndim = len(parent_shape)
        prefix = state_prefix(ctx.name, parent)
        if tuple(shape) == tuple(parent_shape):
            return list(range(ndim))
        if prefix in ROW_STATE_PREFIXES and ndim >= 1:
            dims = list(range(ndim - 1))
        elif prefix in COLUMN_STATE_PREFIXES and ndim >= 2:
            dims = list(range(ndim - 2)) + [ndim - 1]
        else:
            dims = None
        if dims is not None and tuple(parent_shape[d] for d in dims) == tuple(shape):
            return dims
        if tuple(shape) == (1,):
            return None
        kind = "full" if full else "slice"
        raise LayoutError(
            f"optimizer state of shape {list(shape)} does not fit parameter '{parent}' of {kind} shape "
            f"{list(parent_shape)}",
            param=ctx.name,
        )

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        parent = self.parent(ctx)
        parent_layout = ctx.layout_of(parent)
        dims = self._kept_dims(full_shape, parent_layout, parent, ctx, full=True)
        if dims is None:
            return Layout.replicated(full_shape, world_size)
        if len(dims) == len(parent_layout.full_shape):
            return parent_layout
        return parent_layout.project(dims)

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        parent = self.parent(ctx)
        parent_layout = ctx.layout_of(parent)
        dims = self._kept_dims(slice_shapes[0], parent_layout, parent, ctx, full=False)
        if dims is None:
            return tuple(slice_shapes[0])
        return tuple(parent_layout.full_shape[d] for d in dims)


@hookimpl
def register_strategies(register):
    register(Mirror)
