#!/usr/bin/env bash
# Run the test suite: sets up .venv first (scripts/setup.sh), then pytest.
#   bash tests/run.sh            everything, the msrun jobs and large files included
#   bash tests/run.sh --quick    skip the tests marked slow (a few minutes)
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

args=()
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done

export GLOG_v=${GLOG_v:-3}
exec .venv/bin/python -m pytest "${args[@]}"
