"""The dialog that assigns a strategy, with its options, to one parameter or a glob of them.

The strategies are the registered ones, built-in and from plugins. The option fields come from
each strategy's declared `options`, so a plugin's options are offered and type-checked the same
way. Every edit lays the targets out again (without changing the model) and shows what fails.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option as ListOption

from ...errors import PlanError
from ...infer import Assignment, glob_escape
from ...plan import REPLICA_POLICIES
from ...plugins import BUILTIN_SOURCE
from ...strategies.base import Option
from ..model import PlanModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

_MISSING = object()
TRIAL_LIMIT = 200


def parse_option(option: Option, text: str) -> Any:
    """Turn a field's text into an option value; empty means "leave it out" (the default).

    Lists are read as TOML arrays, and the brackets may be left out: `2, 2` is `[2, 2]`.
    Raises ValueError with a message fit for the dialog.
    """
    text = text.strip()
    if not text:
        return _MISSING
    if option.type == "str":
        return text
    if option.type == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if option.type in ("int_list", "tensor_map"):
        literal = text if text.startswith("[") else f"[{text}]"
        try:
            return tomllib.loads(f"value = {literal}")["value"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"expected a {option.type_name()} such as [2, 2], got {text!r}") from None
    raise ValueError(f"options of type {option.type} are not edited as text")


def option_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(option_text(v) if isinstance(v, (list, tuple)) else str(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class AssignRequest:
    """The dialog's result: the parameters, the assignment (None: back to the default), the glob."""

    names: Sequence[str]
    assignment: Optional[Assignment]
    glob: Optional[str]


class AssignScreen(ModalScreen[Optional[AssignRequest]]):
    """Pick a strategy and its options for the target parameters."""

    DEFAULT_CSS = """
    AssignScreen { align: center middle; background: $background 60%; }
    AssignScreen > Vertical {
        width: 110; max-width: 96%; height: 90%; max-height: 40;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    AssignScreen .title { text-style: bold; padding: 0 0 1 0; }
    AssignScreen #match-row { height: 3; }
    AssignScreen #match-row Label { padding: 1 1 0 0; }
    AssignScreen #match { width: 1fr; }
    AssignScreen #match-count { width: 30; padding: 1 0 0 1; color: $text-muted; }
    AssignScreen #body { height: 1fr; }
    AssignScreen #strategies { width: 34; height: 1fr; border: round $primary-darken-2; }
    AssignScreen #options { width: 1fr; height: 1fr; border: round $primary-darken-2; padding: 0 1; }
    AssignScreen #options Label { margin-top: 1; text-style: bold; }
    AssignScreen #options .help { color: $text-muted; }
    AssignScreen #options .field-error { color: $error; height: auto; }
    AssignScreen #options Input { width: 1fr; }
    AssignScreen #description { height: auto; max-height: 4; padding: 0 1; color: $text-muted; }
    AssignScreen #check { height: auto; max-height: 6; padding: 0 1; }
    AssignScreen #buttons { height: 3; align-horizontal: right; }
    AssignScreen #buttons Button { margin-left: 1; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+enter,ctrl+s", "apply", "Apply"),
    ]

    def __init__(
        self,
        model: PlanModel,
        *,
        names: Sequence[str] = (),
        glob: Optional[str] = None,
        current: Optional[str] = None,
    ) -> None:
        """Target `glob` if given, else the marked `names`, else the parameter `current`."""
        super().__init__()
        self.model = model
        self.registry = model.registry
        self.marked = list(names)
        self.glob = glob
        self.current = current
        self.strategy_names = self.registry.names()
        self.targets: List[str] = []
        self.assignment: Optional[Assignment] = None
        self._shown_strategy: Optional[str] = None

    # -- layout ---------------------------------------------------------------------------------

    def _initial_match(self) -> str:
        if self.glob:
            return self.glob
        if self.marked:
            return ""
        return glob_escape(self.current) if self.current else ""

    def _initial_assignment(self) -> Optional[Assignment]:
        if self.glob:
            names = self.model.matching(self.glob)
        elif self.marked:
            names = self.marked
        else:
            names = [self.current] if self.current else []
        found = {self.model.assignments.get(n) for n in names}
        return found.pop() if len(found) == 1 else None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Assign a strategy", classes="title")
            with Horizontal(id="match-row"):
                yield Label("Match")
                placeholder = (
                    f"{len(self.marked)} marked parameters (or type a glob)" if self.marked else "a name or a glob"
                )
                yield Input(self._initial_match(), placeholder=placeholder, id="match")
                yield Static("", id="match-count")
            with Horizontal(id="body"):
                options = []
                for name in self.strategy_names:
                    source = self.registry.source(name)
                    prompt = Text(name, style="bold")
                    if source != BUILTIN_SOURCE:
                        prompt.append(f"  {source}", style="dim italic")
                    options.append(ListOption(prompt, id=name))
                yield OptionList(*options, id="strategies")
                yield VerticalScroll(id="options")
            yield Static("", id="description")
            yield Static("", id="check")
            with Horizontal(id="buttons"):
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Reset to default", id="reset")
                yield Button("Cancel", id="cancel")

    async def on_mount(self) -> None:
        initial = self._initial_assignment()
        strategies = self.query_one("#strategies", OptionList)
        start = initial.strategy if initial is not None and initial.strategy in self.strategy_names else "row"
        if start not in self.strategy_names:
            start = self.strategy_names[0]
        strategies.highlighted = self.strategy_names.index(start)
        await self._show_options(start, initial)
        self._update_targets()
        strategies.focus()

    async def _show_options(self, strategy: str, initial: Optional[Assignment] = None) -> None:
        """Rebuild the option fields for `strategy`, prefilled from `initial` if it is that strategy."""
        self._shown_strategy = strategy
        cls = self.registry.get(strategy)
        values: Dict[str, Any] = initial.option_dict() if initial is not None and initial.strategy == strategy else {}
        replicas = initial.replicas if initial is not None else "check"
        box = self.query_one("#options", VerticalScroll)
        await box.remove_children()

        widgets = []
        for key, option in cls.options.items():
            if option.required:
                what = f"{option.type_name()}, required"
            elif option.default is None:
                what = f"{option.type_name()}, optional"
            else:
                what = f"{option.type_name()}, default {option_text(option.default)}"
            widgets.append(Label(f"{key}  ({what})"))
            value = values.get(key)
            if option.type == "bool":
                default = bool(option.default) if option.default not in (None,) and not option.required else False
                widgets.append(Checkbox(key, value=bool(value) if value is not None else default, id=f"option-{key}"))
            elif option.choices is not None:
                choices = [(option_text(c), c) for c in option.choices]
                widgets.append(
                    Select(choices, value=value if value in option.choices else Select.BLANK, id=f"option-{key}")
                )
            else:
                placeholder = "" if option.required or option.default is None else option_text(option.default)
                if key == "parts" and option.default is None:
                    placeholder = f"{self.model.world_size} (the world size)"
                widgets.append(Input(option_text(value), placeholder=placeholder, id=f"option-{key}"))
            widgets.append(Static(option.help, classes="help", markup=False))
            widgets.append(Static("", id=f"error-{key}", classes="field-error"))
        if not cls.options:
            widgets.append(Static("This strategy has no options.", classes="help"))

        widgets.append(Label("replicas"))
        widgets.append(
            Select([(p, p) for p in REPLICA_POLICIES], value=replicas, allow_blank=False, id="replicas")
        )
        widgets.append(
            Static(
                'How merge treats copies that should be equal: "check" fails if any differs, '
                '"first" takes the lowest rank\'s and warns.',
                classes="help",
            )
        )

        await box.mount_all(widgets)
        self.query_one("#description", Static).update(cls.description)
        self._validate()

    # -- reading the fields ---------------------------------------------------------------------

    def _read_assignment(self) -> Tuple[Optional[Assignment], str]:
        """Build the assignment from the fields, showing each field's error next to it.

        Returns (the assignment, "") or (None, what is wrong with the options as a whole).
        """
        strategy = self._shown_strategy
        if strategy is None:
            return None, "no strategy is selected"
        cls = self.registry.get(strategy)
        raw: Dict[str, Any] = {}
        valid = True
        for key, option in cls.options.items():
            error = self.query_one(f"#error-{key}", Static)
            error.update("")
            widget = self.query_one(f"#option-{key}")
            try:
                if isinstance(widget, Checkbox):
                    value: Any = widget.value
                elif isinstance(widget, Select):
                    value = _MISSING if widget.value is Select.BLANK else widget.value
                else:
                    value = parse_option(option, widget.value)
                # A value equal to the declared default is left out, so the plan stays short.
                if value is not _MISSING and (option.required or value != option.default):
                    raw[key] = value
            except ValueError as exc:
                error.update(str(exc))
                valid = False
        if not valid:
            return None, "fix the options above"
        try:
            cls.from_options(raw, where=f"strategy '{strategy}'")
        except PlanError as exc:
            return None, exc.message
        replicas = self.query_one("#replicas", Select).value
        return Assignment.make(strategy, raw, replicas if isinstance(replicas, str) else "check"), ""

    def _update_targets(self) -> None:
        text = self.query_one("#match", Input).value.strip()
        if not text:
            self.targets = [n for n in self.marked if not self.model.entries[n].scalar]
        else:
            self.targets = self.model.matching(text)
        count = len(self.targets)
        label = "no parameter matches" if count == 0 else f"{count} parameter{'s' if count != 1 else ''}"
        self.query_one("#match-count", Static).update(label)
        self._validate()

    def _validate(self) -> None:
        check = self.query_one("#check", Static)
        apply = self.query_one("#apply", Button)
        self.assignment, problem = self._read_assignment()
        if self.assignment is None:
            apply.disabled = True
            check.update(Text(f"✗ {problem}", style="red"))
            return
        if not self.targets:
            apply.disabled = True
            check.update(Text("Nothing to assign: the match selects no parameter.", style="yellow"))
            return
        apply.disabled = False

        tried, errors = self.model.trial(self.targets, self.assignment, TRIAL_LIMIT)
        if tried < len(self.targets):
            scope = f"the first {tried} of {len(self.targets)} parameters"
        elif tried == 1:
            scope = "the parameter"
        else:
            scope = f"all {tried} parameters"

        if not errors:
            check.update(Text(f"✓ {self.assignment.summary()} lays out {scope}.", style="green"))
            return
        failing = "it fails" if tried == 1 else f"{len(errors)} of {scope.removeprefix('all ')} fail"
        text = Text(f"✗ {failing}; Apply assigns it anyway, and the table shows the error:\n", style="red")
        for message in errors[:3]:
            text.append(f"  {message}\n", style="red")
        if len(errors) > 3:
            text.append(f"  … and {len(errors) - 3} more\n", style="red")
        check.update(text)

    # -- events ---------------------------------------------------------------------------------

    @on(OptionList.OptionHighlighted, "#strategies")
    async def strategy_changed(self, event: OptionList.OptionHighlighted) -> None:
        name = event.option.id
        if name is not None and name != self._shown_strategy:
            await self._show_options(name, self._initial_assignment())

    @on(Input.Changed, "#match")
    def match_changed(self) -> None:
        self._update_targets()

    @on(Input.Changed)
    @on(Checkbox.Changed)
    @on(Select.Changed)
    def field_changed(self, event) -> None:
        if getattr(event, "input", None) is not None and event.input.id == "match":
            return
        self._validate()

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.action_apply()

    @on(Button.Pressed, "#apply")
    def action_apply(self) -> None:
        if self.assignment is None or not self.targets:
            return
        self.dismiss(AssignRequest(tuple(self.targets), self.assignment, self._glob()))

    @on(Button.Pressed, "#reset")
    def reset(self) -> None:
        if self.targets:
            self.dismiss(AssignRequest(tuple(self.targets), None, self._glob()))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    def _glob(self) -> Optional[str]:
        text = self.query_one("#match", Input).value.strip()
        return text or None
