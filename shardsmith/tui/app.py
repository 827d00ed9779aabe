"""The plan editor: a Textual app over a `PlanModel`.

Work that could stall the screen never runs in one go on the event loop. Layouts are computed
in batches between frames. Slices are hashed in a thread that reads one parameter at a time and
puts its digests on a queue, which the screen drains a few times a second.
"""

from __future__ import annotations

import asyncio
import gc
import queue
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Footer, Header, Input, Static
from textual.worker import Worker, WorkerCancelled, WorkerFailed, get_current_worker

from ..errors import ShardsmithError
from ..infer import Assignment, RankBytes, infer_layouts, rank_bytes
from ..plan import Plan, dumps_plan
from ..plugins import StrategyRegistry
from ..rankset import Source
from .components.assign_screen import AssignRequest, AssignScreen
from .components.details import DetailPanel
from .components.dialogs import ConfirmScreen, PromptScreen
from .components.help_screen import HelpScreen
from .components.param_table import ParamTable
from .model import PlanModel, write_text_atomic

# Layouts are computed in slices of this many seconds of work, so keys and redraws get a
# turn in between.
RESOLVE_SLICE = 0.02
RESOLVE_BATCH = 25

# The hashing thread pauses HASH_PAUSE seconds after every HASH_SLICE seconds of work. Hashing
# many small tensors is mostly Python code that holds the GIL, and without the pauses the event
# loop waits for the GIL after every poll, so keys lag by tenths of a second.
HASH_SLICE = 0.005
HASH_PAUSE = 0.002


class PlanApp(App[int]):
    """Edit the plan of one rank set or full checkpoint; returns 0 when it quits."""

    TITLE = "shardsmith plan"

    CSS = """
    #filter-row { height: 3; padding: 0 1; }
    #filter { width: 1fr; }
    #counts { width: auto; min-width: 24; padding: 1 1 0 1; color: $text-muted; }
    #main { height: 1fr; }
    #params { width: 1fr; }
    #status { height: 1; padding: 0 1; background: $panel; color: $text-muted; }
    #waiting { padding: 2 4; color: $text-muted; }
    """

    BINDINGS = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("enter,a", "assign", "Assign"),
        Binding("g", "mark_glob", "Glob"),
        Binding("d", "reset", "Default"),
        Binding("e", "next_error", "Next error"),
        Binding("i", "infer", "Infer"),
        Binding("h", "hash_now", "Hash", show=False),
        Binding("s", "toggle_states", "States", show=False),
        Binding("escape", "clear", "Clear", show=False),
        Binding("ctrl+s", "save", "Save"),
        Binding("q", "quit", "Quit"),
        Binding("question_mark,f1", "help", "Help"),
    ]

    def __init__(
        self,
        source: Source,
        *,
        label: str,
        world_size: Optional[int] = None,
        plan: Optional[Plan] = None,
        output: Optional[Path] = None,
        force: bool = False,
        registry: Optional[StrategyRegistry] = None,
        hash_in_background: bool = True,
        reference: Optional[Source] = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.reference = reference
        self.label = label
        self.plan = plan
        self.output = output
        self.force = force
        self.registry = registry
        self.hash_in_background = hash_in_background
        self.model: Optional[PlanModel] = None
        self.sub_title = label
        self.mark_glob: Optional[str] = None
        self.show_states = True
        self.saved_path: Optional[Path] = None
        self._overwrite_confirmed: Optional[Path] = None
        self._hash_worker: Optional[Worker] = None
        self._infer_worker: Optional[Worker] = None
        self._infer_progress: Optional[Tuple[int, int]] = None
        self._digests_in: "queue.SimpleQueue[Tuple[str, object]]" = queue.SimpleQueue()
        self._status_text = ""
        if source.world_size > 1 or world_size is not None:
            self.model = self._make_model(world_size)

    def _make_model(self, world_size: Optional[int]) -> PlanModel:
        model = PlanModel(
            self.source,
            world_size=world_size,
            plan=self.plan,
            label=self.label,
            registry=self.registry,
            reference=self.reference,
        )
        self.sub_title = f"{self.label} · world size {model.world_size}"
        return model

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        if self.model is None:
            yield Static("Waiting for the world size to plan the split for…", id="waiting")
        else:
            with Horizontal(id="filter-row"):
                yield Input(placeholder="Filter: part of a name, or a glob such as layers.*.wq.*  (/)", id="filter")
                yield Static("", id="counts")
            with Horizontal(id="main"):
                yield ParamTable(self.model, id="params")
                yield DetailPanel(self.model, id="details")
            yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        if self.model is None:
            self.push_screen(
                PromptScreen(
                    "World size",
                    f"{self.label} is a full checkpoint. Over how many ranks should the plan split it?",
                    placeholder="e.g. 8",
                    input_type="integer",
                    check=_check_world_size,
                ),
                self._world_size_given,
            )
            return
        self._start()

    async def _world_size_given(self, text: Optional[str]) -> None:
        if text is None:
            self.exit(0)
            return
        try:
            self.model = self._make_model(int(text))
        except ShardsmithError as exc:
            self.notify(exc.format(), severity="error")
            self.exit(1)
            return
        await self.recompose()
        self._start()

    def _start(self) -> None:
        gc.freeze()
        table = self.query_one(ParamTable)
        table.focus()
        self._update_counts()
        self.query_one(DetailPanel).show(table.current)
        self.set_interval(0.25, self._tick)
        self._settle()
        if self.hash_in_background:
            self._start_hashing()

    # -- background work ------------------------------------------------------------------------

    @work(exclusive=True, group="resolve")
    async def _settle(self) -> None:
        """Lay out every pending parameter, a batch per frame."""
        model = self.model
        assert model is not None
        table = self.query_one(ParamTable)
        loop = asyncio.get_running_loop()
        while model.pending:
            started = loop.time()
            done: List[str] = []
            while model.pending and loop.time() - started < RESOLVE_SLICE:
                done += model.resolve_pending(RESOLVE_BATCH)
            self._changed(done)
            await asyncio.sleep(0)
            if len(done) > RESOLVE_BATCH:
                # Thousands of layouts are long-lived objects; moving them out of the collector's
                # reach keeps full collections (a quarter second on 10,000 parameters) off the loop.
                gc.freeze()
        table._update_size()
        table.refresh()
        details = self.query_one(DetailPanel)
        details.show(details.name_shown)

    def _changed(self, names: List[str]) -> None:
        table = self.query_one(ParamTable)
        table.refresh_names(names)
        details = self.query_one(DetailPanel)
        if details.name_shown in names:
            details.show(details.name_shown)

    def _start_hashing(self) -> None:
        if self.model is None or not self.model.rank_set:
            return
        if self._hash_worker is None or self._hash_worker.is_finished:
            self._hash_worker = self.run_worker(self._hash_loop, thread=True, group="hash", exit_on_error=False)

    def _hash_loop(self) -> None:
        """Hash slices until the queue is empty (runs in a thread; touches no widget)."""
        worker = get_current_worker()
        model = self.model
        assert model is not None
        worked_since = time.monotonic()
        while not worker.is_cancelled:
            name = model.next_to_hash(background=self.hash_in_background)
            if name is None:
                return
            try:
                held: object = rank_bytes(self.source, name)
            except (ShardsmithError, OSError, ValueError) as exc:
                held = exc
            self._digests_in.put((name, held))
            if time.monotonic() - worked_since > HASH_SLICE:
                time.sleep(HASH_PAUSE)
                worked_since = time.monotonic()

    def _drain_digests(self) -> None:
        model = self.model
        if model is None:
            return
        arrived = []
        while True:
            try:
                name, held = self._digests_in.get_nowait()
            except queue.Empty:
                break
            if isinstance(held, RankBytes):
                model.set_digests(name, held)
            else:
                self.notify(f"could not hash {name}: {held}", severity="warning")
            arrived.append(name)
        if arrived:
            self._changed(arrived)

    def _tick(self) -> None:
        self._drain_digests()
        self._update_status()

    async def wait_until_settled(self) -> None:
        """Wait for the layouts and the hashing to finish and their results to be shown (tests, screenshots)."""
        while True:
            running = [w for w in self.workers if not w.is_finished]
            if not running:
                if self.model is None or not self.model.pending:
                    break
                self._settle()
                continue
            for worker in running:
                try:
                    await worker.wait()
                except (WorkerCancelled, WorkerFailed):
                    pass  # a newer _settle replaced it, or the failure is reported by Textual
        self._drain_digests()
        self._update_status()
        await asyncio.sleep(0)

    # -- status ---------------------------------------------------------------------------------

    def _update_counts(self) -> None:
        table = self.query_one(ParamTable)
        total = len(self.model.order)
        shown = len(table.rows)
        text = f"{shown} of {total} shown" if shown != total else f"{total} parameters"
        if table.marked:
            text += f" · {len(table.marked)} marked"
        self.query_one("#counts", Static).update(text)

    def _update_status(self) -> None:
        model = self.model
        if model is None:
            return
        parts = [f"world size {model.world_size}"]

        counts = model.counts()
        errors = counts.get("error", 0)
        accepted = counts.get("accepted", 0) + counts.get("warning", 0)
        if model.pending:
            parts.append(f"laying out {len(model.pending)}…")
        if self._infer_progress is not None:
            done, total = self._infer_progress
            parts.append(f"inferring {done}/{total}…")
        if model.rank_set:
            if model.hashed < model.hash_total:
                parts.append(f"hashing {model.hashed}/{model.hash_total}")
            else:
                parts.append("bytes checked")
        parts.append(f"{len(model.assignments)} assigned")

        text = Text(" · ".join(parts), style="")
        if errors:
            text.append(f" · {errors} error{'s' if errors != 1 else ''}", style="bold red")
        if accepted:
            text.append(f" · {accepted} accepted or warned", style="yellow")
        if model.dirty:
            text.append(" · unsaved changes", style="bold")
        elif self.saved_path is not None:
            text.append(f" · saved to {self.saved_path}")
        if text.plain != self._status_text:
            self._status_text = text.plain
            self.query_one("#status", Static).update(text)

    # -- table events ---------------------------------------------------------------------------

    @on(ParamTable.Highlighted)
    def highlighted(self, event: ParamTable.Highlighted) -> None:
        self.query_one(DetailPanel).show(event.name)

    @on(ParamTable.Activated)
    def activated(self) -> None:
        self.action_assign()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self._apply_filter(event.value)

    def _apply_filter(self, text: str) -> None:
        table = self.query_one(ParamTable)
        table.set_rows(self.model.visible(text, self.show_states))
        self._update_counts()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self) -> None:
        self.query_one(ParamTable).focus()

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        """Disable the editing keys until there is a model (the world size prompt is up)."""
        if self.model is None and action not in ("quit", "help"):
            return False
        return True

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_assign(self) -> None:
        table = self.query_one(ParamTable)
        marked = [n for n in table.rows if n in table.marked] if table.marked else []
        current = table.current
        if not marked and current is None:
            return
        glob = self.mark_glob if marked and self.mark_glob else None
        if not marked and current is not None and self.model.entries[current].scalar:
            self.notify("Scalars are always replicated; plan rules do not apply to them.", severity="warning")
            return
        self.push_screen(AssignScreen(self.model, names=marked, glob=glob, current=current), self._assigned)

    def _assigned(self, request: Optional[AssignRequest]) -> None:
        if request is None:
            return
        self.assign(request.names, request.assignment, request.glob)
        table = self.query_one(ParamTable)
        table.set_marks(())
        self.mark_glob = None
        self._update_counts()
        what = request.assignment.summary() if request.assignment is not None else "the default"
        count = len(request.names)
        self.notify(f"{what} for {count} parameter{'s' if count != 1 else ''}", timeout=3)

    def assign(self, names: Sequence[str], assignment: Optional[Assignment], glob: Optional[str] = None) -> None:
        """Assign a strategy (None: the default) and lay the affected parameters out in the background."""
        self.model.assign(names, assignment, glob, resolve=False)
        self._settle()

    def action_mark_glob(self) -> None:
        def check(text: str) -> Optional[str]:
            return None if self.model.matching(text.strip()) else "no parameter (other than scalars) matches"

        self.push_screen(
            PromptScreen(
                "Mark by glob",
                "Mark every parameter whose whole name matches the glob (fnmatch: * also matches dots).",
                self.mark_glob or "",
                placeholder="layers.*.attention.wq.weight",
                check=check,
                ok_label="Mark",
            ),
            self._glob_given,
        )

    def _glob_given(self, text: Optional[str]) -> None:
        if not text:
            return
        glob = text.strip()
        table = self.query_one(ParamTable)
        names = self.model.matching(glob)
        table.set_marks(names)
        self.mark_glob = glob
        if names and not table.move_to(names[0]):
            self.notify("Some marked parameters are hidden by the filter.", timeout=3)
        self._update_counts()

    def action_reset(self) -> None:
        table = self.query_one(ParamTable)
        names = [n for n in table.rows if n in table.marked] or ([table.current] if table.current else [])
        if not names:
            return
        self.assign(names, None)
        table.set_marks(())
        self.mark_glob = None
        self._update_counts()

    def action_clear(self) -> None:
        table = self.query_one(ParamTable)
        filter_input = self.query_one("#filter", Input)
        if table.marked:
            table.set_marks(())
            self.mark_glob = None
        elif filter_input.value:
            filter_input.value = ""
        table.focus()
        self._update_counts()

    def action_next_error(self) -> None:
        table = self.query_one(ParamTable)
        rows = table.rows
        count = len(rows)
        for step in range(1, count + 1):
            name = rows[(table.cursor + step) % count]
            message = self.model.message(name)
            if message is not None and message[1] == "error":
                table.move_to(name)
                return
        self.notify("No errors among the shown parameters.", timeout=3)

    def action_hash_now(self) -> None:
        name = self.query_one(ParamTable).current
        if name is None:
            return
        if self.model.hash_first(name):
            self._start_hashing()
            self.notify(f"Hashing {name}…", timeout=2)
        elif name in self.model.digests:
            self.notify(f"{name} is hashed already.", timeout=2)
        else:
            self.notify(f"{name} has no slices to compare.", timeout=2)

    def action_infer(self) -> None:
        model = self.model
        if not model.rank_set:
            self.notify("Inference reads a rank set; this is a full checkpoint.", severity="warning")
            return
        if self._infer_worker is not None and not self._infer_worker.is_finished:
            self.notify("Inference is running already.", timeout=2)
            return
        self._infer_progress = (0, len(model.names))
        cache = dict(model.digests)
        self._infer_worker = self.run_worker(
            lambda: self._infer_in_thread(cache), thread=True, group="infer", exit_on_error=False
        )

    def _infer_in_thread(self, cache: dict) -> None:
        """Infer every layout (runs in a thread, pausing like the hashing thread)."""
        worked_since = time.monotonic()

        def progress(done: int, total: int, name: str) -> None:
            nonlocal worked_since
            self._infer_progress = (done, total)
            if time.monotonic() - worked_since > HASH_SLICE:
                time.sleep(HASH_PAUSE)
                worked_since = time.monotonic()

        try:
            inferences = infer_layouts(self.source, self.reference, progress=progress, bytes_cache=cache)
        except (ShardsmithError, OSError, ValueError) as exc:
            self.call_from_thread(self._inference_failed, exc)
            return
        self.call_from_thread(self._inferred, inferences, cache)

    def _inference_failed(self, exc: Exception) -> None:
        self._infer_progress = None
        text = exc.format() if isinstance(exc, ShardsmithError) else str(exc)
        self.notify(f"Inference failed: {text}", severity="error")

    def _inferred(self, inferences: dict, cache: dict) -> None:
        model = self.model
        self._infer_progress = None
        for name, held in cache.items():
            if name not in model.digests:
                model.set_digests(name, held)
        assigned, undecided = model.apply_inferences(inferences)
        self._settle()
        text = f"Inferred {len(assigned)} layout{'s' if len(assigned) != 1 else ''}"
        if undecided:
            text += f"; {len(undecided)} undecided (their details say why)"
            if self.reference is None:
                text += ". Give --like FULL.ckpt for the full shapes"
        self.notify(text, timeout=6)

    def action_toggle_states(self) -> None:
        self.show_states = not self.show_states
        self._apply_filter(self.query_one("#filter", Input).value)
        self.notify("Optimizer states shown." if self.show_states else "Optimizer states hidden.", timeout=2)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_save(self) -> None:
        if self.model is not None:
            self.run_worker(self._save(), group="save", exclusive=True)

    async def action_quit(self) -> None:
        if self.model is None or not self.model.dirty:
            self.exit(0)
            return
        self.run_worker(self._quit_after_asking(), group="save", exclusive=True)

    async def _quit_after_asking(self) -> None:
        answer = await self.push_screen_wait(
            ConfirmScreen(
                "Unsaved changes",
                "The plan has changes that are not saved. Save them before quitting?",
                [("Save", "save", "primary"), ("Discard", "discard", "error"), ("Cancel", "cancel", "default")],
            )
        )
        if answer == "discard" or (answer == "save" and await self._save()):
            self.exit(0)

    async def _save(self) -> bool:
        """Save the plan, asking what has to be asked; return whether it was written."""
        model = self.model
        assert model is not None
        if model.pending:
            self.notify("Saving once every parameter is laid out…", timeout=2)
            self._settle()
            while model.pending:
                await asyncio.sleep(0.05)

        accept = False
        errors = model.problems(("error",))
        if errors:
            if not await self._confirm_saving_errors(errors):
                return False
            accept = True

        path = self.output or self.saved_path
        if path is None:
            path = await self._ask_plan_path()
            if path is None:
                return False
        if path.exists() and not self.force and path != self._overwrite_confirmed:
            if not await self._confirm_overwrite(path):
                return False
            self._overwrite_confirmed = path

        plan = model.build_plan(accept_errors=accept)
        try:
            write_text_atomic(path, dumps_plan(plan, model.header()))
        except OSError as exc:
            self.notify(f"Could not write {path}: {exc.strerror or exc}", severity="error")
            return False
        model.dirty = False
        self.saved_path = path
        unchecked = model.hash_total - model.hashed if model.rank_set else 0
        note = f"; {unchecked} parameters are not byte-checked yet" if unchecked else ""
        self.notify(f"Saved {len(plan.rules)} rule{'s' if len(plan.rules) != 1 else ''} to {path}{note}")
        self._update_status()
        return True

    async def _confirm_saving_errors(self, errors: List[Tuple[str, str]]) -> bool:
        listing = "\n".join(f"• {message}" for _, message in errors[:5])
        if len(errors) > 5:
            listing += f"\n… and {len(errors) - 5} more"
        count = f"{len(errors)} parameters have errors" if len(errors) != 1 else "1 parameter has an error"
        answer = await self.push_screen_wait(
            ConfirmScreen(
                "Errors stand",
                f"{count}:\n{listing}\n\n"
                "A plan is not saved while an error stands. Save anyway? The plan then lists these "
                "errors under accepted_errors.",
                [("Save anyway", "save", "error"), ("Cancel", "cancel", "primary")],
            )
        )
        return answer == "save"

    async def _ask_plan_path(self) -> Optional[Path]:
        model = self.model
        default = str(model.plan_path) if model.plan_path is not None else "plan.toml"
        text = await self.push_screen_wait(
            PromptScreen("Save the plan", "Write the plan (TOML) to:", default, check=_check_plan_path, ok_label="Save")
        )
        return Path(text.strip()).expanduser() if text is not None else None

    async def _confirm_overwrite(self, path: Path) -> bool:
        answer = await self.push_screen_wait(
            ConfirmScreen(
                "Replace the file?",
                f"{path} exists. Replace it with the new plan?",
                [("Replace", "replace", "warning"), ("Cancel", "cancel", "primary")],
            )
        )
        return answer == "replace"


def _check_world_size(text: str) -> Optional[str]:
    try:
        value = int(text)
    except ValueError:
        return "enter a whole number"
    return None if value >= 1 else "the world size must be at least 1"


def _check_plan_path(text: str) -> Optional[str]:
    path = Path(text.strip()).expanduser()
    if not text.strip():
        return "enter a file name"
    if path.is_dir():
        return f"{path} is a directory"
    if not path.parent.exists():
        return f"the directory {path.parent} does not exist"
    return None
