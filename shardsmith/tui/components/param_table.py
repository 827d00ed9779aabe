"""The table of parameters: one line per parameter, optimizer states indented under theirs.

Drawn line by line (Textual's line API) from the model, so only the visible rows are ever
rendered and a checkpoint of 10,000 parameters scrolls as fast as one of ten. The first line is
a header that stays in place while the rows scroll under it.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..model import PlanModel, human_bytes, shape_text

STATUS_GLYPHS = {"error": "✗", "accepted": "!", "warning": "!", "pending": "…", "ok": "✓", "unchecked": "·", "scalar": " "}


def middle_ellipsis(text: str, width: int) -> str:
    """Shorten text to `width` by cutting its middle, where parameter names vary least."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + text[len(text) - tail :]


class ParamTable(ScrollView, can_focus=True):
    """The parameters of a `PlanModel`, filtered, with a cursor and marks for multi-selection."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("space", "toggle_mark", "Mark"),
    ]

    COMPONENT_CLASSES = {
        "param-table--header",
        "param-table--cursor",
        "param-table--marked",
        "param-table--error",
        "param-table--warning",
        "param-table--ok",
        "param-table--dim",
        "param-table--assigned",
        "param-table--mirror",
    }

    DEFAULT_CSS = """
    ParamTable {
        background: $surface;
        scrollbar-gutter: stable;
        overflow-x: hidden;
    }
    ParamTable > .param-table--header { text-style: bold; background: $panel; color: $text; }
    ParamTable > .param-table--cursor { background: $accent 40%; }
    ParamTable:focus > .param-table--cursor { background: $accent; color: $text; }
    ParamTable > .param-table--marked { background: $secondary 30%; }
    ParamTable > .param-table--error { color: $error; }
    ParamTable > .param-table--warning { color: $warning; }
    ParamTable > .param-table--ok { color: $success; }
    ParamTable > .param-table--dim { color: $text-muted; }
    ParamTable > .param-table--assigned { color: $text; text-style: bold; }
    ParamTable > .param-table--mirror { color: $text-muted; text-style: italic; }
    """

    class Highlighted(Message):
        """The cursor moved to another parameter (or to none, when the filter hides them all)."""

        def __init__(self, name: Optional[str]) -> None:
            super().__init__()
            self.name = name

    class Activated(Message):
        """A parameter was double-clicked."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    def __init__(self, model: PlanModel, *, id: Optional[str] = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.rows: List[str] = list(model.order)
        self.row_of: Dict[str, int] = {n: i for i, n in enumerate(self.rows)}
        self.cursor = 0
        self.marked: Set[str] = set()
        self.widths: Dict[str, int] = {}
        self._header = self._header_labels()

    # -- data -----------------------------------------------------------------------------------

    def _header_labels(self) -> Dict[str, str]:
        if self.model.rank_set:
            return {"shape": "slice", "result": "full shape"}
        return {"shape": "shape", "result": "slice"}

    def set_rows(self, names: Sequence[str]) -> None:
        """Show `names` (a filter's result), keeping the cursor on the same parameter if it is shown."""
        current = self.current
        self.rows = list(names)
        self.row_of = {n: i for i, n in enumerate(self.rows)}
        self.cursor = self.row_of.get(current, 0) if current is not None else 0
        self.cursor = min(self.cursor, max(len(self.rows) - 1, 0))
        self._update_size()
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(self.Highlighted(self.current))

    @property
    def current(self) -> Optional[str]:
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    def move_to(self, name: str) -> bool:
        """Put the cursor on `name` if it is shown; return whether it is."""
        row = self.row_of.get(name)
        if row is None:
            return False
        self._set_cursor(row)
        return True

    def refresh_names(self, names: Iterable[str]) -> None:
        """Redraw the rows of `names` if they are on screen."""
        top = int(self.scroll_offset.y)
        height = self.scrollable_content_region.height
        for name in names:
            row = self.row_of.get(name)
            if row is not None and top <= row < top + height:
                self.refresh_line(row - top + 1)

    # -- geometry -------------------------------------------------------------------------------

    def on_resize(self, event: events.Resize) -> None:
        self._update_size()

    def _update_size(self) -> None:
        width = max(self.scrollable_content_region.width, 40)
        self.widths = self._column_widths(width)
        self.virtual_size = Size(width, len(self.rows) + 1)

    def _column_widths(self, width: int) -> Dict[str, int]:
        """Fit the columns to `width`: names get room first, the strategy column gives way."""
        sample = self.rows[:2000]  # widths from the first rows keep a resize cheap on huge tables
        indent = 4
        name_w = max([len(n) + (indent if self.model.entries[n].parent else 0) for n in sample] + [9])
        shape_w = max([len(self._shape_cell(n)) for n in sample] + [len(self._header["shape"])])
        result_w = max([len(self._result_cell(n)) for n in sample] + [len(self._header["result"])])
        strategy_w = max([len(self._strategy_cell(n)[0]) for n in sample] + [8])
        widths = {
            "mark": 2,
            "dtype": 8,
            "shape": min(shape_w, 20),
            "bytes": 9,
            "result": min(result_w, 18),
        }
        gaps = 6
        rest = width - sum(widths.values()) - gaps
        widths["strategy"] = max(min(strategy_w, 30, rest - min(name_w, 60)), 12)
        widths["name"] = max(rest - widths["strategy"], 12)
        return widths

    def _strategy_cell(self, name: str) -> Tuple[str, str]:
        text, kind = self.model.strategy_text(name)
        # A state sits right under its parameter, so "mirror" is enough in the table.
        return ("mirror" if kind == "mirror" else text), kind

    # -- cells ----------------------------------------------------------------------------------

    def _shape_cell(self, name: str) -> str:
        entry = self.model.entries[name]
        text = shape_text(entry.shape)
        if not entry.shapes_agree:
            text += " (varies)"
        return text

    def _result_cell(self, name: str) -> str:
        model = self.model
        if model.rank_set:
            return shape_text(model.full_shape(name)) if name in model.results else ""
        shapes = model.slice_shapes(name)
        if shapes is None:
            return ""
        return shape_text(shapes[0]) + ("" if len(set(shapes)) == 1 else " (varies)")

    def status(self, name: str) -> str:
        model = self.model
        entry = model.entries[name]
        message = model.message(name)
        if message is not None:
            return message[1]
        if name in model.pending:
            return "pending"
        if entry.scalar:
            return "scalar"
        if model.rank_set and name not in model.digests:
            return "unchecked"
        return "ok"

    def _row_segments(self, name: str, style: Style) -> List[Segment]:
        model = self.model
        entry = model.entries[name]
        w = self.widths
        status = self.status(name)
        strategy, kind = self._strategy_cell(name)

        def component(key: str) -> Style:
            return self.get_component_rich_style(key, partial=True)

        status_style = {
            "error": component("param-table--error"),
            "accepted": component("param-table--warning"),
            "warning": component("param-table--warning"),
            "ok": component("param-table--ok"),
        }.get(status, component("param-table--dim"))
        strategy_style = {
            "assigned": component("param-table--assigned"),
            "mirror": component("param-table--mirror"),
        }.get(kind, component("param-table--dim"))
        mark = "●" if name in self.marked else " "
        indent = "  └ " if entry.parent is not None else ""
        cells = [
            (mark + STATUS_GLYPHS[status], w["mark"], status_style, "left"),
            (indent + middle_ellipsis(name, w["name"] - len(indent)), w["name"], Style(), "left"),
            (entry.dtype, w["dtype"], component("param-table--dim"), "left"),
            (self._shape_cell(name), w["shape"], Style(), "left"),
            (human_bytes(entry.nbytes), w["bytes"], component("param-table--dim"), "right"),
            (strategy, w["strategy"], strategy_style, "left"),
            (self._result_cell(name), w["result"], Style(), "left"),
        ]
        if status == "error":
            cells[1] = (cells[1][0], cells[1][1], component("param-table--error"), "left")
        return self._cells(cells, style)

    @staticmethod
    def _cells(cells: Sequence[Tuple[str, int, Style, str]], base: Style) -> List[Segment]:
        segments = []
        for i, (text, width, style, align) in enumerate(cells):
            text = middle_ellipsis(text, width)
            text = text.rjust(width) if align == "right" else text.ljust(width)
            if i:
                segments.append(Segment(" ", base))
            segments.append(Segment(text, base + style))
        return segments

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if not self.widths:
            self._update_size()
        if y == 0:
            header = self.get_component_rich_style("param-table--header")
            labels = [
                ("", self.widths["mark"], Style(), "left"),
                ("parameter", self.widths["name"], Style(), "left"),
                ("dtype", self.widths["dtype"], Style(), "left"),
                (self._header["shape"], self.widths["shape"], Style(), "left"),
                ("bytes", self.widths["bytes"], Style(), "right"),
                ("strategy", self.widths["strategy"], Style(), "left"),
                (self._header["result"], self.widths["result"], Style(), "left"),
            ]
            return Strip(self._cells(labels, header)).adjust_cell_length(width, header)
        row = int(self.scroll_offset.y) + y - 1
        base = self.rich_style
        if row >= len(self.rows):
            return Strip.blank(width, base)
        name = self.rows[row]
        if row == self.cursor:
            base = base + self.get_component_rich_style("param-table--cursor")
        elif name in self.marked:
            base = base + self.get_component_rich_style("param-table--marked")
        return Strip(self._row_segments(name, base)).adjust_cell_length(width, base)

    # -- cursor and marks -----------------------------------------------------------------------

    def _visible_rows(self) -> int:
        return max(self.scrollable_content_region.height - 1, 1)

    def _scroll_to_cursor(self) -> None:
        top = int(self.scroll_offset.y)
        height = self._visible_rows()
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False)

    def _set_cursor(self, row: int) -> None:
        if not self.rows:
            return
        row = max(0, min(row, len(self.rows) - 1))
        old = self.cursor
        self.cursor = row
        self._scroll_to_cursor()
        top = int(self.scroll_offset.y)
        for r in (old, row):
            self.refresh_line(r - top + 1)
        if old != row:
            self.post_message(self.Highlighted(self.current))

    def action_cursor(self, delta: int) -> None:
        self._set_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._set_cursor(self.cursor + direction * self._visible_rows())

    def action_jump(self, row: int) -> None:
        self._set_cursor(row if row >= 0 else len(self.rows) - 1)

    def action_toggle_mark(self) -> None:
        name = self.current
        if name is None:
            return
        self.marked.symmetric_difference_update({name})
        self._set_cursor(self.cursor + 1)
        self.refresh()

    def set_marks(self, names: Iterable[str]) -> None:
        self.marked = set(names)
        self.refresh()

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y == 0:
            return
        row = int(self.scroll_offset.y) + offset.y - 1
        if row < len(self.rows):
            self.focus()
            self._set_cursor(row)
            if event.chain == 2:
                self.post_message(self.Activated(self.rows[row]))
