#!/usr/bin/env bash
# Run the test suite in the project's .venv (created on first use by scripts/setup.sh).
#   bash scripts/test.sh                      # everything under tests/ (gpu tests skip on a CPU)
#   bash scripts/test.sh tests/unit -k config # any pytest arguments
#   MEGAFLOW_TEST_WORKERS=0 bash scripts/test.sh ...   # no xdist workers (e.g. to use pdb)
# The exit code is pytest's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Two pytest-xdist workers by default: most tests start megaflow processes whose start-up (imports, ~6 s)
# runs on one core, so a second worker uses the other. MEGAFLOW_TEST_WORKERS=0 runs in this process.
workers=${MEGAFLOW_TEST_WORKERS:-2}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadgroup "$@"
