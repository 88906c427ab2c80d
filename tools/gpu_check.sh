#!/usr/bin/env bash
# One GPU session's checks, in one call (DESIGN §4, ../shared/gpu/README.md), each under its own time limit
# so that a hang costs one section, not the session. SECTIONS picks them, in this order:
#   train  the 1B shape (configs/stages/pretrain-1b.yaml: tp=1, distributed optimizer) through
#          `megaflow train pretrain`, BF16 and FP8: tokens/s and peak memory next to `megaflow plan`'s estimate;
#   prefs  SFT and DPO (unpacked, and packed pairs through TE's THD path) on the same shape, from the BF16
#          pretrain (a short one if `train` did not run; configs/stages/{sft,dpo}-1b.yaml): positions/s and
#          packing efficiency; the packed and unpacked reference log-probs compared;
#   rl     RL on the same shape: rollout tokens/s against HF generate() and the weight-and-KV-read floor
#          (tools/bench_rollout.py --shape 1b), then PPO iterations with a 1B actor, reference, reward model
#          and critic in one process (configs/stages/{rm,ppo}-1b.yaml, the RM a few steps from the bf16
#          pretrain): each iteration's time split, decode tokens/s, the rollout/training log-prob gap in bf16;
#   ckpt   the 1B checkpoint stall (CKPT_MODES: sync,async), split into state dict / save call / schedule,
#          then a resume from the asynchronous run's second-to-last checkpoint against the uninterrupted losses;
#          then the stall of an asynchronous save in `checkpoint.optimizer_format=dp_reshardable`;
#   tests  the GPU tests: distributed-optimizer checkpoints (fully_reshardable, sync and async) resumed
#          exactly, pretraining through TE in BF16 and FP8, `megaflow plan`'s memory against measured memory;
#   bench  the 1B step benchmark against bare megatron-core + TE and HF transformers.
# Usage on the GPU machine, after installing .whl:
#   SECTIONS="train prefs rl ckpt tests" bash tools/gpu_check.sh [OUTDIR]      (the default: all but bench)
# DEADLINE (seconds, default 560) caps every section's time limit so that the script ends, and prints its
# results, within one device call; TESTS names the GPU test files.
# On a CPU, SMOKE=1 runs the same commands on a tiny model with few steps, to check the script itself.
set -uo pipefail
OUT=${1:-${OUT:-bench-results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
SECONDS=0
SECTIONS=" ${SECTIONS:-train prefs rl ckpt tests} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
section() { echo "=== [$SECONDS s] $*"; }
DEADLINE=${DEADLINE:-560}
limit() { local left=$((DEADLINE - SECONDS)); echo $(($1 < left ? $1 : (left > 1 ? left : 1))); }  # seconds
quiet() { grep -v "Warning\|warn" | tail -"$1"; }
SMALL=()  # SMOKE=1: the 1B configs on a tiny model, a few steps
if [ "${SMOKE:-0}" = 1 ]; then
  SMALL=(model.hidden_size=64 model.num_layers=2 model.num_attention_heads=4 model.num_query_groups=2
         model.ffn_hidden_size=128 precision=fp32 parallel.distributed_optimizer=false)
  STEPS=(train.steps=8 train.warmup_steps=1) PAIRS=24 ROLLOUT=(--shape tiny --batch 8 --new 8)
  RL=(train.steps=2 rl.prompts_per_step=8 train.global_batch_size=8 train.micro_batch_size=4 rl.max_new_tokens=8)
else
  STEPS=() PAIRS=240 ROLLOUT=(--shape 1b --batch 64 --new 128) RL=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import megatron.core, transformer_engine.pytorch, torch; print('torch', torch.__version__, 'mcore', megatron.core.__version__)"
fi
df -h /tmp | tail -1

median_of() {  # metrics.jsonl label: median positions/s, MFU and peak memory of the steps after the 5th
  python3 - "$1" "$2" <<'PY' | tee -a "$OUT/train_1b.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l]
rows = rows[5:] or rows
print(f"1b {sys.argv[2]}: {statistics.median(r['tok_per_s'] for r in rows):.0f} positions/s, "
      f"mfu {statistics.median(r['mfu'] for r in rows):.3f}, peak allocated {max(r.get('peak_mem_gib', 0) for r in rows):.2f} GiB, "
      f"first loss {rows[0]['loss']:.4f}" if rows else "no steps")
PY
}

if want train; then
  for precision in bf16 fp8; do
    section "1b via megaflow train, $precision"
    timeout "$(limit 120)" python3 -m megaflow train pretrain --config configs/stages/pretrain-1b.yaml precision=$precision \
      run.dir="$OUT/run-1b-$precision" run.progress=false checkpoint.every=0 "${SMALL[@]}" "${STEPS[@]}" 2>&1 | quiet 4
    [ "$precision" = bf16 ] || rm -rf "$OUT/run-1b-$precision/pretrain/final"  # bf16's starts SFT and DPO below
    python3 - "$OUT/run-1b-$precision/pretrain/metrics.jsonl" $precision <<'PY' | tee -a "$OUT/train_1b.txt"
import json, statistics, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l][5:]
plan = json.loads(subprocess.run([sys.executable, "-m", "megaflow", "plan", "configs/stages/pretrain-1b.yaml",
                                  f"precision={sys.argv[2]}", "--json"], capture_output=True, text=True).stdout)
stage = plan["memory_gib"]["stages"][0]
print(f"1b {sys.argv[2]} via megaflow train: {statistics.median(r['tok_per_s'] for r in rows):.0f} tok/s, "
      f"mfu {statistics.median(r['mfu'] for r in rows):.3f}, peak allocated {max(r['peak_mem_gib'] for r in rows):.2f} GiB; "
      f"plan: {stage['total'] - stage['overhead']:.2f} GiB without its {stage['overhead']} GiB allowance")
PY
  done
fi

pretrain_for_init() {  # the bf16 pretrain's final checkpoint, or a short one if `train` did not run
  if [ ! -d "$OUT/run-1b-bf16/pretrain/final" ]; then
    section "1b pretrain, 4 steps, for the stages below to start from"
    timeout "$(limit 100)" python3 -m megaflow train pretrain --config configs/stages/pretrain-1b.yaml train.steps=4 \
      train.warmup_steps=1 run.dir="$OUT/run-1b-bf16" run.progress=false checkpoint.every=0 eval.final=false \
      "${SMALL[@]}" 2>&1 | quiet 2
  fi
}

if want prefs; then
  pretrain_for_init
  INIT="$OUT/run-1b-bf16/pretrain/final"
  # the unpacked reference pass covers every training pair (2 rows of 2048 each): 240 of them keep it short
  head -n "$PAIRS" data/sample/pref-words/train.jsonl > "$OUT/pref-head.jsonl"
  for run in sft dpo-packed dpo; do
    section "1b $run positions/s from the bf16 pretrain"
    case $run in
      sft) args=(sft --config configs/stages/sft-1b.yaml) ;;
      dpo) args=(dpo --config configs/stages/dpo-1b.yaml "data.train=[{path: $OUT/pref-head.jsonl}]") ;;
      dpo-packed) args=(dpo --config configs/stages/dpo-1b.yaml data.preference.packing=true) ;;
    esac
    timeout "$(limit 120)" python3 -m megaflow train "${args[@]}" init_from="$INIT" run.dir="$OUT/run-1b-$run" \
      run.progress=false "${SMALL[@]}" "${STEPS[@]}" 2>&1 | grep -i "efficien\|packed\|pairs\|reference\|error" | quiet 6
    median_of "$OUT/run-1b-$run/${args[0]}/metrics.jsonl" "$run bf16"
    rm -rf "$OUT/run-1b-$run/${args[0]}/final"
  done
  python3 - "$OUT" <<'PY' | tee -a "$OUT/train_1b.txt"
import glob, sys
import numpy as np
caches = {}
for run in ("dpo", "dpo-packed"):
    found = glob.glob(f"{sys.argv[1]}/run-1b-{run}/cache/reference-logps-*.npy")
    caches[run] = np.load(found[0]) if found else None
if caches["dpo"] is not None and caches["dpo-packed"] is not None:
    a, b = caches["dpo"], caches["dpo-packed"][: len(caches["dpo"])]
    diff = np.abs(a - b)
    print(f"1b reference log-probs, packed (THD) vs unpacked, {len(a)} pairs: max |diff| {diff.max():.3g}, "
          f"mean |diff| {diff.mean():.3g}, max rel {(diff / np.abs(a)).max():.3g}, mean |logp| {np.abs(a).mean():.1f}")
PY
fi

if want rl; then
  section "rollout tokens/s: megaflow vs HF generate() vs the read floor"
  timeout "$(limit 150)" python3 tools/bench_rollout.py "${ROLLOUT[@]}" --rounds 1 --repeats 2 \
    --out "$OUT/bench_rollout.json" 2>&1 | quiet 8
  pretrain_for_init
  INIT="$OUT/run-1b-bf16/pretrain/final"
  section "1b reward model, a few steps, for PPO's reward and critic"
  timeout "$(limit 100)" python3 -m megaflow train rm --config configs/stages/rm-1b.yaml init_from="$INIT" \
    run.dir="$OUT/run-1b-rl" run.progress=false "${SMALL[@]}" "${STEPS[@]}" 2>&1 | quiet 2
  section "1b PPO iterations: actor, reference, reward model and critic in one process"
  timeout "$(limit 180)" python3 -m megaflow train ppo --config configs/stages/ppo-1b.yaml init_from="$INIT" \
    rl.reward.model="$OUT/run-1b-rl/rm/final" run.dir="$OUT/run-1b-rl" run.progress=false "${SMALL[@]}" "${RL[@]}" \
    2>&1 | quiet 4
  python3 - "$OUT/run-1b-rl/ppo/metrics.jsonl" <<'PY' | tee "$OUT/ppo_1b.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"reward/mean"' in l]
for r in rows:
    split = ", ".join(f"{k[5:]} {v:.2f} s" for k, v in r.items() if k.startswith("time/"))
    print(f"1b ppo iteration {r['step']}: {r['step_time']:.2f} s ({split}); generate {r['gen_tok_per_s']:.0f} tok/s; "
          f"log-prob gap k3 {r['logprob_gap/k3']:.3g}, max ratio {r['logprob_gap/max_ratio']:.4f}; "
          f"peak allocated {r.get('peak_mem_gib', 0):.1f} GiB")
PY
  rm -rf "$OUT/run-1b-rl/rm/final" "$OUT/run-1b-rl/ppo/final" "$OUT/run-1b-rl/ppo/critic"
fi
rm -rf "$OUT/run-1b-bf16/pretrain/final"

if want ckpt; then
  section "1b checkpoint stall (${CKPT_MODES:-sync,async}) and resume from the async save"
  # measured 2026-11-26 (H200): a synchronous 1B save stalls ~47 s, an asynchronous one ~26 s
  timeout "$(limit "${CKPT_SECONDS:-330}")" python3 tools/bench_checkpoint.py --config configs/stages/pretrain-1b.yaml \
    --steps "${CKPT_STEPS:-12}" --every "${CKPT_EVERY:-6}" --repeats 1 --modes "${CKPT_MODES:-sync,async}" \
    --resume-check --out "$OUT/bench_checkpoint_1b.json" "${SMALL[@]}" 2>&1 | quiet 8
  section "1b asynchronous save stall, checkpoint.optimizer_format=dp_reshardable"
  timeout "$(limit 120)" python3 tools/bench_checkpoint.py --config configs/stages/pretrain-1b.yaml \
    --steps "${CKPT_STEPS:-12}" --every "${CKPT_EVERY:-6}" --repeats 1 --modes async \
    --out "$OUT/bench_checkpoint_1b_dp_reshardable.json" checkpoint.optimizer_format=dp_reshardable "${SMALL[@]}" 2>&1 | quiet 3
fi

if want tests; then
  section "GPU tests"
  # shellcheck disable=SC2086  # TESTS is a list of paths and -k expressions
  timeout "$(limit "${TEST_SECONDS:-200}")" python3 -m pytest -q -s -p no:cacheprovider \
    ${TESTS:-tests/gpu/test_checkpoint_gpu.py tests/gpu/test_pretrain_gpu.py tests/gpu/test_plan_gpu.py} 2>&1 \
    | quiet 30 | tee "$OUT/gpu_tests.txt"
fi

if want bench; then
  section "1b step benchmark"
  python3 tools/bench_pretrain.py --shape 1b --precision bf16,fp8 --repeats "${REPEATS:-1}" --max-minutes "${BENCH_MINUTES:-3}" \
    --out "$OUT/bench_pretrain_1b.json" 2>&1 | quiet 40
fi
section "done"
