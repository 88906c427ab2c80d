#!/usr/bin/env bash
# Idempotent environment bootstrap: a Python 3.12 virtual environment in .venv with megaflow installed
# editable plus its test extras. Reruns are instant: a stamp inside .venv records a hash of
# pyproject.toml (and the interpreter version), and pip runs only when that changes.
#
#   bash scripts/setup.sh            # from any directory
#   MEGAFLOW_PYTHON=/path/to/python3.12 bash scripts/setup.sh   # choose the interpreter
#   SETUP_VERBOSE=1 bash scripts/setup.sh                       # show pip's full output
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.megaflow-setup-stamp"
LOG="$VENV/.megaflow-setup-pip.log"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# A usable interpreter is Python 3.12 with venv/ensurepip (Debian splits those into python3.12-venv).
is_py312() {
    [ -n "$1" ] && "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

find_python() {
    local c want=""
    [ -f .python-version ] && want=$(head -n1 .python-version | tr -d '[:space:]')
    local candidates=()
    [ -n "${MEGAFLOW_PYTHON:-}" ] && candidates+=("$MEGAFLOW_PYTHON")
    if command -v pyenv >/dev/null 2>&1; then
        # Inside the repository pyenv honours .python-version.
        candidates+=("$(pyenv which python3.12 2>/dev/null || true)")
        local root; root=$(pyenv root 2>/dev/null || true)
        if [ -n "$root" ]; then
            [ -n "$want" ] && candidates+=("$root/versions/$want/bin/python3.12")
            for c in "$root"/versions/3.12*/bin/python3.12; do candidates+=("$c"); done
        fi
    fi
    candidates+=("$(command -v python3.12 2>/dev/null || true)")
    candidates+=("$(command -v python3 2>/dev/null || true)")
    for c in "${candidates[@]}"; do
        if is_py312 "$c"; then printf '%s\n' "$c"; return 0; fi
    done
    return 1
}

[ -f pyproject.toml ] || die "no pyproject.toml in $ROOT"

if command -v flock >/dev/null 2>&1; then
    # Serialise concurrent bootstraps (e.g. demo.sh and test.sh started together); the lock is taken on
    # pyproject.toml itself so that no lock file is left in the checkout.
    exec {lock_fd}<pyproject.toml
    flock "$lock_fd"
fi

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' \
        || die ".venv uses $("$VENV/bin/python" -V 2>&1); megaflow needs Python 3.12 (remove .venv and rerun)"
else
    PY=$(find_python) || die "Python 3.12 not found (tried \$MEGAFLOW_PYTHON, pyenv, python3.12 and python3 on PATH); install it, e.g. 'pyenv install 3.12.1'"
    say "creating .venv with $PY ($("$PY" -V 2>&1))"
    "$PY" -m venv "$VENV" || die "'$PY -m venv .venv' failed"
fi

want_stamp=$("$VENV/bin/python" -c '
import hashlib, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()
print(f"{h} py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]} extras=test")')

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
    exit 0
fi

if [ -f "$STAMP" ]; then
    say "pyproject.toml changed since the last install: updating .venv"
else
    say "installing megaflow[test] into .venv (the first install downloads torch, ~5 GB: a few minutes)"
fi
start=$SECONDS
rm -f "$STAMP"
# torch's CUDA build needs about 6 GB in .venv; a full disk otherwise surfaces as pip's Errno 28 midway.
free_kb=$(df -Pk "$VENV" 2>/dev/null | awk 'NR == 2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
    say "warning: only $((free_kb / 1024)) MiB free under $VENV; the install needs about 8 GiB"
fi
# --no-cache-dir: a second copy of the torch wheel in pip's cache would only cost disk.
pip_args=(install -e ".[test]" --disable-pip-version-check --progress-bar off --no-cache-dir)
if [ -n "${SETUP_VERBOSE:-}" ]; then
    "$VENV/bin/python" -m pip "${pip_args[@]}" || die "pip install failed"
else
    # Keep the full log in .venv; on failure show its end (pip's error block), on success only ERROR lines
    # (e.g. the resolver's dependency-conflict report, which does not fail the install).
    if ! "$VENV/bin/python" -m pip "${pip_args[@]}" >"$LOG" 2>&1; then
        tail -n 60 "$LOG" >&2
        die "pip install -e '.[test]' failed (full log: $LOG)"
    fi
    grep -E '^ERROR' "$LOG" >&2 || true
fi
printf '%s\n' "$want_stamp" >"$STAMP"
say "done in $((SECONDS - start)) s"
