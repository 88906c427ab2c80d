#!/usr/bin/env bash
# The embedded demo: trains a byte-level BPE tokenizer on the bundled tinyshakespeare sample, preprocesses
# it into megatron indexed files and pretrains the ~2M-parameter tiny model (about 3 minutes on 2 CPU
# cores). Extra arguments go to `megaflow train`, e.g. dotted overrides:
#   bash scripts/demo.sh train.steps=50
#   bash scripts/demo.sh run.dir=runs/tiny2
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

run_dir=runs/tiny   # run.dir in configs/stages/pretrain-tiny.yaml; a run.dir=... override wins
for arg in "$@"; do
    case "$arg" in run.dir=*) run_dir=${arg#run.dir=} ;; esac
done

status=0
.venv/bin/python -m megaflow train pretrain --config configs/stages/pretrain-tiny.yaml "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "demo: training failed (exit $status)" >&2
    exit "$status"
fi
case "$*" in *--dry-run*) exit 0 ;; esac

case "$run_dir" in /*) out="$run_dir/pretrain" ;; *) out="$(pwd)/$run_dir/pretrain" ;; esac
echo
echo "demo: results in $out/"
echo "  eval.json      final evaluation (validation loss, perplexity)"
echo "  metrics.jsonl  one JSON object per logged step (loss, lr, grad_norm, tok/s, ...)"
echo "  final/         weights-only checkpoint + megaflow.json + tokenizer/"
echo "  checkpoints/   resumable megatron checkpoints; config.yaml: the resolved config"
for f in eval.json metrics.jsonl final; do
    [ -e "$out/$f" ] || echo "demo: warning: $out/$f is missing" >&2
done
