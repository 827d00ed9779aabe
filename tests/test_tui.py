"""The plan editor, driven headless with Textual's Pilot on a rank set written by MindSpore.

The main test follows a user through the app. It filters to one parameter and gives it a
`grid`, marks a glob and gives it `row`, and tries a choice that cannot work, which shows an error
in the dialog and on the row. Saving is then stopped until the error is fixed. The saved plan must
lay out every parameter as the slices were cut, and `shardsmith merge` with it must give back the
full tensors bit for bit.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import List

import numpy as np
import pytest
from textual import events
from textual.widgets import Input, Static

from conftest import load_ms, row_blocks, save_ms, write_rank_set
from shardsmith.infer import Assignment
from shardsmith.plan import load_plan, resolve_slices
from shardsmith.rankset import open_source
from shardsmith.tui.app import PlanApp
from shardsmith.tui.components.assign_screen import AssignScreen, parse_option
from shardsmith.tui.components.dialogs import ConfirmScreen, PromptScreen
from shardsmith.tui.components.help_screen import HelpScreen
from shardsmith.tui.components.param_table import ParamTable, middle_ellipsis
from shardsmith.strategies.base import Option

pytestmark = pytest.mark.usefixtures("builtin_only")

W = 4
SIZE = (140, 40)


def column_blocks(array: np.ndarray, parts: int) -> List[np.ndarray]:
    size = array.shape[1] // parts
    return [array[:, (r % parts) * size : (r % parts + 1) * size] for r in range(W)]


def grid_tiles(array: np.ndarray, a: int, b: int) -> List[np.ndarray]:
    rows, cols = array.shape[0] // a, array.shape[1] // b
    return [array[(r // b) * rows : (r // b + 1) * rows, (r % b) * cols : (r % b + 1) * cols] for r in range(W)]


def full_tensors():
    rng = np.random.default_rng(42)

    def random(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "layers.0.wq.weight": random(8, 6),
        "layers.0.wo.weight": random(6, 8),
        "layers.1.wq.weight": random(8, 6),
        "layers.1.wo.weight": random(6, 8),
        "grid.weight": random(8, 12),
        "norm.gamma": random(6),
        "moments.layers.0.wq.weight": random(8, 6),
        "moments.layers.1.wq.weight": random(8, 6),
        "learning_rate": np.array(0.01, np.float32),
        "global_step": np.array([3], np.int32),
    }


def slices_of(name: str, array: np.ndarray) -> List[np.ndarray]:
    if name.endswith("wq.weight"):
        return row_blocks(array, W, W)
    if name.endswith("wo.weight"):
        return column_blocks(array, W)
    if name == "grid.weight":
        return grid_tiles(array, 2, 2)
    return [array] * W


@pytest.fixture()
def rank_set(tmp_path: Path, ms):
    full = full_tensors()
    per_rank = [{name: slices_of(name, array)[r] for name, array in full.items()} for r in range(W)]
    root = write_rank_set(tmp_path / "ranks", per_rank)
    return root, full


def run_async(test):
    """Run an async test body with asyncio.run (no asyncio plugin for pytest is installed)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


def make_app(root: Path, **kwargs) -> PlanApp:
    source = open_source([root])
    return PlanApp(source, label="ranks", **kwargs)


def check_text(screen: AssignScreen) -> str:
    return str(screen.query_one("#check", Static).content)


async def assign_in_dialog(pilot, app: PlanApp, steps_down: int, options: dict) -> AssignScreen:
    """Open the assign dialog, move down the strategy list from `row`, type the options."""
    await pilot.press("a")
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, AssignScreen)
    for _ in range(abs(steps_down)):
        await pilot.press("down" if steps_down > 0 else "up")
    await pilot.pause()
    for key, text in options.items():
        field = screen.query_one(f"#option-{key}", Input)
        field.focus()
        field.value = ""
        await pilot.press(*text)
    await pilot.pause()
    return screen


@run_async
async def test_editor_assign_check_save(rank_set, tmp_path, cli):
    root, full = rank_set
    output = tmp_path / "plan.toml"
    app = make_app(root, output=output)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        model = app.model
        table = app.query_one(ParamTable)
        # Before any assignment every split parameter is "replicated", and its ranks' bytes differ.
        assert model.message("grid.weight")[1] == "error"
        assert "should hold copies" in model.message("grid.weight")[0]
        assert model.message("norm.gamma") is None

        # grid on one parameter: filter to it, assign, type the option.
        await pilot.press("slash", *"grid.weight", "enter")
        assert table.rows == ["grid.weight"]
        screen = await assign_in_dialog(pilot, app, 2, {"grid": "2, 2"})
        assert "✓ grid(grid=[2, 2]) lays out the parameter." in check_text(screen)
        await pilot.click("#apply")
        await app.wait_until_settled()
        assert model.assignments["grid.weight"] == Assignment.make("grid", {"grid": [2, 2]})
        assert model.full_shape("grid.weight") == (8, 12)
        assert model.message("grid.weight") is None

        # row on a glob: clear the filter, mark by glob, assign.
        await pilot.press("escape", "escape")
        assert len(table.rows) == len(full)
        await pilot.press("g")
        await pilot.pause()
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"layers.*.wq.weight", "enter")
        await pilot.pause()
        assert table.marked == {"layers.0.wq.weight", "layers.1.wq.weight"}
        screen = await assign_in_dialog(pilot, app, 0, {})
        assert screen.query_one("#match", Input).value == "layers.*.wq.weight"
        assert "2 parameters" in str(screen.query_one("#match-count", Static).content)
        await pilot.click("#apply")
        await app.wait_until_settled()
        for name in ("layers.0.wq.weight", "layers.1.wq.weight"):
            assert model.assignments[name] == Assignment.make("row")
            assert model.full_shape(name) == (8, 6)
        # Their Momentum states follow them without an assignment of their own.
        assert "moments.layers.0.wq.weight" not in model.assignments
        assert model.strategy_text("moments.layers.0.wq.weight") == ("mirror of layers.0.wq.weight", "mirror")
        assert model.full_shape("moments.layers.0.wq.weight") == (8, 6)
        assert model.message("moments.layers.0.wq.weight") is None

        # An impossible choice: a grid of 3 tiles over 4 ranks. The dialog shows it before Apply.
        table.move_to("layers.0.wo.weight")
        screen = await assign_in_dialog(pilot, app, 2, {"grid": "3, 1"})
        text = check_text(screen)
        assert "✗ it fails; Apply assigns it anyway" in text
        assert "grid [3, 1] has 3 tiles, which does not divide world size 4" in text
        await pilot.click("#apply")
        await app.wait_until_settled()
        message = model.message("layers.0.wo.weight")
        assert message is not None and message[1] == "error"
        assert "does not divide world size 4" in message[0]
        assert table.status("layers.0.wo.weight") == "error"

        # A wrong option type never reaches the model: Apply stays disabled. The dialog opens on
        # the row's grid; two up is row.
        screen = await assign_in_dialog(pilot, app, -2, {"parts": "two"})
        assert "expected an integer, got 'two'" in str(screen.query_one("#error-parts", Static).content)
        assert screen.query_one("#apply").disabled
        await pilot.press("escape")
        await pilot.pause()

        # Saving while an error is open asks first, and Cancel writes nothing.
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "Errors stand" in app.screen.title_text
        await pilot.click("#button-cancel")
        await pilot.pause()
        assert not output.exists()

        # Fix both wo weights with one glob typed into the dialog's Match field, then save.
        table.move_to("layers.0.wo.weight")
        await pilot.press("a")
        await pilot.pause()
        screen = app.screen
        match = screen.query_one("#match", Input)
        match.value = "layers.*.wo.weight"
        await pilot.press("up")  # strategies list: row -> column is one down; focus is on the list
        await pilot.pause()
        screen.query_one("#strategies").highlighted = 2  # column
        await pilot.pause()
        await pilot.click("#apply")
        await app.wait_until_settled()
        assert model.problems(("error",)) == []
        assert model.dirty
        await pilot.press("ctrl+s")
        await app.wait_until_settled()
        await pilot.pause()
        assert output.exists()
        assert not model.dirty

    text = output.read_text()
    assert text.startswith("# Written by shardsmith")
    assert "# source: ranks (rank set of 4 ranks)" in text
    plan = load_plan(output)
    assert [(r.match, r.strategy) for r in plan.rules] == [
        ("layers.*.wq.weight", "row"),
        ("layers.*.wo.weight", "column"),
        ("grid.weight", "grid"),
    ]
    assert plan.accepted_errors == ()
    with open_source([root]) as source:
        names = list(source.names)
        resolved = resolve_slices(
            plan, names, {n: source.info(n).dtype for n in names}, {n: source.slice_shapes(n) for n in names}
        )
    for name, array in full.items():
        assert resolved[name].full_shape == array.shape, name
    assert resolved["moments.layers.1.wq.weight"].strategy == "mirror"

    merged = tmp_path / "merged.ckpt"
    result = cli("merge", root, "--plan", output, "-o", merged)
    assert result.exit_code == 0, result.output
    loaded = load_ms(merged)
    assert list(loaded) == list(full)
    for name, array in full.items():
        assert loaded[name].tobytes() == array.tobytes(), name


@run_async
async def test_save_anyway_records_accepted_errors(rank_set, tmp_path):
    root, _ = rank_set
    output = tmp_path / "plan.toml"
    app = make_app(root, output=output)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#button-save")
        await app.wait_until_settled()
        await pilot.pause()
    plan = load_plan(output)
    # Four split weights, the grid and two Momentum states, all "replicated" by default.
    assert len(plan.accepted_errors) == 7
    assert any("grid.weight" in e and "should hold copies" in e for e in plan.accepted_errors)

    # Reopened, the accepted errors no longer block a save.
    app = make_app(root, plan=plan)
    async with app.run_test(size=SIZE):
        await app.wait_until_settled()
        assert app.model.problems(("error",)) == []
        assert len(app.model.problems(("accepted",))) == 7


@run_async
async def test_quit_with_unsaved_changes_asks(rank_set):
    root, _ = rank_set
    app = make_app(root)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        app.model.assign(["grid.weight"], Assignment.make("grid", {"grid": [2, 2]}))
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#button-cancel")
        await pilot.pause()
        assert app.is_running
        await pilot.press("q")
        await pilot.pause()
        await pilot.click("#button-discard")
        await pilot.pause()
    assert app.return_value == 0


@run_async
async def test_existing_plan_opens_for_editing(rank_set, tmp_path):
    root, _ = rank_set
    existing = tmp_path / "old.toml"
    existing.write_text(
        'world_size = 4\n\n[[param]]\nmatch = "layers.*.w?.weight"\nstrategy = "row"\n\n'
        '[[param]]\nmatch = "grid.weight"\nstrategy = "grid"\ngrid = [2, 2]\n'
    )
    app = make_app(root, plan=load_plan(existing), output=tmp_path / "new.toml")
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        model = app.model
        assert model.assignments["layers.1.wo.weight"] == Assignment.make("row")
        # The wo weights are column-split, so "row" is wrong for them, but without full shapes
        # only the full-shape column shows it: [24, 2] in place of [6, 8].
        assert model.message("layers.1.wo.weight") is None
        assert model.full_shape("layers.1.wo.weight") == (24, 2)
        model.assign(model.matching("layers.*.wo.weight"), Assignment.make("column"), "layers.*.wo.weight")
        assert model.problems(("error",)) == []
        await pilot.press("ctrl+s")
        await app.wait_until_settled()
        await pilot.pause()
    plan = load_plan(tmp_path / "new.toml")
    assert [r.match for r in plan.rules] == ["layers.*.wq.weight", "layers.*.wo.weight", "grid.weight"]


@run_async
async def test_full_checkpoint_asks_for_world_size(tmp_path, ms):
    full = full_tensors()
    path = save_ms(tmp_path / "full.ckpt", full)
    app = PlanApp(open_source([path]), label="full.ckpt")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PromptScreen)
        await pilot.press("4", "enter")
        await app.wait_until_settled()
        await pilot.pause()
        model = app.model
        assert model.world_size == 4
        assert not model.rank_set
        model.assign(["layers.0.wq.weight"], Assignment.make("row", {"parts": 3}))
        message = model.message("layers.0.wq.weight")
        assert "3 parts do not fit world size 4" in message[0]
        model.assign(["grid.weight"], Assignment.make("grid", {"grid": [2, 2]}))
        assert model.slice_shapes("grid.weight") == ((4, 6),) * 4


@run_async
async def test_filter_states_help_and_mouse(rank_set):
    root, full = rank_set
    app = make_app(root)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        table = app.query_one(ParamTable)
        # States sit under their parameter in the table.
        assert table.rows.index("moments.layers.0.wq.weight") == table.rows.index("layers.0.wq.weight") + 1
        await pilot.press("s")
        assert "moments.layers.0.wq.weight" not in table.rows
        await pilot.press("s")
        # A glob filter.
        await pilot.press("slash", *"*.wo.*", "enter")
        assert table.rows == ["layers.0.wo.weight", "layers.1.wo.weight"]
        await pilot.press("escape")
        # A click selects the row under the pointer (line 0 is the header).
        await pilot.click(ParamTable, offset=(5, 3))
        assert table.current == table.rows[2]
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        # e jumps to the next error.
        await pilot.press("home", "e")
        assert app.model.message(table.current)[1] == "error"


@run_async
async def test_ten_thousand_parameters_stay_responsive(tmp_path):
    """10,000 parameters on 4 ranks: keys move the cursor while layouts and hashes are still
    being computed. (The files are written by shardsmith's own writer: MindSpore takes minutes.)"""
    from shardsmith.formats import TensorInfo, open_writer

    names = [f"layers.{i}.{p}" for i in range(1000) for p in ("wq.weight", "wo.weight", "w1", "w2", "norm")]
    names += [f"moments.{n}" for n in names]
    rng = np.random.default_rng(0)
    for rank in range(W):
        arrays = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in names}
        entries = [TensorInfo.of_array(n, "Float32", a) for n, a in arrays.items()]
        (tmp_path / f"rank_{rank}").mkdir()
        with open_writer(tmp_path / f"rank_{rank}" / "c.ckpt", entries, "ckpt") as writer:
            for n, a in arrays.items():
                writer.write(n, a)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE):
        loop = asyncio.get_running_loop()
        table = app.query_one(ParamTable)
        assert app.model.pending, "the layouts should still be computing in the background"
        # Pilot.press waits for the whole process to go idle, which background work prevents, so
        # post the keys and time how long the cursor takes to move.
        latencies = []
        for key in ("down", "down", "end", "home", "pagedown"):
            before = table.cursor
            start = loop.time()
            app.post_message(events.Key(key, None))
            while table.cursor == before and loop.time() - start < 10:
                await asyncio.sleep(0.002)
            latencies.append(loop.time() - start)
        assert table.cursor == table._visible_rows()
        # About 0.2 s each on a 2-core machine at load 7; computing everything takes ~5 s.
        assert max(latencies) < 1.5, latencies
        await app.wait_until_settled()
        assert not app.model.pending
        assert app.model.hashed == 10000


def test_parse_option():
    assert parse_option(Option("int_list", ""), "2, 2") == [2, 2]
    assert parse_option(Option("int_list", ""), "[2, 2]") == [2, 2]
    assert parse_option(Option("tensor_map", ""), "[[1, 0], -1]") == [[1, 0], -1]
    assert parse_option(Option("int", ""), " 3 ") == 3
    with pytest.raises(ValueError, match="expected an integer"):
        parse_option(Option("int", ""), "3.5")
    with pytest.raises(ValueError, match="such as"):
        parse_option(Option("int_list", ""), "[2, ")


def test_middle_ellipsis():
    assert middle_ellipsis("layers.10.attention.wq.weight", 15) == "layers.….weight"
    assert middle_ellipsis("short", 15) == "short"


@run_async
async def test_slices_that_disagree_across_ranks(tmp_path, ms):
    """A parameter whose ranks hold different shapes is an error under every built-in strategy."""
    per_rank = [{"w": np.ones((2 if r < 3 else 3, 4), np.float32) * r, "b": np.ones(4, np.float32)} for r in range(W)]
    root = write_rank_set(tmp_path / "ranks", per_rank)
    app = make_app(root)
    async with app.run_test(size=SIZE):
        await app.wait_until_settled()
        message, level = app.model.message("w")
        assert level == "error"
        assert "rank 0 holds shape [2, 4] and rank 3 holds [3, 4]" in message
        app.assign(["w"], Assignment.make("row"))
        await app.wait_until_settled()
        assert "rank 0 holds [2, 4] and rank 3 holds [3, 4]" in app.model.message("w")[0]
        assert app.query_one(ParamTable)._shape_cell("w") == "[2, 4] (varies)"


@run_async
async def test_plugin_strategy_offered_with_its_options(rank_set, monkeypatch):
    """An installed plugin's strategy is in the dialog, with its source and typed option fields."""
    from textual.widgets import Checkbox, OptionList

    from shardsmith import plugins

    monkeypatch.setenv(plugins.PLUGINS_ENV, "padded_vocab")
    plugins.reset_registry()
    root, _ = rank_set
    app = make_app(root)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        app.query_one(ParamTable).move_to("layers.0.wq.weight")
        await pilot.press("a")
        await pilot.pause()
        screen = app.screen
        strategies = screen.query_one("#strategies", OptionList)
        ids = [strategies.get_option_at_index(i).id for i in range(strategies.option_count)]
        assert ids[-1] == "padded_vocab"
        prompt = str(strategies.get_option_at_index(len(ids) - 1).prompt)
        assert "shardsmith-padded-vocab" in prompt
        strategies.highlighted = len(ids) - 1
        await pilot.pause()
        assert "padding the vocabulary" in str(screen.query_one("#description", Static).content)
        assert isinstance(screen.query_one("#option-keep_padding"), Checkbox)
        # vocab_size is required: Apply stays off until it is given.
        assert screen.query_one("#apply").disabled
        screen.query_one("#option-vocab_size", Input).value = "7"
        await pilot.pause()
        assert not screen.query_one("#apply").disabled
        assert "✓ padded_vocab(vocab_size=7) lays out the parameter." in check_text(screen)
        await pilot.click("#apply")
        await app.wait_until_settled()
        assert app.model.assignments["layers.0.wq.weight"] == Assignment.make(
            "padded_vocab", {"vocab_size": 7}
        )


@run_async
async def test_hash_on_request(rank_set):
    root, _ = rank_set
    app = make_app(root, hash_in_background=False)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        model = app.model
        assert model.hashed == 0
        assert model.message("grid.weight") is None  # not hashed: nothing to compare yet
        app.query_one(ParamTable).move_to("grid.weight")
        await pilot.press("h")
        await app.wait_until_settled()
        assert list(model.digests) == ["grid.weight"]
        assert "should hold copies" in model.message("grid.weight")[0]


def test_editor_refuses_without_terminal(rank_set, cli):
    root, _ = rank_set
    result = cli("plan", root)
    assert result.exit_code != 0
    assert "the plan editor needs a terminal" in result.stderr


def test_editor_world_size_must_match_rank_set(rank_set):
    from shardsmith.errors import PlanError

    root, _ = rank_set
    with pytest.raises(PlanError, match="--world-size 8 disagrees with the rank set, which has 4 ranks"):
        make_app(root, world_size=8)


@run_async
async def test_infer_key_fills_untouched_parameters(rank_set, tmp_path):
    """`i` infers from bytes and the reference's full shapes; the user's own assignment stays."""
    root, full = rank_set
    reference = save_ms(tmp_path / "full.ckpt", full)
    app = make_app(root, reference=open_source([reference]))
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        model = app.model
        app.assign(["layers.1.wo.weight"], Assignment.make("row"))
        await app.wait_until_settled()
        # The reference's full shape shows the row split is wrong for a column-split weight.
        message, level = model.message("layers.1.wo.weight")
        assert level == "error"
        assert "the layout gives full shape [24, 2], but the reference checkpoint holds [6, 8]" in message
        await pilot.press("i")
        await app.wait_until_settled()
        await pilot.pause()
        assert model.assignments["layers.0.wo.weight"] == Assignment.make("column")
        assert model.assignments["layers.0.wq.weight"] == Assignment.make("row")
        assert model.assignments["grid.weight"] == Assignment.make("grid", {"grid": [2, 2]})
        assert model.assignments["layers.1.wo.weight"] == Assignment.make("row")  # the user's, kept
        assert "moments.layers.0.wq.weight" not in model.assignments
        assert "norm.gamma" not in model.assignments
        assert model.inferences["layers.1.wo.weight"].summary == "column"
        assert [name for name, _ in model.problems(("error",))] == ["layers.1.wo.weight"]


@run_async
async def test_dialog_keys_stay_in_dialog(rank_set):
    """Inside the assign dialog, app keys do nothing and Ctrl+S applies the dialog, not a save."""
    root, _ = rank_set
    app = make_app(root)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        app.query_one(ParamTable).move_to("layers.0.wq.weight")
        await pilot.press("a")
        await pilot.pause()
        await pilot.press("a", "q", "g")
        await pilot.pause()
        assert [type(s).__name__ for s in app.screen_stack] == ["Screen", "AssignScreen"]
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert [type(s).__name__ for s in app.screen_stack] == ["Screen"]
        assert app.model.assignments["layers.0.wq.weight"] == Assignment.make("row")


def test_ranks_text():
    from shardsmith.tui.components.preview import ranks_text

    assert ranks_text([0, 1, 2, 3]) == "0-3"
    assert ranks_text([4, 0]) == "0,4"
    assert ranks_text([0, 1, 6]) == "0,1,6"
    assert ranks_text([0, 1, 2, 5, 6]) == "0-2,5,6"
    assert ranks_text(list(range(0, 64, 8))) == "0,8,…,56"


def test_preview_of_64_ranks_fits_the_panel():
    from rich.console import Console

    from shardsmith.layout import from_tensor_map
    from shardsmith.tui.components.preview import layout_drawing

    console = Console(width=44, record=True)
    console.print(layout_drawing(from_tensor_map((64, 64), [8, 8], [1, -1])))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 44 for line in lines)
    assert any("0-7" in line for line in lines)
    console = Console(width=44, record=True)
    console.print(layout_drawing(from_tensor_map((64, 64), [8, 8], [0, -1])))
    assert "0,8,…,56" in console.export_text()


@run_async
async def test_dialog_check_follows_the_fields(rank_set):
    root, _ = rank_set
    app = make_app(root)
    async with app.run_test(size=SIZE) as pilot:
        await app.wait_until_settled()
        app.query_one(ParamTable).move_to("layers.0.wq.weight")
        screen = await assign_in_dialog(pilot, app, 2, {"grid": "3, 1"})
        assert "does not divide world size 4" in check_text(screen)
        screen.query_one("#option-grid", Input).value = "2, 2, 2"
        await pilot.pause()
        assert check_text(screen) == "✗ strategy 'grid': option 'grid' must be two integers [a, b], got [2, 2, 2]"
        screen.query_one("#option-grid", Input).value = "2, x"
        await pilot.pause()
        assert check_text(screen) == "✗ fix the options above"
        assert screen.query_one("#apply").disabled
        screen.query_one("#option-grid", Input).value = "2, 2"
        await pilot.pause()
        assert check_text(screen).startswith("✓")
