#!/usr/bin/env python
"""Measure what each part of shardsmith's streaming engine buys, by switching it off.

    .venv/bin/python benchmarks/ablation.py                # 512 MiB model, 5 rounds
    .venv/bin/python benchmarks/ablation.py --size 1G --rounds 3

It builds the same model and 8-rank set as benchmarks/run.py, then runs merge, split and the
8 -> 7 reshard once per variant and round, each in a child process (GNU time reports its peak
RSS and CPU time), with the variants interleaved round by round so that a busy machine slows
them alike. It reports the fastest run of each: on a shared machine the minimum is the
estimate least disturbed by other load. The variants patch one thing each in the child:

- `default`: the engine as shipped;
- `param release`: source pages released once a whole parameter is written, not chunk by chunk;
- `serial hash`: the sha256 computed in the write lane, after each write, not beside it;
- `1 worker`: one pool thread, so no two lanes (files, or write and hash) overlap;
- `chunk 1 MiB` and `chunk 32 MiB` (default 8), `in-flight 16, 64 and 256 MiB` (default 32);
- `no sha256`: the manifest hash skipped altogether, to show what it costs;
- `whole slices`: the engine before streaming (each target slice assembled whole in memory,
  then written and hashed on one thread), kept here as the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (benchmarks/run.py: the model, the plans and the child runner)

MIB = 1024 * 1024
VARIANTS = [
    "default", "param release", "serial hash", "1 worker", "chunk 1 MiB", "chunk 32 MiB",
    "in-flight 16 MiB", "in-flight 64 MiB", "in-flight 256 MiB", "no sha256", "whole slices",
]


def patch(variant: str) -> Dict[str, int]:
    """Switch one part of the engine off in this process; return extra job arguments."""
    import numpy as np

    from shardsmith import engine, pipeline

    if variant == "param release":
        engine._Arrays.release_span = lambda self, span: None
    elif variant in ("serial hash", "no sha256"):
        write_item = pipeline.PipelinedFile._write_item

        def write_and_hash(self, data):
            write_item(self, data)
            if variant == "serial hash":
                self.target.sha256.update(data)

        pipeline.PipelinedFile._write_item = write_and_hash
        pipeline.PipelinedFile._hash_item = lambda self, data: None
    elif variant == "1 worker":
        pipeline.default_workers = lambda: 1
    elif variant.startswith("chunk"):
        engine.CHUNK_BYTES = int(variant.split()[1]) * MIB
    elif variant.startswith("in-flight"):
        return {"max_inflight": int(variant.split()[1]) * MIB}
    elif variant == "whole slices":
        # Assemble each target slice whole, then write and hash it on the producer's thread.
        def whole_slice(move, arrays, rank, copies=None, chunk_bytes=None):
            copies = move.source.copies_into(move.target, rank) if copies is None else copies
            shape = move.target.slice_shapes[rank]
            buffer = np.zeros(shape, engine.dt.storage_dtype(move.dtype))
            for copy in copies:
                buffer[copy.target.slices()] = arrays[copy.source_rank][copy.source.slices()]
            yield buffer, None

        engine.slice_chunks = whole_slice
        pipeline.default_workers = lambda: 1
        return {"max_inflight": 1}
    return {}


def child(args: argparse.Namespace) -> None:
    from shardsmith import jobs

    extra = patch(args.variant)
    work = Path(args.work)
    kind, output = args.job, Path(args.out)
    if kind == "merge":
        jobs.merge([work / "src8"], work / "src8.toml", output, **extra)
    elif kind == "split":
        jobs.split(work / "full" / "rank_0" / "model.ckpt", work / "src8.toml", output, **extra)
    else:
        jobs.reshard([work / "src8"], work / "src8.toml", work / "dst7.toml", output, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M", help="model size (512M, 1G, ...)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every variant (the fastest is reported)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a new temporary directory, removed after)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    variants = [v for v in args.variants.split(",") if v]
    work = args.work or Path(tempfile.mkdtemp(prefix="shardsmith-ablation-"))
    try:
        results = measure(work, run.parse_size(args.size), variants, args.rounds, args.cold)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results, variants))


def measure(work: Path, size: int, variants: List[str], rounds: int, cold: bool) -> Dict[str, Dict[str, List[run.Run]]]:
    params = run.model(size)
    work.mkdir(parents=True, exist_ok=True)
    for key in run.WORLD:
        run.write_plan(key, work / f"{key}.toml")
    full = work / "full" / "rank_0" / "model.ckpt"
    run.write_model(params, full)
    shutil.rmtree(work / "src8", ignore_errors=True)
    subprocess.run(run.SHARDSMITH + ["split", str(full), "--plan", str(work / "src8.toml"), "-o", str(work / "src8"), "-q"],
                   check=True, cwd=run.REPO, stdout=subprocess.DEVNULL)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    inputs = {"merge": [work / "src8"], "split": [full], "reshard 8 -> 7": [work / "src8"]}
    results: Dict[str, Dict[str, List[run.Run]]] = {job: {v: [] for v in variants} for job in inputs}
    me = [run.PYTHON, str(Path(__file__).resolve()), "--child", "--work", str(work)]
    for round_ in range(rounds):
        for job, sources in inputs.items():
            for variant in variants:
                out = work / ("out.ckpt" if job == "merge" else "out")
                run._remove(out)
                if cold:
                    run.evict(sources)
                else:
                    run.warm(sources)
                run.settle()
                started = time.perf_counter()
                result = run.run_child(me + ["--variant", variant, "--job", job.split()[0], "--out", str(out)],
                                       logs / f"{job}-{variant}.log".replace(" ", "_"))
                if result.returncode != 0:
                    raise SystemExit(f"{job} / {variant} failed:\n{result.log}")
                results[job][variant].append(result)
                run.settle()
                run._remove(out)
                print(f"round {round_ + 1} {job:15s} {variant:18s} {result.seconds:6.2f} s  cpu {result.cpu:5.2f} s  "
                      f"{result.peak_rss / MIB:5.0f} MiB  ({time.perf_counter() - started:.1f} s)", flush=True)
    return results


def table(results: Dict[str, Dict[str, List[run.Run]]], variants: List[str]) -> str:
    lines = ["| variant | " + " | ".join(f"{job}: s, CPU s, MiB" for job in results) + " |",
             "|---|" + "---:|" * len(results)]
    for variant in variants:
        cells = []
        for job in results:
            runs = results[job][variant]
            cells.append(f"{min(r.seconds for r in runs):.2f}, {min(r.cpu for r in runs):.2f}, "
                         f"{max(r.peak_rss for r in runs) / MIB:.0f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
