"""The interface every layout strategy implements, built-in or from a plugin.

Contract, in the order shardsmith calls it:

1. The class is registered through the `register_strategies` hook. Its `name` is the key a plan's
   `strategy = "..."` refers to; `description` is shown by `shardsmith strategies` and the TUI;
   `options` declares each option's type and default, so plan files and the TUI are validated
   before any strategy code runs.
2. `Strategy(**options)` is made once per plan rule, with options already checked against
   `options` and defaults filled in. `__init__` may raise `PlanError` for combinations the
   declarations cannot express (a grid with a zero side).
3. For each parameter the rule matches, shardsmith calls one of:
   - `layout(full_shape, world_size, ctx)` when the full tensor is known (split, the target of a
     reshard, loading a rank's slice), and
   - `full_shape(slice_shapes, world_size, ctx)` when only the slices are known (merge, the source
     of a reshard, gather); shardsmith then calls `layout` with the result and checks that the
     layout's slice shapes are the ones the rank files hold.
   Both raise `LayoutError` (naming the parameter, the dimension and the numbers) when the shapes
   cannot be laid out this way. Neither touches tensor data.
4. The returned `Layout` says, for every rank, which boxes of its slice map to which boxes of the
   full tensor. Everything that moves bytes is done by shardsmith from those pieces, so a strategy
   that permutes (a fused QKV weight) or pads (a padded vocabulary) never handles arrays.

Optimizer states that follow a parameter (`mirror`) get the parameter's layout from the same
strategy instance through `ctx.layout_of`, so a plugin strategy carries its states along too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from ..errors import PlanError
from ..layout import Layout, Shape

_REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """A declared strategy option: its type, default and one line of help.

    `type` is one of "int", "bool", "str", "int_list" (a list of ints) or "tensor_map" (a list whose
    entries are ints or lists of ints). `default=None` means the option may be left out.
    """

    type: str
    help: str
    default: Any = _REQUIRED
    choices: Optional[Tuple[Any, ...]] = None
    minimum: Optional[int] = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def type_name(self) -> str:
        return {
            "int": "integer",
            "bool": "boolean",
            "str": "string",
            "int_list": "list of integers",
            "tensor_map": "list of integers (or lists of integers)",
        }[self.type]

    def check(self, value: Any) -> Any:
        """Return value if it has this option's type, else raise ValueError saying what was expected."""
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "int_list": lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) for x in v),
            "tensor_map": lambda v: isinstance(v, (list, tuple))
            and all(_is_int(x) or (isinstance(x, (list, tuple)) and all(_is_int(y) for y in x)) for x in v),
        }[self.type]
        if not ok(value):
            name = self.type_name()
            article = "an" if name[0] in "aeiou" else "a"
            raise ValueError(f"expected {article} {name}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if self.minimum is not None:
            if self.type == "int":
                values = [value]
            elif self.type == "int_list":
                values = list(value)
            else:
                values = []
            for v in values:
                if v < self.minimum:
                    raise ValueError(f"expected values of at least {self.minimum}, got {value!r}")
        if isinstance(value, tuple):
            value = list(value)
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LayoutContext:
    """The facts about the rest of the checkpoint a strategy may use while laying out one parameter.

    `name` is the parameter being laid out, `names` every parameter of the checkpoint (rank 0's
    order), `mirror_prefixes` the optimizer-state prefixes in force, and `layout_of(other)` the
    resolved layout of another parameter under the same plan.
    """

    def __init__(
        self,
        name: str,
        names: Sequence[str],
        layout_of: Callable[[str], Layout],
        mirror_prefixes: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.names = names
        self.layout_of = layout_of
        self.mirror_prefixes = tuple(mirror_prefixes)


class Strategy(ABC):
    """A named rule that lays out a parameter over the ranks. See the module docstring for the contract."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, **values: Any) -> None:
        self.values: Dict[str, Any] = dict(values)

    @classmethod
    def from_options(cls, raw: Mapping[str, Any], *, where: str) -> "Strategy":
        """Check `raw` against the declared options and build the strategy; errors name `where` (the rule)."""
        values: Dict[str, Any] = {}
        for key, value in raw.items():
            if key not in cls.options:
                known = ", ".join(sorted(cls.options)) or "none"
                raise PlanError(f"{where}: unknown option '{key}' for strategy '{cls.name}' (its options: {known})")
            try:
                values[key] = cls.options[key].check(value)
            except ValueError as exc:
                raise PlanError(f"{where}: option '{key}' of strategy '{cls.name}': {exc}") from None
        for key, option in cls.options.items():
            if key not in values:
                if option.required:
                    raise PlanError(f"{where}: strategy '{cls.name}' needs option '{key}' ({option.help})")
                values[key] = option.default
        try:
            return cls(**values)
        except PlanError as exc:
            raise PlanError(f"{where}: {exc.message}") from None

    def summary(self) -> str:
        """Return one line for tables: the name and the options that differ from their defaults."""
        shown = [
            f"{k}={v}"
            for k, v in self.values.items()
            if v is not None and (self.options[k].required or v != self.options[k].default)
        ]
        return f"{self.name}({', '.join(shown)})" if shown else self.name

    @abstractmethod
    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        """Return the layout of a parameter of `full_shape` over `world_size` ranks."""

    @abstractmethod
    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        """Return the full shape of a parameter whose rank r holds a slice of `slice_shapes[r]`."""


def parts_or_world(parts: Optional[int], world_size: int, name: str) -> int:
    """Resolve a `parts` option: default world_size; must divide world_size (the rest are copies)."""
    from ..errors import LayoutError

    n = world_size if parts is None else parts
    if n < 1 or world_size % n:
        raise LayoutError(f"{n} parts do not fit world size {world_size} (it must divide it)", param=name)
    return n


class TensorMapStrategy(Strategy):
    """A strategy that is one MindSpore (dev_matrix, tensor_map) pair: one box per rank.

    Subclasses only say how the device matrix and tensor_map follow from the options, the world
    size and the number of dimensions; laying out and inferring full shapes is shared.
    """

    @abstractmethod
    def device_map(self, ndim: int, world_size: int, name: str) -> Tuple[Sequence[int], Sequence[Any]]:
        """Return (dev_matrix, tensor_map) for a tensor of `ndim` dimensions over `world_size` ranks."""

    def layout(self, full_shape: Shape, world_size: int, ctx: LayoutContext) -> Layout:
        from ..layout import from_tensor_map

        dev_matrix, tensor_map = self.device_map(len(full_shape), world_size, ctx.name)
        return from_tensor_map(full_shape, dev_matrix, tensor_map, name=ctx.name, description=self.summary())

    def full_shape(self, slice_shapes: Sequence[Shape], world_size: int, ctx: LayoutContext) -> Shape:
        from ..errors import LayoutError
        from ..layout import split_counts

        first = tuple(slice_shapes[0])
        for rank, shape in enumerate(slice_shapes):
            if tuple(shape) != first:
                raise LayoutError(
                    f"strategy '{self.name}' gives every rank the same slice shape, but rank 0 holds "
                    f"{list(first)} and rank {rank} holds {list(shape)}",
                    param=ctx.name,
                )
        dev_matrix, tensor_map = self.device_map(len(first), world_size, ctx.name)
        return tuple(n * c for n, c in zip(first, split_counts(tensor_map, dev_matrix)))


def require_ndim(strategy: Strategy, ndim: int, needed: int, name: str) -> None:
    from ..errors import LayoutError

    if ndim < needed:
        raise LayoutError(
            f"strategy '{strategy.name}' splits dim {needed - 1}, but the tensor has {ndim} dimension(s)",
            param=name,
        )
