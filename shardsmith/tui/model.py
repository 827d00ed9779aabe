"""The state behind `shardsmith plan`: parameters, their assignments, layouts and problems.

Kept free of Textual so it can be tested and reused on its own. The user assigns strategies per
parameter, one by one or through a glob. After each change the model lays the affected
parameters out again and keeps each one's error, in place of stopping at the first. Once the
digests of a parameter's slices arrive, it compares the bytes of the ranks that should hold
copies. On save it turns the assignments into a compact plan through `infer.compact_rules`.
"""

from __future__ import annotations

import datetime
import fnmatch
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from .. import __version__
from ..errors import PlanError, ShardsmithError, ValidationError
from ..infer import (
    REPLICATE,
    Assignment,
    Inference,
    RankBytes,
    SliceShapes,
    Want,
    compact_rules,
    glob_escape,
    make_resolver,
    resolve_with,
)
from ..layout import Shape
from ..plan import ParamLayout, Plan, is_scalar
from ..plugins import StrategyRegistry, get_registry
from ..rankset import Source
from ..strategies.mirror import parameter_of


@dataclass
class ParamEntry:
    """One parameter as the checkpoint holds it.

    `shapes` holds one slice shape per rank for a rank set, or the one full shape of a full
    checkpoint; `nbytes` is rank 0's slice (or the full tensor). `parent` is the parameter an
    optimizer state belongs to, `states` the states that belong to this parameter.
    """

    name: str
    dtype: str
    shapes: Tuple[Shape, ...]
    nbytes: int
    scalar: bool
    parent: Optional[str] = None
    states: List[str] = field(default_factory=list)
    problem: Optional[str] = None

    @property
    def shape(self) -> Shape:
        return self.shapes[0]

    @property
    def shapes_agree(self) -> bool:
        return len(set(self.shapes)) == 1


class PlanModel:
    """Assignments and their validation for one checkpoint and world size.

    For a rank set (`source.world_size > 1`) the world size is the number of ranks, and layouts
    are resolved from the slice shapes. For one full checkpoint the caller gives the world size
    to plan a split, and layouts are resolved from the full shapes.
    """

    def __init__(
        self,
        source: Source,
        *,
        world_size: Optional[int] = None,
        plan: Optional[Plan] = None,
        label: str = "",
        registry: Optional[StrategyRegistry] = None,
        reference: Optional[Source] = None,
    ) -> None:
        self.source = source
        self.reference = reference
        self.registry = registry or get_registry()
        self.rank_set = source.world_size > 1
        self.label = label or str(source.paths[0])
        if self.rank_set:
            if world_size is not None and world_size != source.world_size:
                raise PlanError(
                    f"--world-size {world_size} disagrees with the rank set, which has {source.world_size} ranks",
                    path=self.label,
                )
            self.world_size = source.world_size
        else:
            if world_size is None or world_size < 1:
                raise PlanError("a world size of at least 1 is needed to plan a split of a full checkpoint")
            self.world_size = world_size
        if plan is not None and plan.world_size != self.world_size:
            raise PlanError(
                f"the plan is for world size {plan.world_size}, but this checkpoint is planned for {self.world_size}",
                path=plan.path,
                hint="Open a plan made for this rank set, or give --world-size to match it",
            )
        self.mirror_prefixes: Tuple[str, ...] = plan.mirror_prefixes if plan else ()
        self.accepted: Set[str] = set(plan.accepted_errors) if plan else set()
        self.plan_path: Optional[Path] = plan.path if plan else None
        self.globs: List[str] = [rule.match for rule in plan.rules] if plan else []

        self.names: List[str] = list(source.names)
        self.entries: Dict[str, ParamEntry] = {}
        self._load_entries()
        self.order: List[str] = self._display_order()
        self.dtypes = {name: entry.dtype for name, entry in self.entries.items()}

        self.assignments: Dict[str, Assignment] = {}
        if plan is not None:
            for name in self.names:
                if self.entries[name].scalar:
                    continue
                rule = plan.rule_for(name)
                if rule is not None:
                    self.assignments[name] = Assignment.from_rule(rule)

        self.results: Dict[str, ParamLayout] = {}
        self.errors: Dict[str, ShardsmithError] = {}
        self.digests: Dict[str, RankBytes] = {}
        self.byte_problems: Dict[str, Tuple[str, bool]] = {}  # name -> (message, blocking)
        self.inferences: Dict[str, Inference] = {}
        self.pending: Set[str] = set(self.names)
        self._pending_order: Deque[str] = deque(self.names)
        self.dirty = False
        # Bumped on every change, so views can cache what they compute from the model.
        self.version = 0
        self._counts: Tuple[int, Dict[str, int]] = (-1, {})
        self._resolver = None
        self._position = {name: i for i, name in enumerate(self.names)}

        self._hash_lock = threading.Lock()
        self._hash_requests: Deque[str] = deque()
        self._hash_queue: Deque[str] = deque(
            n for n in self.order if self.rank_set and not self.entries[n].scalar and self.entries[n].problem is None
        )
        self.hash_total = len(self._hash_queue)

    # -- loading --------------------------------------------------------------------------------

    def _load_entries(self) -> None:
        source = self.source
        name_set = set(self.names)
        for name in self.names:
            info = source.info(name)
            assert info is not None
            shapes: List[Shape] = []
            problem = None
            missing = source.missing_ranks(name)
            if missing:
                problem = f"missing from rank {', '.join(map(str, missing))}"
                shapes = [tuple(info.shape)]
            else:
                dtypes = set()
                for rank in range(source.world_size):
                    rank_info = source.info(name, rank)
                    shapes.append(tuple(rank_info.shape))
                    dtypes.add(rank_info.dtype)
                if len(dtypes) > 1:
                    problem = f"the ranks hold different dtypes ({', '.join(sorted(dtypes))})"
            scalar = is_scalar(info.dtype, tuple(info.shape))
            parent = None if scalar else parameter_of(name, name_set, self.mirror_prefixes)
            self.entries[name] = ParamEntry(name, info.dtype, tuple(shapes), info.nbytes, scalar, parent, [], problem)
        for name in self.names:
            parent = self.entries[name].parent
            if parent is not None:
                self.entries[parent].states.append(name)

    def _display_order(self) -> List[str]:
        """Rank 0's order, with each optimizer state moved right after its parameter."""
        order = []
        for name in self.names:
            entry = self.entries[name]
            if entry.parent is not None:
                continue
            order.append(name)
            order.extend(entry.states)
        return order

    # -- queries --------------------------------------------------------------------------------

    def visible(self, text: str = "", show_states: bool = True) -> List[str]:
        """Names in display order whose name contains `text` (or matches it, if it is a glob)."""
        names = self.order if show_states else [n for n in self.order if self.entries[n].parent is None]
        text = text.strip()
        if not text:
            return list(names)
        if any(c in text for c in "*?["):
            return [n for n in names if fnmatch.fnmatchcase(n, text)]
        lowered = text.lower()
        return [n for n in names if lowered in n.lower()]

    def matching(self, glob: str) -> List[str]:
        """Non-scalar names the glob matches, in display order (a plan rule never applies to scalars)."""
        return [n for n in self.order if not self.entries[n].scalar and fnmatch.fnmatchcase(n, glob)]

    def default_for(self, name: str) -> Assignment:
        """Return what a parameter gets when no rule matches: mirror of a split parent, else replicate."""
        parent = self.entries[name].parent
        if parent is not None:
            result = self.results.get(parent)
            if result is not None and not result.layout.is_replicated:
                return Assignment.make("mirror", {}, result.replicas)
        return REPLICATE

    def strategy_text(self, name: str) -> Tuple[str, str]:
        """Return (text, kind) for the strategy column; kind is assigned, default, mirror or scalar."""
        entry = self.entries[name]
        if entry.scalar:
            return "replicate (scalar)", "scalar"
        assignment = self.assignments.get(name)
        if assignment is not None:
            return assignment.summary(), "assigned"
        default = self.default_for(name)
        if default.strategy == "mirror":
            return f"mirror of {entry.parent}", "mirror"
        return "replicate", "default"

    def message(self, name: str) -> Optional[Tuple[str, str]]:
        """Return (text, level) of a parameter's problem: level error, accepted or warning."""
        entry = self.entries[name]
        if entry.problem is not None:
            text = ValidationError(entry.problem, param=name).format()
            return text, "accepted" if text in self.accepted else "error"
        error = self.errors.get(name)
        if error is not None:
            text = error.format()
            return text, "accepted" if text in self.accepted else "error"
        byte_problem = self.byte_problems.get(name)
        if byte_problem is not None:
            text, blocking = byte_problem
            if not blocking:
                return text, "warning"
            return text, "accepted" if text in self.accepted else "error"
        return None

    def problems(self, levels: Iterable[str] = ("error",)) -> List[Tuple[str, str]]:
        """Return (name, message) of every problem of the given levels, in display order."""
        wanted = set(levels)
        found = []
        candidates = self._problem_candidates()
        for name in (n for n in self.order if n in candidates):
            message = self.message(name)
            if message is not None and message[1] in wanted:
                found.append((name, message[0]))
        return found

    def counts(self) -> Dict[str, int]:
        """Return how many parameters have a problem of each level (cached until the model changes)."""
        version, counts = self._counts
        if version != self.version:
            counts = {}
            for name in self._problem_candidates():
                message = self.message(name)
                if message is not None:
                    counts[message[1]] = counts.get(message[1], 0) + 1
            self._counts = (self.version, counts)
        return counts

    def _problem_candidates(self) -> Set[str]:
        return set(self.errors) | set(self.byte_problems) | {n for n, e in self.entries.items() if e.problem}

    def full_shape(self, name: str) -> Optional[Shape]:
        result = self.results.get(name)
        return result.full_shape if result is not None else None

    def slice_shapes(self, name: str) -> Optional[Tuple[Shape, ...]]:
        result = self.results.get(name)
        return result.layout.slice_shapes if result is not None else None

    # -- changes --------------------------------------------------------------------------------

    def assign(
        self,
        names: Iterable[str],
        assignment: Optional[Assignment],
        glob: Optional[str] = None,
        *,
        resolve: bool = True,
    ) -> Set[str]:
        """Assign `assignment` to `names` (None resets them to the default); return the names to re-lay out.

        `glob` is the pattern the user selected them with. It is tried first when the plan is
        compacted, so the saved plan keeps the user's own globs where they still fit. With
        `resolve=False` the affected names are only marked pending, for `resolve_pending`.
        """
        changed = set()
        for name in names:
            if self.entries[name].scalar:
                continue
            if assignment is None:
                if self.assignments.pop(name, None) is not None:
                    changed.add(name)
            elif self.assignments.get(name) != assignment:
                self.assignments[name] = assignment
                changed.add(name)
        if glob and glob not in self.globs and any(c in glob for c in "*?["):
            self.globs.insert(0, glob)
        if changed:
            self.dirty = True
            self.version += 1
        affected = self.invalidate(changed)
        if resolve:
            self.resolve_pending()
        return affected

    def _dependents(self, names: Set[str]) -> Set[str]:
        """Names whose layout may change with `names`: themselves and the states that mirror them."""
        affected = set(names)
        frontier = list(names)
        explicit_mirrors: Dict[str, List[str]] = {}
        for state, assignment in self.assignments.items():
            if assignment.strategy == "mirror":
                of = assignment.option_dict().get("of") or self.entries[state].parent
                if of is not None:
                    explicit_mirrors.setdefault(of, []).append(state)
        while frontier:
            name = frontier.pop()
            for dependent in self.entries[name].states + explicit_mirrors.get(name, []):
                if dependent not in affected:
                    affected.add(dependent)
                    frontier.append(dependent)
        return affected

    def invalidate(self, changed: Optional[Set[str]] = None) -> Set[str]:
        """Forget the layouts of `changed` and their dependents (all when None) and mark them pending."""
        affected = set(self.names) if changed is None else self._dependents(changed)
        for name in affected:
            self.results.pop(name, None)
            self.errors.pop(name, None)
            self.byte_problems.pop(name, None)
        self.pending.update(affected)
        self._pending_order = deque(sorted(self.pending, key=self._position.__getitem__))
        self._resolver = None
        self.version += 1
        return affected

    def resolve(self, changed: Optional[Set[str]] = None) -> Set[str]:
        """Lay out `changed` and what depends on them (everything when None); return those names."""
        affected = self.invalidate(changed)
        self.resolve_pending()
        return affected

    def resolve_pending(self, limit: Optional[int] = None) -> List[str]:
        """Lay out up to `limit` pending names (all when None), in rank 0's order; return them."""
        if not self.pending:
            return []
        batch = []
        while self._pending_order and (limit is None or len(batch) < limit):
            name = self._pending_order.popleft()
            if name in self.pending:
                batch.append(name)
        self.pending.difference_update(batch)
        if self._resolver is None:
            # One resolver serves every batch until the assignments change again.
            self._resolver = self._make_resolver(self._rules_by_name(), self.results)
        results, errors = resolve_with(self._resolver, [n for n in batch if self.entries[n].problem is None])
        self.results.update(results)
        self.errors.update(errors)
        if self.reference is not None:
            for name, result in results.items():
                error = self._check_reference(name, result.full_shape)
                if error is not None:
                    self.errors[name] = error
        for name in batch:
            self._check_bytes(name)
        self.version += 1
        return batch

    def reference_shape(self, name: str) -> Optional[Shape]:
        info = self.reference.info(name) if self.reference is not None else None
        return tuple(info.shape) if info is not None else None

    def _check_reference(self, name: str, full_shape: Shape) -> Optional[ShardsmithError]:
        expected = self.reference_shape(name)
        if expected is None or tuple(expected) == tuple(full_shape):
            return None
        return ValidationError(
            f"the layout gives full shape {list(full_shape)}, but the reference checkpoint holds "
            f"{list(expected)}",
            param=name,
        )

    def apply_inferences(self, inferences: Mapping[str, Inference]) -> Tuple[List[str], List[str]]:
        """Assign what was inferred to every parameter the user has not assigned.

        Returns (the names assigned, the names left undecided). States that follow their
        parameter and parameters whose default is already right get no assignment.
        """
        self.inferences.update(inferences)
        groups: Dict[Assignment, List[str]] = {}
        undecided = []
        for name in self.names:
            inference = inferences.get(name)
            if inference is None or self.entries[name].scalar or name in self.assignments:
                continue
            if not inference.decided:
                undecided.append(name)
            elif inference.assignment is not None and inference.assignment != self.default_for(name):
                groups.setdefault(inference.assignment, []).append(name)
        assigned = []
        for assignment, names in groups.items():
            self.assign(names, assignment, resolve=False)
            assigned.extend(names)
        return assigned, undecided

    def _make_resolver(self, rules: Mapping[str, object], known: Mapping[str, ParamLayout]):
        plan = _AssignedPlan(self.world_size, (), self.mirror_prefixes, (), None, rules)
        if self.rank_set:
            shapes = {"slice_shapes": SliceShapes(self.source)}
        else:
            shapes = {"full_shapes": _FullShapes(self.entries)}
        return make_resolver(plan, self.names, self.dtypes, known=known, registry=self.registry, **shapes)

    def trial(self, names: Sequence[str], assignment: Optional[Assignment], limit: int = 200) -> Tuple[int, List[str]]:
        """Lay out the first `limit` of `names` as if `assignment` were applied, changing nothing.

        Returns (how many were tried, the error messages). The assign dialog shows this live.
        """
        tried = [n for n in names if not self.entries[n].scalar][:limit]
        if not tried:
            return 0, []
        rules = self._rules_by_name()
        for name in tried:
            if assignment is None:
                rules.pop(name, None)
            else:
                rules[name] = assignment.rule(glob_escape(name), 0)
        affected = self._dependents(set(tried))
        known = {n: r for n, r in self.results.items() if n not in affected}
        only = [n for n in tried if self.entries[n].problem is None]
        results, errors = resolve_with(self._make_resolver(rules, known), only)
        for name, result in results.items():
            error = self._check_reference(name, result.full_shape)
            if error is not None:
                errors[name] = error
        messages = [errors[n].format() for n in only if n in errors]
        messages += [f"parameter '{n}': {self.entries[n].problem}" for n in tried if self.entries[n].problem is not None]
        return len(tried), messages

    def _rules_by_name(self):
        rules = {}
        numbers: Dict[Assignment, int] = {}
        for name, assignment in self.assignments.items():
            # One rule number per distinct assignment, so the resolver builds each strategy once.
            number = numbers.setdefault(assignment, len(numbers) + 1)
            rules[name] = assignment.rule(glob_escape(name), number)
        return rules

    # -- bytes ----------------------------------------------------------------------------------

    def next_to_hash(self, background: bool = True) -> Optional[str]:
        """Pop the next parameter to hash: a requested one first, then (with `background`) any.

        Called from the hashing thread.
        """
        with self._hash_lock:
            for queue in (self._hash_requests, self._hash_queue) if background else (self._hash_requests,):
                while queue:
                    name = queue.popleft()
                    if name not in self.digests:
                        return name
            return None

    def hash_first(self, name: str) -> bool:
        """Ask for `name` to be hashed before the others; return False if it is hashed or cannot be."""
        entry = self.entries[name]
        if not self.rank_set or entry.scalar or entry.problem is not None or name in self.digests:
            return False
        with self._hash_lock:
            self._hash_requests.append(name)
        return True

    @property
    def hashed(self) -> int:
        return len(self.digests)

    def set_digests(self, name: str, held: RankBytes) -> None:
        self.digests[name] = held
        self._check_bytes(name)
        self.version += 1

    def _check_bytes(self, name: str) -> None:
        """Compare the digests of the ranks that the layout makes copies of each other."""
        self.byte_problems.pop(name, None)
        held = self.digests.get(name)
        result = self.results.get(name)
        if held is None or result is None:
            return
        for group in result.layout.replica_groups():
            differing = [r for r in group if held.digests[r] != held.digests[group[0]]]
            if not differing:
                continue
            what = "replicated" if result.layout.is_replicated else f"laid out by {result.summary}"
            text = ValidationError(
                f"{what}, so ranks {', '.join(map(str, group))} should hold copies, but rank "
                f"{differing[0]} holds different bytes from rank {group[0]}",
                param=name,
            ).format()
            self.byte_problems[name] = (text, result.replicas == "check")
            return

    # -- saving ---------------------------------------------------------------------------------

    def wants(self) -> Dict[str, Optional[Want]]:
        wants: Dict[str, Optional[Want]] = {}
        for name in self.names:
            if self.entries[name].scalar:
                wants[name] = None
                continue
            assignment = self.assignments.get(name)
            if assignment is None:
                wants[name] = Want(None, True)
            else:
                wants[name] = Want(assignment, assignment == self.default_for(name))
        return wants

    def build_plan(self, accept_errors: bool = False) -> Plan:
        """Return the compact plan of the current assignments.

        Raises PlanError while errors stand, unless `accept_errors`: then their messages go
        into the plan's `accepted_errors`, which records that the user saved over them.
        """
        errors = self.problems(("error",))
        if errors and not accept_errors:
            first = errors[0][1]
            raise PlanError(f"{len(errors)} error(s) stand, the first: {first}", hint="Fix them, or save anyway")
        accepted = [message for _, message in self.problems(("error", "accepted"))] if accept_errors else [
            message for _, message in self.problems(("accepted",))
        ]
        rules = compact_rules(self.names, self.wants(), self.globs)
        return Plan(self.world_size, tuple(rules), self.mirror_prefixes, tuple(accepted))

    def header(self, now: Optional[datetime.datetime] = None) -> List[str]:
        now = now or datetime.datetime.now().astimezone()
        if self.rank_set:
            where = f"source: {self.label} (rank set of {self.world_size} ranks)"
        else:
            where = f"source: {self.label} (full checkpoint, split over {self.world_size} ranks)"
        return [f"Written by shardsmith {__version__} plan on {now:%Y-%m-%d %H:%M %Z}".rstrip(), where]


class _FullShapes(Mapping[str, Shape]):
    def __init__(self, entries: Mapping[str, ParamEntry]) -> None:
        self.entries = entries

    def __getitem__(self, name: str) -> Shape:
        return self.entries[name].shape

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class _AssignedPlan(Plan):
    """A plan with one exact-name rule per assigned parameter, looked up by name in O(1)."""

    by_name: Mapping[str, object] = field(default_factory=dict, compare=False)

    def rule_for(self, name: str):
        return self.by_name.get(name)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def shape_text(shape: Optional[Sequence[int]]) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join(map(str, shape)) + "]"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place when complete."""
    import os

    from ..output import temp_path_for

    temp = temp_path_for(path)
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
