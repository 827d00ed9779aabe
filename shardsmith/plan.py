"""The plan file: which strategy lays out each parameter, for one world size.

A `Plan` is plain data read from TOML; `resolve_full` and `resolve_slices` bind it to the
parameters of a checkpoint (by full shapes or by the shapes the ranks hold) and return one
`ParamLayout` per parameter. Files, msrun jobs and the TUI all consume those, so deciding which
bytes go where is kept apart from reading and writing them.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import LayoutError, PlanError, ShardsmithError, ValidationError
from .layout import Layout, Shape
from .plugins import StrategyRegistry, get_registry
from .strategies.base import LayoutContext, Strategy
from .strategies.mirror import parameter_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

REPLICA_POLICIES = ("check", "first")

# Layouts hold one entry per rank, so the world size bounds their memory. 2**20 ranks is far
# beyond the 4096 devices MindSpore 2.10 documents for `device_num` and still lays out in
# seconds, while a mistyped 10**12 would exhaust memory.
MAX_WORLD_SIZE = 2**20
_RULE_KEYS = ("match", "strategy", "replicas")
_TOP_KEYS = ("world_size", "param", "mirror", "accepted_errors")


@dataclass(frozen=True)
class Rule:
    """One `[[param]]` table: a glob, a strategy name and that strategy's options."""

    match: str
    strategy: str
    options: Tuple[Tuple[str, Any], ...] = ()
    replicas: str = "check"
    index: int = 0  # 1-based position in the file, for messages

    def describe(self) -> str:
        return f"rule {self.index} (match = '{self.match}')"

    def matches(self, name: str) -> bool:
        # fnmatchcase: a plan must mean the same on every OS, and MindSpore names are case-sensitive.
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class Plan:
    world_size: int
    rules: Tuple[Rule, ...] = ()
    mirror_prefixes: Tuple[str, ...] = ()
    accepted_errors: Tuple[str, ...] = ()
    path: Optional[Path] = field(default=None, compare=False)

    def rule_for(self, name: str) -> Optional[Rule]:
        for rule in self.rules:
            if rule.matches(name):
                return rule
        return None

    def with_world_size(self, world_size: int) -> "Plan":
        return Plan(world_size, self.rules, self.mirror_prefixes, self.accepted_errors, self.path)


def load_plan(path: Any, registry: Optional[StrategyRegistry] = None) -> Plan:
    """Read and validate a plan file; every error names the file, the rule and the field.

    A MindSpore strategy file (protobuf `ParallelStrategyMap`, or its JSON form) is accepted too and
    read as a plan of exact-name `tensor_map` rules.
    """
    from .strategy_file import import_strategy_file, is_strategy_file

    path = Path(path)
    if path.exists() and not path.is_file():
        # Reading a FIFO would block until something writes to it.
        raise PlanError("the plan is not a regular file", path=path)
    if path.is_file() and is_strategy_file(path):
        return import_strategy_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError("plan file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read the plan file: {exc}", path=path) from None
    return loads_plan(text, path=path, registry=registry)


def loads_plan(text: str, *, path: Optional[Path] = None, registry: Optional[StrategyRegistry] = None) -> Plan:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"invalid TOML: {exc}", path=path) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise PlanError("invalid TOML: arrays or tables nested too deeply", path=path) from None
    return plan_from_dict(data, path=path, registry=registry)


def plan_from_dict(data: Mapping[str, Any], *, path: Optional[Path] = None, registry: Optional[StrategyRegistry] = None) -> Plan:
    registry = registry or get_registry()

    def fail(message: str) -> PlanError:
        return PlanError(message, path=path)

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(f"unknown top-level key '{key}' (expected: {', '.join(_TOP_KEYS)})")
    world_size = data.get("world_size")
    if world_size is None:
        raise fail("missing 'world_size'")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise fail(f"'world_size' must be a positive integer, got {world_size!r}")
    if world_size > MAX_WORLD_SIZE:
        raise fail(f"'world_size' {world_size} is larger than {MAX_WORLD_SIZE}, the most shardsmith lays out")

    raw_rules = data.get("param", [])
    if not isinstance(raw_rules, list):
        raise fail("'param' must be an array of tables: write each rule as [[param]]")
    rules = []
    for index, raw in enumerate(raw_rules, start=1):
        if not isinstance(raw, dict):
            raise fail(f"rule {index}: expected a table, got {raw!r}")
        match = raw.get("match")
        where = f"rule {index}" + (f" (match = '{match}')" if isinstance(match, str) else "")
        if match is None:
            raise fail(f"{where}: missing field 'match' (a glob on the parameter name)")
        if not isinstance(match, str) or not match:
            raise fail(f"{where}: field 'match' must be a non-empty string glob, got {match!r}")
        strategy_name = raw.get("strategy")
        if strategy_name is None:
            raise fail(f"{where}: missing field 'strategy' (installed: {', '.join(registry.names())})")
        if not isinstance(strategy_name, str):
            raise fail(f"{where}: field 'strategy' must be a strategy name, got {strategy_name!r}")
        replicas = raw.get("replicas", "check")
        if replicas not in REPLICA_POLICIES:
            raise fail(f"{where}: field 'replicas' must be \"check\" or \"first\", got {replicas!r}")
        try:
            cls = registry.get(strategy_name)
        except ShardsmithError as exc:
            raise fail(f"{where}: {exc.format()}") from None
        options = {k: v for k, v in raw.items() if k not in _RULE_KEYS}
        try:
            cls.from_options(options, where=where)
        except PlanError as exc:
            raise fail(exc.message) from None
        rules.append(Rule(match, strategy_name, tuple(options.items()), replicas, index))

    mirror = data.get("mirror", {})
    if not isinstance(mirror, dict):
        raise fail("'mirror' must be a table with 'prefixes = [...]'")
    for key in mirror:
        if key != "prefixes":
            raise fail(f"[mirror]: unknown field '{key}' (expected: prefixes)")
    prefixes = mirror.get("prefixes", [])
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p for p in prefixes):
        raise fail(f"[mirror]: field 'prefixes' must be a list of non-empty strings, got {prefixes!r}")
    accepted = data.get("accepted_errors", [])
    if not isinstance(accepted, list) or not all(isinstance(p, str) for p in accepted):
        raise fail("'accepted_errors' must be a list of strings")
    return Plan(world_size, tuple(rules), tuple(prefixes), tuple(accepted), path)


def _toml_value(value: Any) -> str:
    """Format an option value as inline TOML: plans are read by people, so arrays stay on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} in a plan")


def dumps_plan(plan: Plan, header: Sequence[str] = ()) -> str:
    """Write a plan as TOML, with `header` lines as a leading comment."""
    lines = [f"# {line}".rstrip() for line in header]
    if lines:
        lines.append("")
    lines.append(f"world_size = {plan.world_size}")
    if plan.accepted_errors:
        lines.append(f"accepted_errors = {_toml_value(list(plan.accepted_errors))}")
    for rule in plan.rules:
        lines += ["", "[[param]]", f"match = {_toml_value(rule.match)}", f"strategy = {_toml_value(rule.strategy)}"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in rule.options if value is not None]
        if rule.replicas != "check":
            lines.append(f"replicas = {_toml_value(rule.replicas)}")
    if plan.mirror_prefixes:
        lines += ["", "[mirror]", f"prefixes = {_toml_value(list(plan.mirror_prefixes))}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ParamLayout:
    """A parameter bound to its strategy and layout under a plan."""

    name: str
    dtype: str
    strategy: str  # the strategy's name
    summary: str  # the strategy with its options, for tables
    origin: str  # why this strategy: a rule, a mirrored parameter, the default, a scalar
    replicas: str
    layout: Layout

    @property
    def full_shape(self) -> Shape:
        return self.layout.full_shape


def is_scalar(dtype: str, shape: Shape) -> bool:
    """0-d tensors and str entries are always replicated; plan rules never apply to them."""
    return dtype == "str" or len(shape) == 0


class Resolver:
    """Resolves parameters lazily, so a state can ask for its parameter's layout in any order.

    `get(name)` returns one parameter's `ParamLayout`; `done` holds what was resolved, and may be
    seeded with layouts known to hold. Use `FullResolver` or `SliceResolver`.
    """

    def __init__(self, plan: Plan, names: Sequence[str], dtypes: Mapping[str, str], registry: StrategyRegistry):
        self.plan = plan
        self.names = list(names)
        self.name_set = set(names)
        self.dtypes = dtypes
        self.registry = registry
        self.done: Dict[str, ParamLayout] = {}
        self.active: List[str] = []
        self._strategies: Dict[int, Strategy] = {}

    def strategy_for_rule(self, rule: Rule) -> Strategy:
        if rule.index not in self._strategies:
            cls = self.registry.get(rule.strategy)
            self._strategies[rule.index] = cls.from_options(dict(rule.options), where=rule.describe())
        return self._strategies[rule.index]

    def choose(self, name: str, shape_hint: Shape) -> Tuple[Strategy, str, str]:
        """Return (strategy, origin, replicas policy) for a parameter."""
        dtype = self.dtypes[name]
        if is_scalar(dtype, shape_hint):
            return self.registry.get("replicate")(), "scalar", "check"
        rule = self.plan.rule_for(name)
        if rule is not None:
            return self.strategy_for_rule(rule), rule.describe(), rule.replicas
        parent = parameter_of(name, self.name_set, self.plan.mirror_prefixes)
        if parent is not None and not self.get(parent).layout.is_replicated:
            return self.registry.get("mirror")(of=parent), f"mirror of '{parent}'", self.done[parent].replicas
        return self.registry.get("replicate")(), "default", "check"

    def context(self, name: str) -> LayoutContext:
        return LayoutContext(name, self.names, lambda other: self.get(other).layout, self.plan.mirror_prefixes)

    def get(self, name: str) -> ParamLayout:
        if name in self.done:
            return self.done[name]
        if name not in self.name_set:
            raise LayoutError(f"parameter '{name}' is not in the checkpoint")
        if name in self.active:
            cycle = " -> ".join(self.active[self.active.index(name) :] + [name])
            raise PlanError(f"the plan lays out these parameters in a cycle: {cycle}", param=name)
        self.active.append(name)
        try:
            result = self.compute(name)
        finally:
            self.active.pop()
        self.done[name] = result
        return result

    def compute(self, name: str) -> ParamLayout:
        raise NotImplementedError


class FullResolver(Resolver):
    def __init__(self, plan, names, dtypes, shapes: Mapping[str, Shape], registry):
        super().__init__(plan, names, dtypes, registry)
        self.shapes = shapes

    def compute(self, name: str) -> ParamLayout:
        shape = tuple(self.shapes[name])
        strategy, origin, replicas = self.choose(name, shape)
        layout = strategy.layout(shape, self.plan.world_size, self.context(name))
        _check_layout(layout, name, self.plan.world_size)
        return ParamLayout(name, self.dtypes[name], strategy.name, strategy.summary(), origin, replicas, layout)


class SliceResolver(Resolver):
    def __init__(self, plan, names, dtypes, slice_shapes: Mapping[str, Sequence[Shape]], registry):
        super().__init__(plan, names, dtypes, registry)
        self.slice_shapes = slice_shapes

    def compute(self, name: str) -> ParamLayout:
        shapes = [tuple(s) for s in self.slice_shapes[name]]
        strategy, origin, replicas = self.choose(name, shapes[0])
        ctx = self.context(name)
        full = strategy.full_shape(shapes, self.plan.world_size, ctx)
        layout = strategy.layout(tuple(full), self.plan.world_size, ctx)
        _check_layout(layout, name, self.plan.world_size)
        for rank, (held, expected) in enumerate(zip(shapes, layout.slice_shapes)):
            if tuple(held) != tuple(expected):
                raise ValidationError(
                    f"rank {rank} holds a slice of shape {list(held)}, but {strategy.summary()} on full shape "
                    f"{list(full)} gives rank {rank} a slice of {list(expected)}",
                    param=name,
                )
        return ParamLayout(name, self.dtypes[name], strategy.name, strategy.summary(), origin, replicas, layout)


def _check_layout(layout: Layout, name: str, world_size: int) -> None:
    if layout.world_size != world_size:
        raise LayoutError(f"the strategy laid it out over {layout.world_size} ranks, the plan has {world_size}", param=name)
    layout.check_coverage(name)


def resolve_full(
    plan: Plan,
    names: Sequence[str],
    dtypes: Mapping[str, str],
    shapes: Mapping[str, Shape],
    *,
    only: Optional[Callable[[str], bool]] = None,
    registry: Optional[StrategyRegistry] = None,
) -> Dict[str, ParamLayout]:
    """Lay out every parameter of a full checkpoint (`only` limits which are returned)."""
    resolver = FullResolver(plan, names, dtypes, shapes, registry or get_registry())
    return {n: resolver.get(n) for n in names if only is None or only(n)}


def resolve_slices(
    plan: Plan,
    names: Sequence[str],
    dtypes: Mapping[str, str],
    slice_shapes: Mapping[str, Sequence[Shape]],
    *,
    only: Optional[Callable[[str], bool]] = None,
    registry: Optional[StrategyRegistry] = None,
) -> Dict[str, ParamLayout]:
    """Lay out every parameter of a rank set from the slice shape each rank holds."""
    resolver = SliceResolver(plan, names, dtypes, slice_shapes, registry or get_registry())
    return {n: resolver.get(n) for n in names if only is None or only(n)}
