"""The panel beside the table: the current parameter, its problem and a preview of its layout."""

from __future__ import annotations

from typing import Optional

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..model import PlanModel, human_bytes, shape_text
from .preview import layout_drawing, rank_boxes

_LEVEL_STYLE = {"error": "bold red", "accepted": "yellow", "warning": "yellow"}
BYTES_HINT = (
    "Choose the strategy that matches the ranks (the shapes alone cannot tell a split from a copy), "
    'or set replicas = "first" if the copies may drift.'
)
_LEVEL_LABEL = {"error": "✗ ", "accepted": "! accepted: ", "warning": "! warning: "}


class DetailPanel(VerticalScroll):
    """Shows one parameter: shapes, strategy, problem, and which block each rank holds."""

    DEFAULT_CSS = """
    DetailPanel { width: 46; border-left: vkey $primary-darken-2; padding: 0 1; background: $surface; }
    DetailPanel > Static { height: auto; }
    """

    def __init__(self, model: PlanModel, *, id: Optional[str] = None) -> None:
        super().__init__(id=id)
        self.model = model
        self.name_shown: Optional[str] = None

    def compose(self) -> ComposeResult:
        yield Static(id="detail-body")

    def show(self, name: Optional[str]) -> None:
        self.name_shown = name
        self.query_one("#detail-body", Static).update(self._describe(name))

    def _describe(self, name: Optional[str]) -> RenderableType:
        model = self.model
        if name is None:
            return Text("No parameter matches the filter.", style="dim")
        entry = model.entries[name]
        parts: list = []
        title = Text(name, style="bold")
        parts.append(title)

        facts = Text()
        if model.rank_set:
            if entry.shapes_agree:
                facts.append(f"{entry.dtype}, slice {shape_text(entry.shape)} on each of {model.world_size} ranks\n")
            else:
                facts.append(f"{entry.dtype}, slices differ by rank:\n")
                for rank, shape in enumerate(entry.shapes[:8]):
                    facts.append(f"  rank {rank}: {shape_text(shape)}\n")
            facts.append(f"{human_bytes(entry.nbytes)} on rank 0\n", style="dim")
        else:
            facts.append(f"{entry.dtype}, full shape {shape_text(entry.shape)}, {human_bytes(entry.nbytes)}\n")
            facts.append(f"split over {model.world_size} ranks\n", style="dim")
        if entry.parent is not None:
            facts.append("optimizer state of ", style="dim")
            facts.append(entry.parent + "\n")
        if entry.states:
            facts.append(f"states: {', '.join(entry.states[:4])}{' …' if len(entry.states) > 4 else ''}\n", style="dim")
        strategy, kind = model.strategy_text(name)
        facts.append("strategy: ", style="dim")
        facts.append(strategy, style="bold" if kind == "assigned" else "")
        facts.append(f"  ({'assigned' if kind == 'assigned' else 'default'})\n", style="dim")
        result = model.results.get(name)
        if result is not None:
            facts.append("full shape: ", style="dim")
            facts.append(shape_text(result.full_shape) + "\n")
        if model.rank_set and not entry.scalar:
            held = model.digests.get(name)
            if held is None:
                facts.append("bytes: not hashed yet (h hashes it now)\n", style="dim")
            else:
                groups = held.partition()
                equal = "all ranks equal" if len(groups) == 1 else f"{len(groups)} distinct slices"
                facts.append(f"bytes: hashed, {equal}\n", style="dim")
        parts.append(facts)

        reference = model.reference_shape(name)
        if reference is not None:
            facts.append("reference: ", style="dim")
            facts.append(shape_text(reference) + "\n")
        inference = model.inferences.get(name)
        if inference is not None:
            if not inference.decided:
                sure = "undecided"
            elif inference.certain:
                sure = "certain"
            else:
                sure = "likely"
            facts.append("inferred: ", style="dim")
            facts.append(f"{inference.summary} ({sure})\n", style="" if inference.decided else "yellow")
            facts.append(inference.reason + "\n", style="dim")

        message = model.message(name)
        if message is not None:
            text, level = message
            parts.append(Text(_LEVEL_LABEL[level] + text, style=_LEVEL_STYLE[level]))
            if name in model.byte_problems:
                parts.append(Text(BYTES_HINT, style="dim"))
            parts.append(Text(""))
        elif name in model.pending:
            parts.append(Text("laying out…\n", style="dim"))

        if result is not None and not entry.scalar:
            parts.append(Text("Which ranks hold each block:", style="bold"))
            parts.append(layout_drawing(result.layout))
            parts.append(rank_boxes(result.layout))
        return Group(*parts)
