#!/usr/bin/env bash
# Gather a rank set inside msrun on CPU workers, from files and from memory.
#   bash examples/gather/run.sh [WORK_DIR]
# WORKERS (default 2) sets the world size; the venv's bin must be first on PATH, because msrun
# starts each worker as `python SCRIPT`. Each step's check fails the script if the output
# differs from the checkpoint it started from.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
workers="${WORKERS:-2}"
export GLOG_v="${GLOG_v:-3}"

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "== a full checkpoint and a plan for $workers ranks, in $work"
python "$here/make_checkpoint.py" --out "$work" --world-size "$workers"
shardsmith split "$work/full.ckpt" --plan "$work/plan.toml" -o "$work/ranks" --quiet

echo "== shardsmith gather: each worker reads only rank_<r>/, rank 0 writes the full checkpoint"
msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="$(free_port)" \
    --log_dir="$work/log_gather" --join=True \
    "$(command -v shardsmith)" gather "$work/ranks" --plan "$work/plan.toml" -o "$work/gathered.ckpt"
shardsmith verify "$work/gathered.ckpt" "$work/full.ckpt"

echo "== inside a training script: load_rank_slice, then gather_params"
msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="$(free_port)" \
    --log_dir="$work/log_memory" --join=True \
    "$here/resume_and_gather.py" --full "$work/full.ckpt" --plan "$work/plan.toml" --out "$work/from_memory.ckpt"
shardsmith verify "$work/from_memory.ckpt" "$work/full.ckpt"
