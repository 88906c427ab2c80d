#!/usr/bin/env bash
# The embedded demo: the whole tiny pipeline (configs/pipelines/tiny.yaml) on bundled data, about 6
# minutes on 2 CPU cores: a byte-level BPE tokenizer, tinyshakespeare preprocessed into megatron indexed
# files, the ~2M-parameter tiny model pretrained, fine-tuned on megaflow's generated instructions (40% of
# the demonstrations wrong), a reward model and DPO on generated preference pairs, GRPO with an exact-match
# reward, and every model evaluated on the same held-out sets.
# Extra arguments go to `megaflow run`, e.g.:
#   bash scripts/demo.sh --dry-run                  # what would run, and why
#   bash scripts/demo.sh sft.train.steps=200        # a stage's override: that stage and what follows rerun
#   bash scripts/demo.sh run.dir=runs/tiny2
# Run it again: finished stages are skipped, an interrupted one resumes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

run_dir=runs/tiny   # run.dir in configs/pipelines/tiny.yaml; a run.dir=... override wins
for arg in "$@"; do
    case "$arg" in run.dir=*) run_dir=${arg#run.dir=} ;; esac
done

status=0
.venv/bin/python -m megaflow run configs/pipelines/tiny.yaml "$@" || status=$?
case "$*" in *--dry-run*) exit "$status" ;; esac
case "$run_dir" in /*) out="$run_dir" ;; *) out="$(pwd)/$run_dir" ;; esac
if [ "$status" -ne 0 ]; then
    echo "demo: the pipeline stopped (exit $status); what ran is in $out/report.md" >&2
    exit "$status"
fi
echo
echo "demo: results in $out/"
echo "  report.md       what each stage did and bought (tables; plots/ has the curves)"
echo "  pipeline.json   each stage's config and input hashes, status, timings and metrics"
echo "  STAGE/          config.yaml, metrics.jsonl, eval.json, checkpoints/, final/ of every stage"
for f in report.md pipeline.json eval/eval.json dpo/final; do
    [ -e "$out/$f" ] || echo "demo: warning: $out/$f is missing" >&2
done
sed -n '/What each stage bought/,/^ppl:/p' "$out/report.md"
