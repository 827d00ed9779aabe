#!/usr/bin/env bash
# Run shardsmith on a real hybrid-parallel MindSpore job, from a fresh clone:
#
#     bash examples/demo.sh [OUTPUT_DIR]        (default: demo-output, ignored by git)
#
# Sets up .venv and trains examples/hybrid_parallel on 4 CPU workers under msrun. Then:
#   Scenario 1 merges the 4 rank files into one weights-only checkpoint, loads it on one device,
#   checks its output against the 4-rank model's and exports MINDIR.
#   Scenario 2 reshards the 4-rank set to 2 ranks, resumes training on 2 workers and checks the
#   losses against those the 4-rank run had at the same steps.
#   Last, shardsmith gather merges the 4-rank set inside msrun, and the result is compared byte for
#   byte with the offline merge.
# Exits non-zero when a step or a check fails.
#
# Environment: SHARDSMITH_DEMO_SKIP_SETUP=1 skips scripts/setup.sh (the tests set it, having a
# venv already); MSRUN_TIMEOUT (seconds, default 600) bounds each msrun job.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
root=$PWD
case "${1:-}" in
    "") out=demo-output ;;
    /*) out=$1 ;;
    *) out=$caller_dir/$1 ;;  # relative to where the demo was started, not to the repository
esac
example=examples/hybrid_parallel
msrun_timeout=${MSRUN_TIMEOUT:-600}
marker=.shardsmith-demo

step() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
fail() { printf '\ndemo: FAILED: %s\n' "$*" >&2; exit 1; }

free_port() {
    python - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

show_logs() {
    local log_dir=$1 log
    for log in "$log_dir"/msrun.log "$log_dir"/scheduler.log "$log_dir"/worker_*.log; do
        [ -f "$log" ] || continue
        printf -- '--- last lines of %s\n' "$log" >&2
        grep -v -e '^\[WARNING\]' -e '^\[INFO\]' "$log" | tail -n 25 >&2 || true
    done
}

# run_msrun WORKERS LOG_DIR SCRIPT [ARGS...]: one msrun job on loopback; shows the logs on failure.
run_msrun() {
    local workers=$1 log_dir=$2
    shift 2
    mkdir -p "$log_dir"
    local port
    port=$(free_port)
    printf '$ msrun --worker_num=%s --local_worker_num=%s --master_port=%s --join=True %s\n' \
        "$workers" "$workers" "$port" "$*"
    # msrun stops its workers on SIGINT only: after SIGTERM or SIGKILL they keep running, each in a
    # process group of its own. So the timeout sends SIGINT, and so does an interrupt of this script
    # (timeout runs msrun outside the terminal's process group, where Ctrl-C would not reach it).
    timeout --signal=INT --kill-after=30 "$msrun_timeout" \
        msrun --worker_num="$workers" --local_worker_num="$workers" --master_addr=127.0.0.1 \
        --master_port="$port" --log_dir="$log_dir" --join=True "$@" >"$log_dir/msrun.log" 2>&1 &
    local job=$!
    trap 'kill -INT "$job" 2>/dev/null; wait "$job"; fail "interrupted; the msrun job was stopped"' INT TERM
    local status=0
    wait "$job" || status=$?
    trap - INT TERM
    if [ "$status" -ne 0 ]; then
        show_logs "$log_dir"
        fail "the msrun job with $workers workers failed or timed out after ${msrun_timeout}s; logs in $log_dir"
    fi
    grep -h '^rank 0: ' "$log_dir/worker_0.log" || true
    echo "(every rank's output is in $log_dir/worker_<r>.log)"
}

if [ -e "$out" ] && [ ! -e "$out/$marker" ] && [ -n "$(ls -A "$out")" ]; then
    fail "$out exists and was not written by this demo; remove it or give another OUTPUT_DIR"
fi

if [ "${SHARDSMITH_DEMO_SKIP_SETUP:-}" != 1 ]; then
    step "Setting up the virtual environment .venv (scripts/setup.sh)"
    bash scripts/setup.sh
fi
export PATH="$root/.venv/bin:$PATH"
export GLOG_v=3                 # errors only from MindSpore's C++ logging
export COLUMNS=${COLUMNS:-120}  # width of shardsmith's tables when stdout is not a terminal

rm -rf "$out"
mkdir -p "$out"
touch "$out/$marker"
run4=$out/run4

step "Training the hybrid-parallel MLP on 4 CPU workers for 5 steps.
    Each rank checks its first gradients against a single-device run, then saves its own slices
    of the network and of Adam's state in $run4/rank_<r>/net.ckpt, trains 2 more steps and
    records those losses and the model's output on a fixed input in $run4/reference.json."
run_msrun 4 "$out/logs/run4" "$example/train.py" --out "$run4" --steps 5 --extra-steps 2 --check-grads

step "Scenario 1, many devices to one: what each of the 4 ranks holds"
run shardsmith inspect "$run4" || fail "shardsmith inspect failed"

step "Merging the 4 rank files into one checkpoint with the network's weights only
    (the Adam moments, learning_rate and global_step are left out)"
run shardsmith merge "$run4" --plan "$example/plan_4.toml" -o "$out/merged.ckpt" --weights-only ||
    fail "shardsmith merge failed"
run shardsmith inspect "$out/merged.ckpt" || fail "shardsmith inspect failed"

step "Loading the merged checkpoint into the single-device network with mindspore.load_checkpoint
    and load_param_into_net, comparing its output with the 4-rank model's, exporting MINDIR"
run python examples/demo_checks.py merged "$out/merged.ckpt" \
    --reference "$run4/reference.json" --export "$out/model.mindir" ||
    fail "the merged checkpoint does not reproduce the 4-rank model"

step "Scenario 2, one cluster size to another: resharding the 4-rank set to the 2-rank layout
    of plan_2.toml, optimizer state included, without writing a full checkpoint"
run shardsmith reshard "$run4" --plan "$example/plan_4.toml" --to-plan "$example/plan_2.toml" -o "$out/set2" ||
    fail "shardsmith reshard failed"
run shardsmith inspect "$out/set2" || fail "shardsmith inspect failed"

step "Resuming training on 2 CPU workers: each rank loads its slices of $out/set2
    and trains the 2 steps that followed the checkpoint in the 4-rank run"
run_msrun 2 "$out/logs/resume2" "$example/train.py" --resume "$out/set2" \
    --plan "$example/plan_2.toml" --steps 2 --record "$out/resumed.json"

step "Comparing the resumed run with the 4-rank run"
run python examples/demo_checks.py resumed --reference "$run4/reference.json" --record "$out/resumed.json" ||
    fail "the run resumed on 2 ranks does not continue the 4-rank run"

step "Gathering the 4-rank set inside msrun instead: each of 4 workers reads only its own rank file,
    the slices travel by AllGather and rank 0 writes the full checkpoint (optimizer state included)"
run_msrun 4 "$out/logs/gather4" "$(command -v shardsmith)" gather "$run4" --plan "$example/plan_4.toml" \
    -o "$out/gathered.ckpt"
run shardsmith merge "$run4" --plan "$example/plan_4.toml" -o "$out/merged_full.ckpt" --quiet ||
    fail "shardsmith merge failed"
run cmp "$out/gathered.ckpt" "$out/merged_full.ckpt" ||
    fail "the gathered checkpoint differs from the offline merge"
echo "the gathered checkpoint equals the offline merge byte for byte"

step "All checks passed. Outputs are in $out/"
