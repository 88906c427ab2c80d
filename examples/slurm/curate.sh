#!/bin/bash
# Curation on a SLURM cluster (docs/curation.md), run on a login node: `megaflow curate executor=slurm`
# submits each curation step as a job array through datatrove's SLURM executor, every array depending on
# the one before (read and filter, exact duplicates, MinHash signatures, buckets, clusters, write), and
# returns; the arrays do the work. They run the same datatrove steps as `megaflow curate` does locally.
#   INPUT=/data/raw OUTPUT=/data/curated PARTITION=cpu bash examples/slurm/curate.sh [key=value ...]
# Variables: INPUT (files or directories), OUTPUT, PARTITION (required); TASKS (tasks per array, default 64),
# TIME (per task, default 4:00:00), CPUS (per task, default 1), MEM_PER_CPU_GB (default 2),
# VENV (an activate script each task sources; default MEGAFLOW_HOME/.venv/bin/activate when it exists),
# CONFIG (a curate stage file with the filter settings; without it the defaults are FineWeb's).
set -euo pipefail
MEGAFLOW_HOME=${MEGAFLOW_HOME:-$PWD}
cd "$MEGAFLOW_HOME"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
VENV=${VENV:-$( [ -f .venv/bin/activate ] && echo "$MEGAFLOW_HOME/.venv/bin/activate" || true )}
args=(executor=slurm "slurm.partition=${PARTITION:?set PARTITION to a SLURM partition}" "slurm.tasks=${TASKS:-64}"
      "slurm.time=${TIME:-4:00:00}" "slurm.cpus_per_task=${CPUS:-1}" "slurm.mem_per_cpu_gb=${MEM_PER_CPU_GB:-2}")
[ -n "$VENV" ] && args+=("slurm.venv_path=$VENV")
[ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
# shellcheck disable=SC2086  # INPUT is a list of paths
exec "$PYTHON" -m megaflow curate --input ${INPUT:?set INPUT to the raw files or directories} \
    --output "${OUTPUT:?set OUTPUT to the curated directory}" "${args[@]}" "$@"
