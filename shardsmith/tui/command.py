"""`shardsmith plan`: open the plan editor, or with `--auto` infer a plan without a screen.

The command line only parses arguments and calls `plan_command`. Bad input raises a
ShardsmithError for the command line to print. Everything else is decided here, including the
exit code: `--auto` returns 1 when some parameter stays undecided, unless
`--replicate-undecided` is given, and then writes no plan.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..errors import PlanError, ShardsmithError
from ..plan import Plan, dumps_plan, load_plan
from ..rankset import Source, open_source
from .model import shape_text, write_text_atomic

EXIT_UNDECIDED = 1

# The command line's name for `plan_command(leave_undecided_replicated=True)`, for messages.
REPLICATE_UNDECIDED_OPTION = "--replicate-undecided"


def source_label(sources: Sequence[Path]) -> str:
    if len(sources) == 1:
        return str(sources[0])
    return f"{sources[0]} … {sources[-1]} ({len(sources)} files)"


def plan_command(
    sources: List[Path],
    output: Optional[Path],
    plan: Optional[Path],
    world_size: Optional[int],
    auto: bool,
    like: Optional[Path],
    leave_undecided_replicated: bool,
    select: Optional[str],
    format: Optional[str],
    json_output: bool,
    force: bool,
    *,
    stdout: Optional[Console] = None,
    stderr: Optional[Console] = None,
) -> int:
    """Run `shardsmith plan` and return its exit code; bad input raises a ShardsmithError."""
    from ..output import check_target

    stdout = stdout or Console(soft_wrap=True)
    stderr = stderr or Console(stderr=True)
    if auto:
        if plan is not None:
            raise PlanError("--auto infers a new plan; --plan opens an existing one in the editor. Give one of them")
        if output is not None:
            check_target(output, force, directory=False)
    else:
        if json_output or leave_undecided_replicated:
            option = "--json" if json_output else REPLICATE_UNDECIDED_OPTION
            raise PlanError(f"{option} applies to --auto only")
        if output is not None and not output.parent.exists():
            raise ShardsmithError("the output's parent directory does not exist", path=output.parent)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise ShardsmithError(
                "the plan editor needs a terminal", hint="Run it in a terminal, or infer a plan with --auto -o PLAN"
            )
    existing = load_plan(plan) if plan is not None else None

    # The editor opens with headers only (a CRC check reads whole files); its background hashing
    # compares the bytes. --auto reads every byte anyway, and a corrupt file would mislead it.
    source = open_source(sources, select, format, verify_crc=auto)
    if output is not None:
        # A plan saved over a checkpoint it was made from would destroy that checkpoint, --force or not.
        inputs = [*source.paths, *([Path(like)] if like is not None else [])]
        try:
            check_target(output, True, directory=False, inputs=inputs)
        except ShardsmithError:
            source.close()
            raise
    try:
        label = source_label(sources)
        if auto:
            return run_auto(
                source,
                label,
                output=output,
                world_size=world_size,
                like=like,
                leave_undecided_replicated=leave_undecided_replicated,
                json_output=json_output,
                format=format,
                stdout=stdout,
                stderr=stderr,
            )
        return run_editor(
            source, label, output=output, plan=existing, world_size=world_size, force=force, like=like, format=format
        )
    finally:
        source.close()


def run_editor(
    source: Source,
    label: str,
    *,
    output: Optional[Path],
    plan: Optional[Plan],
    world_size: Optional[int],
    force: bool,
    like: Optional[Path] = None,
    format: Optional[str] = None,
) -> int:
    """Run the editor; `like` gives the full shapes each layout is checked against, and that `i` infers from."""
    from ..infer import open_reference
    from .app import PlanApp

    if source.world_size == 1:
        if like is not None:
            raise PlanError(
                "--like gives the full shapes of a rank set, but the source is already one full checkpoint",
                path=source.paths[0],
            )
        if world_size is None and plan is not None:
            world_size = plan.world_size
    reference = open_reference(like, format, verify_crc=False) if like is not None else None
    try:
        app = PlanApp(
            source, label=label, world_size=world_size, plan=plan, output=output, force=force, reference=reference
        )
        code = app.run()
    finally:
        if reference is not None:
            reference.close()
    return int(code or 0)


def run_auto(
    source: Source,
    label: str,
    *,
    output: Optional[Path],
    world_size: Optional[int],
    like: Optional[Path],
    leave_undecided_replicated: bool,
    json_output: bool,
    format: Optional[str] = None,
    stdout: Console,
    stderr: Console,
) -> int:
    """Infer a plan, print it as a table (or JSON), and write it unless something stays undecided."""
    from ..infer import infer_plan, open_reference

    if source.world_size == 1:
        raise ShardsmithError(
            "is a single checkpoint; --auto infers the layout of a rank set",
            path=source.paths[0],
            hint="Give the rank set's directory (with rank_0/, rank_1/, …) or its files in rank order",
        )
    if world_size is not None and world_size != source.world_size:
        raise PlanError(f"--world-size {world_size} disagrees with the rank set, which has {source.world_size} ranks")

    reference = open_reference(like, format) if like is not None else None
    try:
        result = _infer_with_progress(source, reference, leave_undecided_replicated, stderr, infer_plan)
    finally:
        if reference is not None:
            reference.close()

    undecided = result.undecided
    blocked = bool(undecided) and not leave_undecided_replicated
    header = auto_header(label, source.world_size, like, undecided if leave_undecided_replicated else [])
    text = dumps_plan(result.plan, header)
    written = None
    if output is not None and not blocked:
        write_text_atomic(output, text)
        written = output

    if json_output:
        # Written as is: Rich's JSON highlighting takes seconds and hundreds of MB on 10,000 parameters.
        document = json.dumps(auto_json(source, result, like, None if blocked else text, written), indent=2)
        stdout.file.write(document + "\n")
        stdout.file.flush()
    else:
        stdout.print(auto_table(source, result))

    for name, problem in result.problems.items():
        stderr.print(Text(f"Warning: {problem}" if name in problem else f"Warning: {name}: {problem}", style="yellow"))
    certain = sum(1 for i in result.inferences.values() if i.decided and i.certain)
    likely = sum(1 for i in result.inferences.values() if i.decided and not i.certain)
    stderr.print(
        f"{len(result.inferences)} parameters: {certain} certain, {likely} likely (the first of several "
        f"layouts that fit), {len(undecided)} undecided",
        highlight=False,
    )
    if blocked:
        listed = ", ".join(undecided[:10]) + (f", … ({len(undecided)} in all)" if len(undecided) > 10 else "")
        stderr.print(
            Text(
                f"Error: cannot decide the layout of {listed}. No plan was written. Give --like FULL.ckpt "
                f"(a single-device checkpoint of the same network), or {REPLICATE_UNDECIDED_OPTION} to "
                "replicate them, or assign them in the editor (shardsmith plan without --auto).",
                style="red",
            )
        )
        return EXIT_UNDECIDED
    if written is not None:
        stderr.print(f"Wrote {len(result.plan.rules)} rules to {written}", highlight=False, markup=False)
    elif output is None:
        stderr.print("No -o PLAN given: the plan was not written.", highlight=False)
    return 0


def _infer_with_progress(source, reference, leave_undecided_replicated, stderr: Console, infer_plan):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not stderr.is_terminal:
        return infer_plan(source, reference, leave_undecided_replicated=leave_undecided_replicated)
    with Progress(
        TextColumn("inferring layouts"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        console=stderr, transient=True,
    ) as progress:
        task = progress.add_task("", total=len(source.names))

        def advance(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, description=name)

        return infer_plan(source, reference, leave_undecided_replicated=leave_undecided_replicated, progress=advance)


def auto_header(label: str, world_size: int, like: Optional[Path], left_replicated: Sequence[str]) -> List[str]:
    now = datetime.datetime.now().astimezone()
    lines = [
        f"Inferred by shardsmith {__version__} plan --auto on {now:%Y-%m-%d %H:%M %Z}".rstrip(),
        f"source: {label} (rank set of {world_size} ranks)",
    ]
    if like is not None:
        lines.append(f"full shapes from: {like}")
    if left_replicated:
        shown = ", ".join(left_replicated[:8]) + (", …" if len(left_replicated) > 8 else "")
        lines.append(f"undecided, left replicated: {shown}")
    return lines


def _sure(inference) -> Text:
    if not inference.decided:
        return Text("undecided", style="bold red")
    if inference.certain:
        return Text("certain", style="green")
    return Text("likely", style="yellow")


# Past this many rows the evidence column is cut to one line: wrapping it doubles the time Rich
# takes, about 0.5 ms a row on a loaded 2-core machine. --json always has it in full.
WRAP_EVIDENCE_ROWS = 2000


def auto_table(source: Source, result) -> Table:
    wrap = len(source.names) <= WRAP_EVIDENCE_ROWS
    table = Table(title="Inferred layouts", title_justify="left", show_lines=False, header_style="bold")
    table.add_column("parameter", overflow="fold")
    table.add_column("slice", no_wrap=True)
    table.add_column("full", no_wrap=True)
    table.add_column("inferred", no_wrap=True)
    table.add_column("sure", no_wrap=True)
    table.add_column("evidence", overflow="fold" if wrap else "ellipsis", no_wrap=not wrap, ratio=1)
    for name in source.names:
        inference = result.inferences[name]
        info = source.info(name)
        style = "red" if not inference.decided else ""
        table.add_row(
            Text(name, style=style),
            shape_text(info.shape) if info is not None else "?",
            shape_text(inference.full_shape) if inference.full_shape is not None else "?",
            Text(inference.summary, style=style or ("dim" if inference.follows else "")),
            _sure(inference),
            Text(inference.reason, style="dim"),
        )
    return table


def auto_json(source: Source, result, like: Optional[Path], plan_text: Optional[str], written: Optional[Path]) -> Dict[str, Any]:
    params = []
    for name in source.names:
        info = source.info(name)
        entry = {"dtype": info.dtype, "slice_shape": list(info.shape)}
        entry.update(result.inferences[name].to_json())
        params.append(entry)
    return {
        "source": [str(p) for p in source.paths],
        "world_size": source.world_size,
        "like": str(like) if like is not None else None,
        "params": params,
        "undecided": list(result.undecided),
        "problems": dict(result.problems),
        "plan": plan_text,
        "output": str(written) if written is not None else None,
    }
