#!/usr/bin/env bash
# Run the test suite in the project's .venv (created on first use by scripts/setup.sh).
#   bash scripts/test.sh                      # everything under tests/ (gpu tests skip on a CPU)
#   bash scripts/test.sh tests/unit -k config # any pytest arguments
#   MEGAFLOW_TEST_WORKERS=2 bash scripts/test.sh ...   # pytest-xdist workers (for machines with spare cores)
#   MEGAFLOW_TEST_ZYGOTE=0 bash scripts/test.sh ...    # every megaflow run a cold interpreter (tests/zygote.py)
# The exit code is pytest's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# One process by default: on 2 cores, two xdist workers were slower (2025 s against 1922 s), because
# each test's megaflow processes already use both cores. Each module stays on one worker when they run.
workers=${MEGAFLOW_TEST_WORKERS:-0}
if [ "$workers" = 0 ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup "$@"
