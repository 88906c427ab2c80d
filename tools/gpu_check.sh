#!/usr/bin/env bash
# One GPU session's checks, in one call (DESIGN §4, ../shared/gpu/README.md), most important first, each
# under its own time limit so that a hang costs one section, not the session:
#   1. the 1B shape (configs/stages/pretrain-1b.yaml: tp=1, distributed optimizer) through
#      `megaflow train pretrain`, BF16 and FP8: tokens/s and peak memory next to `megaflow plan`'s estimate;
#      then SFT and DPO on the same shape from the BF16 result (configs/stages/{sft,dpo}-1b.yaml): positions/s;
#   2. the checkpoint stall of a synchronous vs an asynchronous save on the 1B shape, then a resume from
#      the asynchronous run's second-to-last checkpoint compared with the uninterrupted losses;
#   3. the GPU tests: distributed-optimizer checkpoints (fully_reshardable, sync and async) resumed
#      exactly, pretraining through Transformer Engine in BF16 and FP8 with evaluation from the final
#      checkpoint, and `megaflow plan`'s memory against measured memory;
#   4. (BENCH=1) the 1B step benchmark against bare megatron-core + TE and HF transformers.
# Usage on the GPU machine, after installing .whl: bash tools/gpu_check.sh [OUTDIR]
set -uo pipefail
OUT=${1:-${OUT:-bench-results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
SECONDS=0
section() { echo "=== [$SECONDS s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import megatron.core, transformer_engine.pytorch, torch; print('torch', torch.__version__, 'mcore', megatron.core.__version__)"
df -h /tmp | tail -1

for precision in bf16 fp8; do
  section "1b via megaflow train, $precision"
  timeout 120 python3 -m megaflow train pretrain --config configs/stages/pretrain-1b.yaml precision=$precision \
    run.dir="$OUT/run-1b-$precision" run.progress=false checkpoint.every=0 2>&1 | grep -v "Warning\|warn" | tail -4
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

for stage in sft dpo; do
  section "1b $stage tokens/s (positions/s) from the bf16 pretrain"
  timeout 150 python3 -m megaflow train $stage --config configs/stages/$stage-1b.yaml \
    init_from="$OUT/run-1b-bf16/pretrain/final" run.dir="$OUT/run-1b-$stage" run.progress=false 2>&1 | grep -v "Warning\|warn" | tail -3
  rm -rf "$OUT/run-1b-$stage/$stage/final" "$OUT/run-1b-$stage/cache"
  python3 - "$OUT/run-1b-$stage/$stage/metrics.jsonl" $stage <<'PY' | tee -a "$OUT/train_1b.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l][5:]
print(f"1b {sys.argv[2]} bf16: {statistics.median(r['tok_per_s'] for r in rows):.0f} positions/s, "
      f"mfu {statistics.median(r['mfu'] for r in rows):.3f}, peak allocated {max(r['peak_mem_gib'] for r in rows):.2f} GiB")
PY
done
rm -rf "$OUT/run-1b-bf16/pretrain/final"

section "1b checkpoint stall, sync vs async, and resume"
# measured 2026-11-26 (H200): a synchronous 1B save stalls ~47 s, so 2 saves per run and 1 resume fit ~5 min
timeout 330 python3 tools/bench_checkpoint.py --config configs/stages/pretrain-1b.yaml --steps 12 --every 6 --repeats 1 \
  --resume-check --out "$OUT/bench_checkpoint_1b.json" 2>&1 | grep -v "Warning\|warn" | tail -8

section "GPU tests"
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_checkpoint_gpu.py \
  tests/gpu/test_pretrain_gpu.py tests/gpu/test_plan_gpu.py 2>&1 | grep -v "Warning\|warn" | tail -30 | tee "$OUT/gpu_tests.txt"

if [ "${BENCH:-0}" = 1 ]; then
  section "1b step benchmark"
  python3 tools/bench_pretrain.py --shape 1b --precision bf16,fp8 --repeats "${REPEATS:-1}" --max-minutes "${BENCH_MINUTES:-3}" \
    --out "$OUT/bench_pretrain_1b.json" 2>&1 | grep -v "Warning\|warn" | tail -40
fi
section "done"
