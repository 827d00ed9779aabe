#!/usr/bin/env python
"""Time shardsmith's merge, split and reshard against cat and against MindSpore's own tools.

Run from the repository root, with the project's venv and GNU time (/usr/bin/time, Debian
package `time`):

    .venv/bin/python benchmarks/run.py

which takes about 15 minutes on 2 cores and needs about 25 GB of free disk. Options:
`--sizes 512M,4G` (model sizes), `--repeat 3` (runs per shardsmith and cat measurement),
`--mindspore-sizes 512M` (sizes at which the MindSpore baselines run: they need about 5x the
model size in memory), `--mindspore-repeat 2`, `--work DIR` (scratch directory, default a
temporary one), `--json FILE` (raw numbers). benchmarks/RESULTS.md shows the results.

For each size the script generates a model checkpoint of random bytes whose parameters use
every kind of layout: `row`, `column`, `grid`, `replicate`, and `tensor_map`/`row` layouts
with data-parallel copies. It splits the model into an 8-rank set (the source of the other
operations) and then times, each in a fresh child process with the page cache warm:

- shardsmith `merge` (8 ranks -> full), `split` (full -> 8 ranks), `reshard` 8 -> 4 (a new
  layout for every split parameter) and `reshard` 8 -> 7 (a cluster size that 8 does not
  divide), and the merge once more with its inputs evicted from the page cache;
- `cat` writing the same bytes: every file shardsmith wrote, copied by `cat` to a new file, with
  and without `sync FILE…` (shardsmith fsyncs its output before it renames it into place);
- `load_checkpoint` + numpy slicing + `save_checkpoint` doing the same work;
- `mindspore.transform_checkpoints` with strategy files equivalent to the plans (it cannot go
  from 8 to 7 ranks, which is reported as such).

The commands of one operation take turns, round by round, and the fastest run of each is
reported: on a machine shared with other work that is the least disturbed estimate. Wall time
is measured around each child process; CPU time and peak RSS are what GNU time reports for it
(the kernel's counts, mapped file pages included). Every output is checked: the merge must
reproduce the generated checkpoint byte for byte, and every MindSpore output must be equal
(`shardsmith verify`) to shardsmith's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SHARDSMITH = [PYTHON, "-m", "shardsmith.cli"]
MIB = 1024 * 1024
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)

# The model is built from these; every dim that any plan splits divides by 56 = 8 * 7.
HIDDEN = 1792
VOCAB = 8960


@dataclass(frozen=True)
class Split:
    """One parameter family's layout on one cluster: the plan rule and MindSpore's equivalent."""

    rule: Dict[str, object]  # plan options besides `match`
    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[int, ...]


@dataclass(frozen=True)
class Family:
    """Parameters that share a name suffix, shape, dtype and layouts (one per layer)."""

    suffix: str
    shape: Tuple[int, ...]
    dtype: str
    layouts: Dict[str, Split]  # "src8", "dst4", "dst7"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"Float32": 4, "Float16": 2}[self.dtype]


def _row(world: int, parts: Optional[int] = None, ndim: int = 2) -> Split:
    parts = parts or world
    rule = {"strategy": "row"} if parts == world else {"strategy": "row", "parts": parts}
    return Split(rule, (world // parts, parts), (0,) + (-1,) * (ndim - 1))


def _column(world: int, parts: Optional[int] = None) -> Split:
    parts = parts or world
    rule = {"strategy": "column"} if parts == world else {"strategy": "column", "parts": parts}
    return Split(rule, (world // parts, parts), (-1, 0))


def _grid(world: int, a: int, b: int) -> Split:
    return Split({"strategy": "grid", "grid": [a, b]}, (world // (a * b), a, b), (1, 0))


def _tensor_map(dev_matrix: Tuple[int, ...], tensor_map: Tuple[int, ...]) -> Split:
    rule = {"strategy": "tensor_map", "dev_matrix": list(dev_matrix), "tensor_map": list(tensor_map)}
    return Split(rule, dev_matrix, tensor_map)


def _replicate(world: int, ndim: int) -> Split:
    return Split({"strategy": "replicate"}, (world,), (-1,) * ndim)


h, v = HIDDEN, VOCAB
EMBEDDING = Family(
    "embedding.weight", (v, h), "Float32",
    {"src8": _row(8), "dst4": _column(4), "dst7": _row(7)},
)
LAYER = (
    Family("attention.wqkv.weight", (3 * h, h), "Float32",
           {"src8": _grid(8, 2, 4), "dst4": _row(4), "dst7": _column(7)}),
    Family("attention.wo.weight", (h, h), "Float32",
           {"src8": _column(8), "dst4": _row(4), "dst7": _row(7)}),
    Family("mlp.w1.weight", (4 * h, h), "Float16",
           {"src8": _row(8), "dst4": _column(4), "dst7": _column(7)}),
    # Split 4 ways over the last axis of a [2, 4] device matrix: ranks r and r + 4 hold copies.
    Family("mlp.w2.weight", (h, 4 * h), "Float16",
           {"src8": _tensor_map((2, 4), (-1, 0)), "dst4": _grid(4, 2, 2), "dst7": _row(7)}),
    Family("mlp.w3.weight", (4 * h, h), "Float16",
           {"src8": _row(8, parts=4), "dst4": _column(4, parts=2), "dst7": _row(7)}),
    Family("mlp.w1.bias", (4 * h,), "Float16",
           {"src8": _replicate(8, 1), "dst4": _replicate(4, 1), "dst7": _replicate(7, 1)}),
    Family("norm.weight", (h,), "Float32",
           {"src8": _replicate(8, 1), "dst4": _replicate(4, 1), "dst7": _replicate(7, 1)}),
)
WORLD = {"src8": 8, "dst4": 4, "dst7": 7}


def model(size: int) -> List[Tuple[str, Family]]:
    """Return (name, family) for a model of about `size` bytes: the embedding plus whole layers."""
    per_layer = sum(f.nbytes for f in LAYER)
    layers = max(1, round((size - EMBEDDING.nbytes) / per_layer))
    params = [(EMBEDDING.suffix, EMBEDDING)]
    for i in range(layers):
        params += [(f"layers.{i}.{f.suffix}", f) for f in LAYER]
    return params


def write_plan(key: str, path: Path) -> None:
    lines = [f"world_size = {WORLD[key]}", ""]
    for family in (EMBEDDING,) + LAYER:
        lines.append("[[param]]")
        lines.append(f'match = "*{family.suffix}"')
        for option, value in family.layouts[key].rule.items():
            lines.append(f"{option} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))


def write_strategy(params: Sequence[Tuple[str, Family]], key: str, path: Path) -> None:
    """Write MindSpore's strategy file for the layouts `key` of every parameter."""
    from mindspore.train import node_strategy_pb2

    strategy = node_strategy_pb2.ParallelStrategyMap()
    strategy.current_stage = 0
    for name, family in params:
        split = family.layouts[key]
        item = strategy.parallel_layout_item.add()
        item.param_name = name
        layouts = item.parallel_layouts
        layouts.dev_matrix.add().dim.extend(split.dev_matrix)
        layouts.tensor_map.add().dim.extend(split.tensor_map)
        layouts.param_split_shape.add()
        layouts.indices_offset.add()
        layouts.field = 0
        layouts.opt_weight_shard_step = 0
        layouts.opt_weight_shard_size = 0
    path.write_bytes(strategy.SerializeToString())


def write_model(params: Sequence[Tuple[str, Family]], path: Path) -> None:
    """Write a full checkpoint of random bytes with shardsmith's own (MindSpore-identical) writer."""
    from shardsmith import dtypes
    from shardsmith.formats import TensorInfo, open_writer

    entries = [TensorInfo(n, f.dtype, f.shape, f.nbytes) for n, f in params]
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_writer(path, entries, "ckpt") as writer:
        for (name, family), info in zip(params, entries):
            data = np.frombuffer(rng.bytes(info.nbytes), dtypes.storage_dtype(info.dtype)).reshape(info.shape)
            writer.write(name, data)


# -- measuring child processes ------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes
    returncode: int
    cpu: float = 0.0  # user + system seconds of the child and its children
    log: str = ""


def run_child(argv: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None) -> Run:
    """Run `argv`, and return its wall time and the peak RSS the kernel recorded for it.

    GNU time reports the peak RSS: a child forked straight from this process would inherit this
    process's high-water mark (Linux keeps it across fork and exec), and GNU time is small.
    """
    rss_file = log.with_suffix(".rss")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO)
        seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    # GNU time writes "Command exited with non-zero status N" first when the command fails.
    kib, user, system = rss_file.read_text().strip().splitlines()[-1].split()
    return Run(seconds, int(kib) * 1024, proc.returncode, float(user) + float(system), text[-2000:])


def warm(paths: Sequence[Path]) -> None:
    """Read every file once so that the timed runs find them in the page cache."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()]
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def evict(paths: Sequence[Path]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED), for a cold-cache run."""
    os.sync()
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def settle() -> None:
    """Write back dirty pages so one run's writeback does not slow the next."""
    os.sync()


def output_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix == ".ckpt")


@dataclass
class Measured:
    runs: List[Run] = field(default_factory=list)
    note: str = ""
    equal: Optional[bool] = None  # the output checked against shardsmith's, where asked

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    # The fastest run: on a machine shared with other work it is the least disturbed estimate.
    @property
    def seconds(self) -> float:
        return min(r.seconds for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)

    @property
    def cpu(self) -> float:
        return min(r.cpu for r in self.runs)


@dataclass
class Command:
    """One measured command: what it reads (warmed or evicted first) and what it writes."""

    argv: List[str]
    inputs: List[Path]
    output: Path
    cold: bool = False
    reference: Optional[Path] = None  # compare the last output with this one (`shardsmith verify`)


def measure(commands: Dict[str, Command], repeat: int, logs: Path) -> Dict[str, Measured]:
    """Run every command `repeat` times, taking turns, so that a busy machine slows them alike.

    Each run starts with its inputs in the page cache (or evicted from it, for a cold run) and no
    dirty pages, and its output is removed after it.
    """
    results = {label: Measured() for label in commands}
    for i in range(repeat):
        for label, command in commands.items():
            if results[label].note:
                continue
            _remove(command.output)
            (evict if command.cold else warm)(command.inputs)
            settle()
            run = run_child(command.argv, logs / f"{label}.{i}.log".replace(" ", "_"))
            results[label].runs.append(run)
            settle()
            if run.returncode != 0:
                results[label].note = run.log.strip().splitlines()[-1] if run.log.strip() else f"exit {run.returncode}"
            elif command.reference is not None and i == repeat - 1:
                results[label].equal = same_output(command.output, command.reference, logs / f"{label}.verify.log")
            _remove(command.output)
    return results


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    # A merge writes its manifest beside the checkpoint.
    path.with_name(path.name + ".manifest.json").unlink(missing_ok=True)


def cat_command(files: Sequence[Path], source_root: Path, target_root: Path, sync: bool) -> List[str]:
    """Build a shell command that copies `files` with cat to the same places under `target_root`."""
    steps = []
    targets = []
    for path in files:
        target = target_root / path.relative_to(source_root) if path != source_root else target_root
        targets.append(target)
        steps.append(f"mkdir -p '{target.parent}' && cat '{path}' > '{target}'")
    if sync:
        steps.append("sync " + " ".join(f"'{t}'" for t in targets))
    return ["sh", "-c", " && ".join(steps)]


# -- the MindSpore baselines, run as `run.py --child ...` ----------------------------------


def _layouts(params: Sequence[Tuple[str, Family]], key: str):
    from shardsmith.layout import from_tensor_map

    return {n: from_tensor_map(f.shape, f.layouts[key].dev_matrix, f.layouts[key].tensor_map) for n, f in params}


def _load_rank_set(directory: Path) -> List[dict]:
    import mindspore as ms

    ranks = sorted(directory.glob("rank_*"), key=lambda p: int(p.name.split("_")[1]))
    return [ms.load_checkpoint(str(next(r.glob("*.ckpt")))) for r in ranks]


def _assemble_full(params, loaded: List[dict], layouts) -> Dict[str, np.ndarray]:
    full = {}
    for name, family in params:
        layout = layouts[name]
        first = loaded[0][name].asnumpy()
        array = np.empty(family.shape, first.dtype)
        for rank, piece in layout.main_pieces():
            array[piece.full.slices()] = loaded[rank][name].asnumpy()[piece.local.slices()]
        full[name] = array
    return full


def _save_rank_set(params, full: Dict[str, np.ndarray], key: str, directory: Path) -> None:
    import mindspore as ms

    layouts = _layouts(params, key)
    for rank in range(WORLD[key]):
        records = []
        for name, _ in params:
            (piece,) = layouts[name].pieces[rank]
            records.append({"name": name, "data": ms.Tensor(np.ascontiguousarray(full[name][piece.full.slices()]))})
        (directory / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(records, str(directory / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))


def child(args: argparse.Namespace) -> None:
    """Run the MindSpore side of one measurement, in this child process."""
    import mindspore as ms

    params = model(args.size)
    src, out = Path(args.src), Path(args.out)
    if args.child == "naive-merge":
        full = _assemble_full(params, _load_rank_set(src), _layouts(params, "src8"))
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(full[n])} for n, _ in params], str(out))
    elif args.child == "naive-split":
        loaded = ms.load_checkpoint(str(src))
        _save_rank_set(params, {n: loaded[n].asnumpy() for n, _ in params}, "src8", out)
    elif args.child == "naive-reshard":
        full = _assemble_full(params, _load_rank_set(src), _layouts(params, "src8"))
        _save_rank_set(params, full, args.to, out)
    elif args.child == "transform":
        ms.transform_checkpoints(str(src), str(out), "checkpoint_", args.src_strategy or None, args.dst_strategy or None)
    else:
        raise SystemExit(f"unknown child {args.child}")


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class Operation:
    name: str
    argv: List[str]
    inputs: List[Path]
    output: Path
    naive: Optional[List[str]] = None
    transform: Optional[List[str]] = None
    transform_output: Optional[Path] = None  # where transform_checkpoints writes, when not `output`


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def size_label(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / MIB:g} MiB"


def bench_size(size: int, work: Path, repeat: int, with_mindspore: bool, ms_repeat: int) -> Dict[str, object]:
    params = model(size)
    total = sum(f.nbytes for _, f in params)
    largest = max(f.nbytes for _, f in params)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    full = work / "full" / "rank_0" / "model.ckpt"
    rankset = work / "src8"
    plans = {key: work / f"{key}.toml" for key in WORLD}
    for key, path in plans.items():
        write_plan(key, path)
    print(f"\n## {size_label(size)}: {len(params)} parameters, {total / MIB:.0f} MiB, largest {largest / MIB:.2f} MiB",
          flush=True)
    started = time.perf_counter()
    write_model(params, full)
    if rankset.exists():
        shutil.rmtree(rankset)
    subprocess.run(SHARDSMITH + ["split", str(full), "--plan", str(plans["src8"]), "-o", str(rankset), "-q"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"generated in {time.perf_counter() - started:.1f} s", flush=True)

    strategies = {}
    if with_mindspore:
        for key in WORLD:
            strategies[key] = work / f"{key}.strategy.ckpt"
            write_strategy(params, key, strategies[key])

    me = [PYTHON, str(Path(__file__).resolve()), "--sizes", str(size)]
    out = work / "out"
    ops = [
        Operation("merge 8 -> 1", SHARDSMITH + ["merge", str(rankset), "--plan", str(plans["src8"]), "-o", str(out / "merged.ckpt"), "-q"],
                  [rankset], out / "merged.ckpt",
                  me + ["--child", "naive-merge", "--src", str(rankset), "--out", str(out / "merged.ckpt")],
                  me + ["--child", "transform", "--src", str(rankset), "--out", str(out / "merged"),
                        "--src-strategy", str(strategies.get("src8", ""))],
                  out / "merged"),
        Operation("split 1 -> 8", SHARDSMITH + ["split", str(full), "--plan", str(plans["src8"]), "-o", str(out / "split"), "-q"],
                  [full], out / "split",
                  me + ["--child", "naive-split", "--src", str(full), "--out", str(out / "split")],
                  me + ["--child", "transform", "--src", str(full.parent.parent), "--out", str(out / "split"),
                        "--dst-strategy", str(strategies.get("src8", ""))]),
        Operation("reshard 8 -> 4", SHARDSMITH + ["reshard", str(rankset), "--plan", str(plans["src8"]), "--to-plan", str(plans["dst4"]),
                                                  "-o", str(out / "dst4"), "-q"],
                  [rankset], out / "dst4",
                  me + ["--child", "naive-reshard", "--to", "dst4", "--src", str(rankset), "--out", str(out / "dst4")],
                  me + ["--child", "transform", "--src", str(rankset), "--out", str(out / "dst4"),
                        "--src-strategy", str(strategies.get("src8", "")), "--dst-strategy", str(strategies.get("dst4", ""))]),
        Operation("reshard 8 -> 7", SHARDSMITH + ["reshard", str(rankset), "--plan", str(plans["src8"]), "--to-plan", str(plans["dst7"]),
                                                  "-o", str(out / "dst7"), "-q"],
                  [rankset], out / "dst7",
                  me + ["--child", "naive-reshard", "--to", "dst7", "--src", str(rankset), "--out", str(out / "dst7")],
                  me + ["--child", "transform", "--src", str(rankset), "--out", str(out / "dst7"),
                        "--src-strategy", str(strategies.get("src8", "")), "--dst-strategy", str(strategies.get("dst7", ""))]),
    ]

    results: Dict[str, object] = {"size": size, "bytes": total, "largest_parameter": largest, "operations": {}}
    out.mkdir(exist_ok=True)
    for op in ops:
        label = op.name.replace(" ", "").replace(">", "")
        # A first run writes the files that cat copies and that the other outputs are checked against.
        first = run_child(op.argv, logs / f"shardsmith-{label}.first.log")
        if first.returncode != 0:
            raise SystemExit(f"shardsmith {op.name} failed:\n{first.log}")
        if op.name.startswith("merge"):
            _check_same_file(op.output, full)
        reference = work / ("reference" + op.output.suffix)
        _remove(reference)
        op.output.rename(reference)
        files = output_files(reference)
        copy = work / "catcopy"
        commands = {
            "shardsmith": Command(op.argv, op.inputs, op.output),
            "cat": Command(cat_command(files, reference, copy, sync=False), files, copy),
            "cat_fsync": Command(cat_command(files, reference, copy, sync=True), files, copy),
        }
        if op.name.startswith("merge"):
            commands["shardsmith_cold"] = Command(op.argv, op.inputs, op.output, cold=True)
            commands["cat_fsync_cold"] = Command(cat_command(files, reference, copy, sync=True), files, copy, cold=True)
        if with_mindspore:
            for kind, argv in (("naive", op.naive), ("transform", op.transform)):
                produced = op.transform_output if kind == "transform" and op.transform_output else op.output
                commands[kind] = Command(argv, op.inputs, produced, reference=reference)
        measured = measure({k: c for k, c in commands.items() if k not in ("naive", "transform")}, repeat, logs)
        measured.update(measure({k: c for k, c in commands.items() if k in ("naive", "transform")}, ms_repeat, logs))
        row: Dict[str, object] = {"bytes_written": sum(p.stat().st_size for p in files)}
        for key, m in measured.items():
            row[key] = _summary(m)
        _remove(reference)
        results["operations"][op.name] = row
        _print_row(op.name, row)

    results["startup"] = bench_startup(rankset, logs, repeat)
    return results


def bench_startup(rankset: Path, logs: Path, repeat: int) -> Dict[str, object]:
    """Time `shardsmith --help` and `shardsmith inspect` of the rank set, and check the imports."""
    times = {}
    for label, argv in (("help", SHARDSMITH + ["--help"]), ("inspect", SHARDSMITH + ["inspect", str(rankset)])):
        runs = [run_child(argv, logs / f"{label}.log") for _ in range(max(repeat, 5))]
        times[label] = {"seconds": statistics.median(r.seconds for r in runs), "peak_rss": max(r.peak_rss for r in runs)}
    probe = subprocess.run([PYTHON, "-X", "importtime", "-m", "shardsmith.cli", "inspect", str(rankset)],
                           capture_output=True, text=True, cwd=REPO)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in probe.stderr.splitlines() if "|" in line}
    times["imports_mindspore"] = "mindspore" in imported
    print(f"\nshardsmith --help {times['help']['seconds']:.3f} s, inspect {times['inspect']['seconds']:.3f} s, "
          f"imports mindspore: {times['imports_mindspore']}", flush=True)
    return times


def _summary(m: Measured) -> Dict[str, object]:
    if not m.ok:
        return {"ok": False, "note": m.note}
    return {"ok": True, "seconds": m.seconds, "cpu": m.cpu, "peak_rss": m.peak_rss, "equal": m.equal,
            "runs": [r.seconds for r in m.runs]}


def _check_same_file(a: Path, b: Path) -> None:
    if subprocess.run(["cmp", "-s", str(a), str(b)]).returncode != 0:
        raise SystemExit(f"the merged checkpoint {a} differs from the generated model {b}")


def same_output(produced: Path, reference: Path, log: Path) -> bool:
    """Compare another tool's output with shardsmith's (`shardsmith verify`: names, dtypes, shapes, bytes)."""
    if reference.is_file() and produced.is_dir():
        # transform_checkpoints writes a merge as rank_0/checkpoint_0.ckpt.
        produced = output_files(produced)[0]
    return run_child(SHARDSMITH + ["verify", str(produced), str(reference)], log).returncode == 0


def _print_row(name: str, row: Dict[str, object]) -> None:
    parts = [f"{name}: {row['bytes_written'] / MIB:.0f} MiB written"]
    for key in ("shardsmith", "cat", "cat_fsync", "shardsmith_cold", "cat_fsync_cold", "naive", "transform"):
        if key in row:
            m = row[key]
            parts.append(f"{key} " + (f"{m['seconds']:.2f} s (cpu {m['cpu']:.2f} s) {m['peak_rss'] / MIB:.0f} MiB"
                                      if m["ok"] else f"failed ({m['note'][:80]})"))
    print("; ".join(parts), flush=True)


def _time_cell(m: Dict[str, object]) -> str:
    return f"{m['seconds']:.2f} ({m['cpu']:.2f})"


def markdown(all_results: List[Dict[str, object]]) -> str:
    """Return the results as the tables of benchmarks/RESULTS.md."""
    lines = []
    for res in all_results:
        lines.append(f"\n### {size_label(res['size'])} model ({res['bytes'] / MIB:.0f} MiB, largest parameter "
                     f"{res['largest_parameter'] / MIB:.2f} MiB)\n")
        lines.append("Seconds are wall time, CPU seconds (user + system) in brackets; RSS is the peak in MiB.\n")
        lines.append("| operation | MiB written | shardsmith s | RSS | cat s | cat + sync s | vs cat | vs cat + sync "
                     "| load/save s | RSS | transform_checkpoints s | RSS | faster than transform | less memory |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in res["operations"].items():
            ours, cat, synced = row["shardsmith"], row["cat"], row["cat_fsync"]
            cells = [name, f"{row['bytes_written'] / MIB:.0f}", _time_cell(ours), f"{ours['peak_rss'] / MIB:.0f}",
                     _time_cell(cat), _time_cell(synced),
                     f"{ours['seconds'] / cat['seconds']:.2f}x", f"{ours['seconds'] / synced['seconds']:.2f}x"]
            for key in ("naive", "transform"):
                other = row.get(key)
                if other is None:
                    cells += ["not run", ""]
                elif not other["ok"]:
                    cells += ["fails", ""]
                else:
                    flag = "" if other.get("equal", False) else " (output differs!)"
                    cells += [_time_cell(other) + flag, f"{other['peak_rss'] / MIB:.0f}"]
            other = row.get("transform")
            if other and other["ok"]:
                cells += [f"{other['seconds'] / ours['seconds']:.1f}x", f"{other['peak_rss'] / ours['peak_rss']:.1f}x"]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
        for name, row in res["operations"].items():
            if "shardsmith_cold" in row:
                ours, cat = row["shardsmith_cold"], row["cat_fsync_cold"]
                lines.append(f"\nCold page cache ({name}, inputs evicted with POSIX_FADV_DONTNEED): shardsmith "
                             f"{_time_cell(ours)} s, cat + sync {_time_cell(cat)} s, "
                             f"{ours['seconds'] / cat['seconds']:.2f}x.")
        st = res["startup"]
        lines.append(f"\n`shardsmith --help` {st['help']['seconds']:.3f} s, `shardsmith inspect` of the rank set "
                     f"{st['inspect']['seconds']:.3f} s, mindspore imported by inspect: {st['imports_mindspore']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512M,4G", help="comma-separated model sizes (512M, 4G, ...)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per shardsmith and cat measurement (the fastest is reported)")
    parser.add_argument("--mindspore-sizes", default="512M", help="sizes at which to run the MindSpore baselines ('' for none)")
    parser.add_argument("--mindspore-repeat", type=int, default=2, help="runs per MindSpore measurement (the fastest is reported)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a new temporary directory, removed after)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--to", help=argparse.SUPPRESS)
    parser.add_argument("--src-strategy", help=argparse.SUPPRESS)
    parser.add_argument("--dst-strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.size = parse_size(args.sizes)
        child(args)
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    ms_sizes = {parse_size(s) for s in args.mindspore_sizes.split(",") if s}
    work = args.work or Path(tempfile.mkdtemp(prefix="shardsmith-bench-"))
    print(f"# shardsmith benchmark: nproc {os.cpu_count()}, work directory {work}", flush=True)
    results = []
    try:
        for size in sizes:
            results.append(bench_size(size, work / size_label(size).replace(" ", ""), args.repeat, size in ms_sizes,
                                      args.mindspore_repeat))
            shutil.rmtree(work / size_label(size).replace(" ", ""), ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
