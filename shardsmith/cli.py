"""The `shardsmith` command line: parses arguments, calls the library, prints results.

Results (tables, JSON) go to stdout; progress, warnings and errors go to stderr. Any
`ShardsmithError` becomes one message and a non-zero exit, with a traceback only under --debug.
MindSpore is imported only by the commands that run inside msrun.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import ShardsmithError

app = typer.Typer(
    name="shardsmith",
    help="Merge, split and reshard MindSpore model-parallel checkpoints by layout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True)


class _State:
    debug = False


logger = logging.getLogger("shardsmith")


def _version(value: bool) -> None:
    if value:
        stdout.print(f"shardsmith {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages to stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _State.debug = debug
    _raise_open_file_limit()
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], format="%(message)s", force=True)


def _raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: a rank set of 1024 ranks opens more files
    than the usual soft limit of 1024 (one per rank, and one more per memory map)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: keep the limit
        pass


def errors_to_exit(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ShardsmithError (or Ctrl-C) into one message on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ShardsmithError as exc:
            if _State.debug:
                raise
            stderr.print(f"[bold red]Error:[/] {escape(exc.format())}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("[bold red]Interrupted[/]; nothing was written.")
            raise typer.Exit(130) from None

    return wrapper


def _progress(description: str, enabled: bool = True):
    """Return (rich Progress or None, jobs.Progress callbacks) showing bytes moved on stderr."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from .jobs import Progress as Callbacks

    def warn(message: str) -> None:
        stderr.print(f"[yellow]Warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    if not enabled or not stderr.is_terminal:
        return None, Callbacks(warn=warn)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task(description, total=None)
    return bar, Callbacks(
        start=lambda total: bar.update(task, total=total),
        advance=lambda n: bar.advance(task, n),
        warn=warn,
    )


def _print_report(report: Any, json_output: bool) -> None:
    from rich.filesize import decimal

    if json_output:
        data = {
            "command": report.kind,
            "dry_run": report.dry_run,
            "output": str(report.target),
            "parameters": report.parameters,
            "bytes": report.total_bytes,
            "files": report.files,
            "warnings": report.warnings,
        }
        stdout.print_json(json.dumps(data))
        return
    verb = "would write" if report.dry_run else "wrote"
    noun = "parameter" if report.parameters == 1 else "parameters"
    stdout.print(
        f"{report.kind}: {verb} {report.parameters} {noun}, {decimal(report.total_bytes)} of tensor data, "
        f"to {report.target}",
        highlight=False,
        markup=False,
    )
    if len(report.files) > 1 or report.dry_run:
        table = Table(show_header=True, header_style="bold")
        table.add_column("file")
        table.add_column("tensor bytes" if report.dry_run else "file bytes", justify="right")
        if not report.dry_run:
            table.add_column("sha256")
        for f in report.files:
            row = [escape(str(f["path"])), f"{f.get('bytes', f.get('tensor_bytes', 0)):,}"]
            if not report.dry_run:
                row.append(str(f.get("sha256", ""))[:16])
            table.add_row(*row)
        stdout.print(table)


def _cipher(key_file: Optional[Path], enc_mode: Optional[str]):
    """Return the cipher for encrypted inputs, or None when no key is given (a plain run)."""
    from .encryption import cipher_from_options

    return cipher_from_options(key_file, enc_mode)


def _selection(include: List[str], exclude: List[str], weights_only: bool):
    from .engine import Selection

    return Selection(tuple(include), tuple(exclude), weights_only)


PATHS = typer.Argument(..., metavar="PATH...", help="A checkpoint file, a rank-set directory (rank_<r>/ subdirectories), or rank files in rank order.")
PLAN = typer.Option(..., "--plan", "-p", help="The plan (TOML) the source is laid out by.")
SELECT = typer.Option(None, "--select", help="Glob that picks one checkpoint per rank directory when a directory contains several.")
IN_FORMAT = typer.Option(None, "--input-format", help="Read sources as 'ckpt' or 'safetensors' whatever their suffix.")
OUT_FORMAT = typer.Option(None, "--format", help="Write 'ckpt' or 'safetensors' (default: from the output suffix, or the source's format).")
INCLUDE = typer.Option([], "--include", help="Only parameters matching this glob (repeatable).")
EXCLUDE = typer.Option([], "--exclude", help="Leave out parameters matching this glob (repeatable).")
WEIGHTS_ONLY = typer.Option(False, "--weights-only", help="Leave out optimizer states and optimizer scalars (an inference checkpoint).")
REPLICAS = typer.Option(None, "--replicas", help="Override every rule's policy for copies: 'check' (fail if they differ) or 'first' (take the lowest rank's, warn).")
FORCE = typer.Option(False, "--force", "-f", help="Replace an existing output.")
DRY_RUN = typer.Option(False, "--dry-run", help="Validate everything and say what would be written; write nothing.")
VERIFY = typer.Option(False, "--verify", help="Read the output back and compare it with the source before committing it.")
CRC = typer.Option(False, "--crc", help="Append MindSpore's crc_num trailer to each .ckpt written.")
PREFIX = typer.Option("checkpoint_", "--prefix", help="File name prefix in each rank_<r>/ directory: <prefix><r>.ckpt.")
JSON_OUT = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
MAX_INFLIGHT = typer.Option(32, "--max-inflight", min=1, help="Cap on the bytes queued for writing at once, in MiB; bounds the memory in flight.")
KEY_FILE = typer.Option(None, "--key-file", help="File holding the raw 16, 24 or 32 byte key of inputs MindSpore encrypted (or set SHARDSMITH_KEY to it in hex).")
ENC_MODE = typer.Option(None, "--enc-mode", help="Cipher of encrypted files: AES-GCM, AES-CBC or SM4-CBC (inputs: detected from the file).")
DEVICE = typer.Option(None, "--device", help="Under msrun: the device the collectives run on, set with mindspore.set_device before init() (CPU or Ascend). Default: MindSpore's.")
DISTRIBUTED = typer.Option(False, "--distributed", help="Run under msrun and divide the work over its workers (each worker writes its share); see README.")


def _check_replicas_option(value: Optional[str]) -> None:
    if value is not None and value not in ("check", "first"):
        raise ShardsmithError(f"--replicas must be 'check' or 'first', got '{value}'")


@app.command()
@errors_to_exit
def merge(
    sources: List[Path] = PATHS,
    plan: Path = PLAN,
    output: Path = typer.Option(..., "--output", "-o", help="The full checkpoint to write (.ckpt or .safetensors)."),
    include: List[str] = INCLUDE,
    exclude: List[str] = EXCLUDE,
    weights_only: bool = WEIGHTS_ONLY,
    replicas: Optional[str] = REPLICAS,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    output_format: Optional[str] = OUT_FORMAT,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    verify: bool = VERIFY,
    crc: bool = CRC,
    json_output: bool = JSON_OUT,
    quiet: bool = QUIET,
    max_inflight: int = MAX_INFLIGHT,
    key_file: Optional[Path] = KEY_FILE,
    enc_mode: Optional[str] = ENC_MODE,
    distributed: bool = DISTRIBUTED,
    device: Optional[str] = DEVICE,
) -> None:
    """Merge a rank set into one full checkpoint."""
    from . import jobs

    _check_replicas_option(replicas)
    if distributed:
        _run_distributed(
            "merge", sources, plan, output, selection=_selection(include, exclude, weights_only), replicas=replicas,
            select=select, input_format=input_format, output_format=output_format, force=force, crc_check=crc,
            device=device, refused={"--dry-run": dry_run, "--verify": verify},
        )
        return
    bar, callbacks = _progress("merging", not quiet)
    with bar or _nothing():
        report = jobs.merge(
            sources, plan, output, selection=_selection(include, exclude, weights_only), replicas=replicas,
            select=select, input_format=input_format, output_format=output_format, force=force, dry_run=dry_run,
            verify=verify, crc_check=crc, progress=callbacks, cipher=_cipher(key_file, enc_mode),
            max_inflight=max_inflight * 1024 * 1024,
        )
    _print_report(report, json_output)


@app.command()
@errors_to_exit
def split(
    full: Path = typer.Argument(..., help="The full checkpoint to split."),
    plan: Path = typer.Option(..., "--plan", "-p", help="The plan (TOML) of the rank set to write."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to receive rank_<r>/ subdirectories."),
    include: List[str] = INCLUDE,
    exclude: List[str] = EXCLUDE,
    weights_only: bool = WEIGHTS_ONLY,
    prefix: str = PREFIX,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    output_format: Optional[str] = OUT_FORMAT,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    verify: bool = VERIFY,
    crc: bool = CRC,
    json_output: bool = JSON_OUT,
    quiet: bool = QUIET,
    max_inflight: int = MAX_INFLIGHT,
    key_file: Optional[Path] = KEY_FILE,
    enc_mode: Optional[str] = ENC_MODE,
    distributed: bool = DISTRIBUTED,
    device: Optional[str] = DEVICE,
) -> None:
    """Split a full checkpoint into a rank set."""
    from . import jobs

    if distributed:
        _run_distributed(
            "split", [full], plan, output, selection=_selection(include, exclude, weights_only), prefix=prefix,
            input_format=input_format, output_format=output_format, force=force, crc_check=crc, device=device,
            refused={"--dry-run": dry_run, "--verify": verify},
        )
        return
    bar, callbacks = _progress("splitting", not quiet)
    with bar or _nothing():
        report = jobs.split(
            full, plan, output, selection=_selection(include, exclude, weights_only), prefix=prefix, select=select,
            input_format=input_format, output_format=output_format, force=force, dry_run=dry_run, verify=verify,
            crc_check=crc, progress=callbacks, cipher=_cipher(key_file, enc_mode),
            max_inflight=max_inflight * 1024 * 1024,
        )
    _print_report(report, json_output)


@app.command()
@errors_to_exit
def reshard(
    sources: List[Path] = PATHS,
    plan: Path = PLAN,
    to_plan: Path = typer.Option(..., "--to-plan", help="The plan (TOML) of the rank set to write."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to receive rank_<r>/ subdirectories."),
    include: List[str] = INCLUDE,
    exclude: List[str] = EXCLUDE,
    weights_only: bool = WEIGHTS_ONLY,
    replicas: Optional[str] = REPLICAS,
    prefix: str = PREFIX,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    output_format: Optional[str] = OUT_FORMAT,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    verify: bool = VERIFY,
    crc: bool = CRC,
    json_output: bool = JSON_OUT,
    quiet: bool = QUIET,
    max_inflight: int = MAX_INFLIGHT,
    key_file: Optional[Path] = KEY_FILE,
    enc_mode: Optional[str] = ENC_MODE,
    distributed: bool = DISTRIBUTED,
    device: Optional[str] = DEVICE,
) -> None:
    """Move a rank set to another layout or cluster size, without writing the full checkpoint."""
    from . import jobs

    _check_replicas_option(replicas)
    if distributed:
        _run_distributed(
            "reshard", sources, plan, output, to_plan=to_plan, selection=_selection(include, exclude, weights_only),
            replicas=replicas, prefix=prefix, select=select, input_format=input_format, output_format=output_format,
            force=force, crc_check=crc, device=device, refused={"--dry-run": dry_run, "--verify": verify},
        )
        return
    bar, callbacks = _progress("resharding", not quiet)
    with bar or _nothing():
        report = jobs.reshard(
            sources, plan, to_plan, output, selection=_selection(include, exclude, weights_only), replicas=replicas,
            prefix=prefix, select=select, input_format=input_format, output_format=output_format, force=force,
            dry_run=dry_run, verify=verify, crc_check=crc, progress=callbacks, cipher=_cipher(key_file, enc_mode),
            max_inflight=max_inflight * 1024 * 1024,
        )
    _print_report(report, json_output)


def _run_distributed(kind: str, *args: Any, refused: dict, **kwargs: Any) -> None:
    for option, given in refused.items():
        if given:
            raise ShardsmithError(f"{option} is not available with --distributed; run the command without --distributed")
    from .online.distributed import run_distributed

    code = run_distributed(kind, *args, **kwargs)
    if code:
        raise typer.Exit(code)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@app.command()
@errors_to_exit
def strategies(json_output: bool = JSON_OUT) -> None:
    """List the registered layout strategies, built-in and from plugins."""
    from .plugins import get_registry

    registry = get_registry()
    rows = []
    for item in registry.items():
        cls = item.cls
        options = [
            {"name": key, "type": opt.type, "required": opt.required, "default": None if opt.required else opt.default, "help": opt.help}
            for key, opt in cls.options.items()
        ]
        rows.append({"name": cls.name, "description": cls.description, "options": options, "source": item.source})
    if json_output:
        broken = [{"entry_point": b.entry_point, "distribution": b.distribution, "cause": b.cause} for b in registry.broken]
        stdout.print_json(json.dumps({"strategies": rows, "broken_plugins": broken}))
        return
    table = Table(show_header=True, header_style="bold", show_lines=True, expand=True)
    table.add_column("strategy", style="bold cyan", no_wrap=True)
    table.add_column("options", ratio=2)
    table.add_column("description", ratio=4)
    table.add_column("from", ratio=2)
    for row in rows:
        opts = "\n".join(f"{o['name']}: {o['type']}{_default_text(o)}" for o in row["options"])
        table.add_row(escape(row["name"]), escape(opts) or "-", escape(row["description"]), escape(row["source"]))
    stdout.print(table)


@app.command()
@errors_to_exit
def inspect(
    paths: List[Path] = PATHS,
    json_output: bool = JSON_OUT,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    like: Optional[Path] = typer.Option(None, "--like", help="A full checkpoint of the same network, for the full shapes of a rank set."),
    compare_bytes: bool = typer.Option(False, "--compare-bytes", help="Read every slice to tell replicated parameters (equal bytes on every rank) from split ones; reads all data."),
    key_file: Optional[Path] = KEY_FILE,
    enc_mode: Optional[str] = ENC_MODE,
) -> None:
    """List a checkpoint's parameters, or a rank set's with each rank's slice shape."""
    from rich.filesize import decimal

    from .inspection import inspect_paths

    report = inspect_paths(
        paths, select=select, format=input_format, like=like, compare_bytes=compare_bytes, cipher=_cipher(key_file, enc_mode)
    )
    if json_output:
        stdout.print_json(json.dumps(report.to_json()))
        return
    title = (
        f"rank set of {report.world_size} ranks, {len(report.params)} parameters"
        if report.is_rank_set
        else f"{report.paths[0]}: {len(report.params)} parameters"
    )
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("name", style="cyan", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape")
    if report.is_rank_set:
        table.add_column("slices")
        table.add_column("layout")
    table.add_column("bytes" if not report.is_rank_set else "all ranks", justify="right")
    total = 0
    unknown = 0
    for p in report.params:
        size = p.slice_bytes if report.is_rank_set else p.nbytes
        total += size
        shape = str(list(p.shape)) if p.shape is not None else "?"
        unknown += p.shape is None
        dtype = p.dtype if p.rank_dtypes is None else "[red]" + "/".join(sorted({d or "missing" for d in p.rank_dtypes})) + " (ranks differ)[/]"
        row = [escape(p.name), dtype, shape]
        if report.is_rank_set:
            row.append(_rank_shapes_text(p.rank_shapes))
            row.append(_layout_text(p.layout, p.layout_certain))
        row.append(decimal(size))
        table.add_row(*row)
    stdout.print(table)
    where = "in all rank files" if report.is_rank_set else "of tensor data"
    stdout.print(f"total {decimal(total)} {where}", highlight=False)
    if unknown:
        stdout.print(
            f"{unknown} full shape(s) shown as ? cannot be told from the slices alone; "
            "pass --like FULL.ckpt (a single-device checkpoint of the same network) or --compare-bytes",
            highlight=False,
        )


def _layout_text(layout: Optional[str], certain: Optional[bool]) -> str:
    if not layout or layout == "?":
        return "[yellow]?[/]"
    return layout if certain else f"[yellow]{layout} (guess)[/]"


def _rank_shapes_text(shapes: Optional[List[Any]]) -> str:
    if not shapes:
        return "-"
    if all(s == shapes[0] for s in shapes):
        return f"{len(shapes)} x {list(shapes[0]) if shapes[0] is not None else 'missing'}"
    return ", ".join(f"{r}:{list(s) if s is not None else 'missing'}" for r, s in enumerate(shapes))


class VerifyUsageError(ShardsmithError):
    exit_code = 2


@app.command()
@errors_to_exit
def verify(
    a: Path = typer.Argument(..., help="A checkpoint file or rank-set directory."),
    b: Path = typer.Argument(..., help="The checkpoint file or rank-set directory to compare with."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Compare values numerically with this relative tolerance."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Compare values numerically with this absolute tolerance."),
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    key_file: Optional[Path] = KEY_FILE,
    enc_mode: Optional[str] = ENC_MODE,
    json_output: bool = JSON_OUT,
) -> None:
    """Compare two checkpoints or rank sets: names, dtypes, shapes and bytes.

    Exits 0 when they are identical (or within tolerance), 1 when they differ, 2 when they cannot be compared.
    """
    from .verify import compare

    for option, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not (value >= 0 and value != float("inf")):
            raise VerifyUsageError(f"{option} must be a finite number of at least 0, got {value}")
    try:
        diffs = compare([a], [b], rtol=rtol, atol=atol, select=select, format=input_format, cipher=_cipher(key_file, enc_mode))
    except ShardsmithError as exc:
        # 1 means "they differ"; a comparison that could not be made is exit code 2.
        exc.exit_code = 2
        raise
    if json_output:
        stdout.print_json(json.dumps({"equal": not diffs, "differences": [d.__dict__ for d in diffs]}))
    elif diffs:
        for d in diffs:
            stdout.print(str(d), highlight=False, soft_wrap=True, markup=False)
        stderr.print(f"[bold red]{len(diffs)} difference(s)[/] between {escape(str(a))} and {escape(str(b))}", highlight=False)
    else:
        stdout.print(f"{a} and {b} are identical" + (" within tolerance" if rtol or atol else ""), highlight=False, markup=False)
    if diffs:
        raise typer.Exit(1)


@app.command()
@errors_to_exit
def plan(
    sources: List[Path] = PATHS,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to save the plan (TOML)."),
    existing: Optional[Path] = typer.Option(None, "--plan", "-p", help="Open this plan to edit it."),
    world_size: Optional[int] = typer.Option(None, "--world-size", "-n", min=1, help="World size to plan a split of a full checkpoint for."),
    auto: bool = typer.Option(False, "--auto", help="Infer the plan without a screen and print how sure each choice is."),
    like: Optional[Path] = typer.Option(None, "--like", help="A full checkpoint of the same network: the full shapes for --auto."),
    leave_undecided_replicated: bool = typer.Option(False, "--replicate-undecided", help="With --auto, write the parameters it cannot decide as replicated instead of failing."),
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    json_output: bool = JSON_OUT,
    force: bool = FORCE,
) -> None:
    """Assign a layout strategy to every parameter, in a full-screen app or with --auto."""
    from .tui.command import plan_command

    code = plan_command(
        sources=sources, output=output, plan=existing, world_size=world_size, auto=auto, like=like,
        leave_undecided_replicated=leave_undecided_replicated, select=select, format=input_format,
        json_output=json_output, force=force,
    )
    if code:
        raise typer.Exit(code)


@app.command()
@errors_to_exit
def gather(
    sources: List[Path] = PATHS,
    plan: Path = PLAN,
    output: Path = typer.Option(..., "--output", "-o", help="The full checkpoint rank 0 writes."),
    include: List[str] = INCLUDE,
    exclude: List[str] = EXCLUDE,
    weights_only: bool = WEIGHTS_ONLY,
    replicas: Optional[str] = REPLICAS,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    output_format: Optional[str] = OUT_FORMAT,
    force: bool = FORCE,
    device: Optional[str] = DEVICE,
) -> None:
    """Under msrun: each worker reads its own rank's file, AllGathers, rank 0 writes the full checkpoint."""
    from .online.gather import run_gather

    _check_replicas_option(replicas)
    code = run_gather(
        sources, plan, output, select=select, input_format=input_format, output_format=output_format, force=force,
        selection=_selection(include, exclude, weights_only), replicas=replicas, device=device,
    )
    if code:
        raise typer.Exit(code)


@app.command()
@errors_to_exit
def convert(
    sources: List[Path] = PATHS,
    output: Path = typer.Option(..., "--output", "-o", help="The file (for one checkpoint) or directory (for a rank set) to write."),
    output_format: Optional[str] = OUT_FORMAT,
    exclude: List[str] = EXCLUDE,
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="File holding the raw 16, 24 or 32 byte key of encrypted inputs (or set SHARDSMITH_KEY to it in hex)."),
    enc_mode: Optional[str] = typer.Option(None, "--enc-mode", help="Cipher of encrypted files: AES-GCM, AES-CBC or SM4-CBC (inputs: detected)."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt the .ckpt output with the key and --enc-mode."),
    crc: bool = CRC,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    verify: bool = VERIFY,
    json_output: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Change the format of a checkpoint or a rank set (ckpt <-> safetensors), or its encryption."""
    from . import convert as conversion
    from .encryption import cipher_from_options

    bar, callbacks = _progress("converting", not quiet)
    with bar or _nothing():
        report = conversion.convert(
            sources, output, format=output_format, select=select, input_format=input_format, exclude=exclude,
            cipher=cipher_from_options(key_file, enc_mode), encrypt=encrypt, crc_check=crc, force=force,
            dry_run=dry_run, verify=verify, progress=callbacks,
        )
    _print_report(report, json_output)


strategy_app = typer.Typer(
    help="Import and export MindSpore strategy files (the layouts of auto-parallel jobs).",
    no_args_is_help=True,
)
app.add_typer(strategy_app, name="strategy")


@strategy_app.command("import")
@errors_to_exit
def strategy_import(
    strategy_file: Path = typer.Argument(..., help="A MindSpore strategy file (protobuf ParallelStrategyMap, or its JSON form)."),
    output: Path = typer.Option(..., "--output", "-o", help="The TOML plan to write."),
    world_size: Optional[int] = typer.Option(None, "--world-size", "-n", min=1, help="World size of the plan (default: from the device matrices)."),
    force: bool = FORCE,
) -> None:
    """Write the plan a MindSpore strategy file describes, one tensor_map rule per parameter."""
    from .strategy_file import import_to_toml

    plan_obj = import_to_toml(strategy_file, output, world_size=world_size, force=force)
    stdout.print(f"wrote {output}: world_size {plan_obj.world_size}, {len(plan_obj.rules)} rules", highlight=False, markup=False)


@strategy_app.command("export")
@errors_to_exit
def strategy_export(
    sources: List[Path] = PATHS,
    plan: Path = typer.Option(..., "--plan", "-p", help="The plan to express as a strategy file."),
    output: Path = typer.Option(..., "--output", "-o", help="The strategy file to write (.json for JSON, anything else protobuf)."),
    only_split: bool = typer.Option(False, "--only-split", help="Leave replicated parameters out of the file."),
    select: Optional[str] = SELECT,
    input_format: Optional[str] = IN_FORMAT,
    force: bool = FORCE,
) -> None:
    """Write a plan, applied to a checkpoint or rank set, as a strategy file MindSpore's tools read."""
    from .plan import load_plan
    from .strategy_file import export_strategy_file

    count = export_strategy_file(
        load_plan(plan), sources, output, select=select, input_format=input_format, only_split=only_split, force=force
    )
    stdout.print(f"wrote {output}: {count} parameters", highlight=False, markup=False)


def _default_text(option: dict) -> str:
    if option["required"]:
        return ""
    return " (optional)" if option["default"] is None else f" = {option['default']!r}"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
