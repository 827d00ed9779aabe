"""The help screen: what the plan editor shows and which keys do what."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# shardsmith plan

Assign a layout strategy to every parameter of a checkpoint, check it against the ranks, and
save the plan that `shardsmith merge`, `split` and `reshard` read.

Each row is a parameter; optimizer states (`moments.w`, `adam_m.w`, …) sit under their
parameter and follow its layout unless you assign them one of their own. Scalars are always
replicated. The first column shows the check: **✓** laid out and bytes checked, **·** laid out,
bytes not hashed yet, **✗** an error, **!** an accepted error or a warning.

| key | does |
| --- | --- |
| ↑ ↓ PgUp PgDn Home End | move (or click a row) |
| `/` | filter by name: a substring, or a glob such as `layers.*.wq.*` |
| `space` | mark or unmark the row |
| `g` | mark every parameter a glob matches |
| `Esc` | clear the marks and the filter |
| `Enter`, `a`, double-click | assign a strategy to the marked rows, or to the current one |
| `d` | reset the marked rows (or the current one) to the default |
| `e` | jump to the next error |
| `h` | hash the current parameter's slices now (hashing runs in the background anyway) |
| `s` | show or hide optimizer states |
| `Ctrl+S` | save the plan |
| `q` | quit (asks if there are unsaved changes) |
| `?`, `F1` | this help |

**Checks.** After every change each parameter is laid out again: a dimension that does not
divide, a grid that does not fit the world size, or slices whose shapes differ across ranks are
errors on that row. Once a parameter's slices are hashed, ranks that the layout says hold
copies must hold equal bytes. A plan is not saved while an error stands unless you choose
*Save anyway*; it then lists those errors under `accepted_errors`.

**Saving.** The plan is written compact: parameters that share a strategy get one rule with a
glob where a glob matches exactly them, and states that follow their parameter get no rule.
"""


class HelpScreen(ModalScreen[None]):
    """Keys and a short guide; any of Escape, q, ? or F1 closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: $background 60%; }
    HelpScreen > VerticalScroll {
        width: 96; max-width: 95%; height: 90%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [
        Binding("escape,q,question_mark,f1", "close", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
