#!/usr/bin/env bash
# Run the test suite in the project's .venv (created on first use by scripts/setup.sh).
#   bash scripts/test.sh                      # everything under tests/ (gpu tests skip on a CPU)
#   bash scripts/test.sh tests/unit -k config # any pytest arguments
# The exit code is pytest's.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
