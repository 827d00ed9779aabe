"""Small modal dialogs: a question with buttons, and a one-line text prompt."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

DIALOG_CSS = """
{screen} {
    align: center middle;
    background: $background 60%;
}
{screen} > Vertical {
    width: 72;
    max-width: 90%;
    height: auto;
    max-height: 90%;
    border: thick $primary;
    background: $surface;
    padding: 1 2;
}
{screen} .title { text-style: bold; margin-bottom: 1; }
{screen} .buttons { height: auto; align-horizontal: right; margin-top: 1; }
{screen} .buttons Button { margin-left: 1; }
{screen} .error { color: $error; height: auto; }
"""


class ConfirmScreen(ModalScreen[str]):
    """A question with a row of buttons; dismisses with the value of the button pressed.

    Escape dismisses with `cancel_value`.
    """

    DEFAULT_CSS = DIALOG_CSS.replace("{screen}", "ConfirmScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        message: str,
        buttons: Sequence[Tuple[str, str, str]],
        cancel_value: str = "cancel",
    ) -> None:
        """`buttons` are (label, value, variant) with variant one of Textual's button variants."""
        super().__init__()
        self.title_text = title
        self.message = message
        self.buttons = buttons
        self.cancel_value = cancel_value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.message, markup=False)
            with Horizontal(classes="buttons"):
                for label, value, variant in self.buttons:
                    yield Button(label, id=f"button-{value}", variant=variant)

    def on_mount(self) -> None:
        # Focus the primary button: the safe choice, so Enter never saves or discards by accident.
        buttons = list(self.query(Button))
        primary = [b for b in buttons if b.variant == "primary"]
        (primary or buttons)[0].focus()

    @on(Button.Pressed)
    def choose(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "").removeprefix("button-"))

    def action_cancel(self) -> None:
        self.dismiss(self.cancel_value)


class PromptScreen(ModalScreen[Optional[str]]):
    """Ask for one line of text; `check` returns an error message for a value it rejects.

    Dismisses with the text, or None on Cancel or Escape.
    """

    DEFAULT_CSS = DIALOG_CSS.replace("{screen}", "PromptScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        prompt: str,
        value: str = "",
        *,
        placeholder: str = "",
        input_type: str = "text",
        check: Optional[Callable[[str], Optional[str]]] = None,
        ok_label: str = "OK",
    ) -> None:
        super().__init__()
        self.title_text = title
        self.prompt = prompt
        self.value = value
        self.placeholder = placeholder
        self.input_type = input_type
        self.check = check
        self.ok_label = ok_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.prompt, markup=False)
            yield Input(self.value, placeholder=self.placeholder, type=self.input_type, id="prompt-input")
            yield Static("", id="prompt-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button(self.ok_label, id="prompt-ok", variant="primary")
                yield Button("Cancel", id="prompt-cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def _problem(self, text: str) -> Optional[str]:
        return self.check(text) if self.check is not None else None

    @on(Input.Changed)
    def show_problem(self, event: Input.Changed) -> None:
        problem = self._problem(event.value) if event.value else None
        self.query_one("#prompt-error", Static).update(problem or "")

    @on(Input.Submitted)
    @on(Button.Pressed, "#prompt-ok")
    def accept(self) -> None:
        text = self.query_one(Input).value
        problem = self._problem(text)
        if problem:
            self.query_one("#prompt-error", Static).update(problem)
            return
        self.dismiss(text)

    @on(Button.Pressed, "#prompt-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
