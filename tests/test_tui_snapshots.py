"""Screenshots of the plan editor's screens, compared with the SVGs under __snapshots__.

Run `pytest tests/test_tui_snapshots.py --snapshot-update` after an intended change to the
screens, and look at the new SVGs before committing them. Each screen is taken at a fixed
terminal size once the layouts and hashes have settled, with notifications cleared, so the
pictures do not depend on timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

from conftest import save_ms
from shardsmith.infer import Assignment
from shardsmith.rankset import open_source
from shardsmith.tui.app import PlanApp
from shardsmith.tui.components.param_table import ParamTable
from conftest import write_rank_set
from test_tui import W, full_tensors, slices_of

pytestmark = pytest.mark.usefixtures("builtin_only")

SIZE = (140, 40)


@pytest.fixture()
def rank_set(tmp_path: Path, ms):
    full = full_tensors()
    per_rank = [{name: slices_of(name, array)[r] for name, array in full.items()} for r in range(W)]
    return write_rank_set(tmp_path / "ranks", per_rank)


def assigned(app: PlanApp) -> None:
    model = app.model
    app.assign(["grid.weight"], Assignment.make("grid", {"grid": [2, 2]}))
    app.assign(model.matching("layers.*.wq.weight"), Assignment.make("row"), "layers.*.wq.weight")
    app.assign(model.matching("layers.*.wo.weight"), Assignment.make("column"), "layers.*.wo.weight")


async def settle(pilot) -> None:
    app = pilot.app
    await app.wait_until_settled()
    await pilot.pause()
    app.clear_notifications()
    await pilot.pause()


def test_main_screen_before_assigning(rank_set, snap_compare):
    """Every split parameter is still "replicated" by default, so its differing bytes are errors."""
    app = PlanApp(open_source([rank_set]), label="ranks")
    assert snap_compare(app, terminal_size=SIZE, run_before=settle)


def test_main_screen_assigned_grid_preview(rank_set, snap_compare):
    """All parameters laid out; the cursor on the grid shows which rank holds which tile."""
    app = PlanApp(open_source([rank_set]), label="ranks")

    async def run_before(pilot):
        await settle(pilot)
        assigned(app)
        await settle(pilot)
        app.query_one(ParamTable).move_to("grid.weight")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_assign_dialog_grid_options(rank_set, snap_compare):
    app = PlanApp(open_source([rank_set]), label="ranks")

    async def run_before(pilot):
        await settle(pilot)
        app.query_one(ParamTable).move_to("grid.weight")
        await pilot.press("a", "down", "down")
        await pilot.pause()
        field = app.screen.query_one("#option-grid", Input)
        field.focus()
        await pilot.press(*"2, 2")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_assign_dialog_impossible_choice(rank_set, snap_compare):
    """A grid of 3 tiles on 4 ranks: the dialog names the parameter and the numbers."""
    app = PlanApp(open_source([rank_set]), label="ranks")

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("g", *"layers.*.w?.weight", "enter")
        await pilot.pause()
        await pilot.press("a", "down", "down")
        await pilot.pause()
        field = app.screen.query_one("#option-grid", Input)
        field.focus()
        await pilot.press(*"3, 1")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_save_with_errors_asks(rank_set, snap_compare, tmp_path):
    app = PlanApp(open_source([rank_set]), label="ranks", output=tmp_path / "plan.toml")

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help_screen(rank_set, snap_compare):
    app = PlanApp(open_source([rank_set]), label="ranks")

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_full_checkpoint_world_size_prompt(tmp_path, ms, snap_compare):
    path = save_ms(tmp_path / "full.ckpt", full_tensors())
    app = PlanApp(open_source([path]), label="full.ckpt")

    async def run_before(pilot):
        await pilot.pause()
        await pilot.press("8")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_full_checkpoint_split_planned(tmp_path, ms, snap_compare):
    """A full checkpoint planned for 4 ranks: the last column is each rank's slice shape."""
    path = save_ms(tmp_path / "full.ckpt", full_tensors())
    app = PlanApp(open_source([path]), label="full.ckpt", world_size=4)

    async def run_before(pilot):
        await settle(pilot)
        assigned(app)
        app.assign(["layers.0.wq.weight"], Assignment.make("row", {"parts": 3}))
        await settle(pilot)
        app.query_one(ParamTable).move_to("layers.0.wq.weight")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_inferred_without_reference(rank_set, snap_compare):
    """After `i` without --like: 2-D splits stay undecided and the details panel explains why."""
    app = PlanApp(open_source([rank_set]), label="ranks")

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("i")
        await settle(pilot)
        app.query_one(ParamTable).move_to("layers.1.wo.weight")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
