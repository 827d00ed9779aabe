#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install shardsmith, its test
# dependencies (MindSpore CPU included) and the plugins under plugins/ into it. Safe to rerun:
# pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version 2>&1)" >&2
    "$python" -m venv .venv
fi

stamp=.venv/.shardsmith-installed
inputs=(pyproject.toml plugins/*/pyproject.toml)
if [ -f "$stamp" ] && [ -z "$(find "${inputs[@]}" -newer "$stamp" 2>/dev/null)" ]; then
    exit 0
fi

echo "setup: installing shardsmith, MindSpore and the plugins into .venv (first run takes a few minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
plugin_args=()
for plugin in plugins/*/; do
    [ -f "$plugin/pyproject.toml" ] && plugin_args+=(-e "$plugin")
done
.venv/bin/python -m pip install --quiet -e ".[test,fuzz]" "${plugin_args[@]}"
touch "$stamp"
