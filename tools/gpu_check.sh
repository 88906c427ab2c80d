#!/usr/bin/env bash
# One GPU session's checks, in one call (DESIGN §4, ../shared/gpu/README.md): the GPU tests (pretraining
# through Transformer Engine in BF16 and FP8, evaluation reproduced from the final checkpoint), then the
# 1B benchmark of megaflow's engine against bare megatron-core + TE and HF transformers.
# Usage on the GPU machine, after installing .whl: bash tools/gpu_check.sh [OUTDIR]
set -uo pipefail
OUT=${1:-${OUT:-bench-results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import megatron.core, transformer_engine.pytorch, torch; print('torch', torch.__version__, 'mcore', megatron.core.__version__)"
timeout 200 python3 -m pytest -q -x -s -p no:cacheprovider tests/gpu 2>&1 | grep -v "Warning\|warn" | tail -25 | tee "$OUT/gpu_tests.txt"
python3 tools/bench_pretrain.py --shape 1b --precision bf16,fp8 --repeats "${REPEATS:-2}" --max-minutes "${BENCH_MINUTES:-5}" \
  --out "$OUT/bench_pretrain_1b.json" 2>&1 | grep -v "Warning\|warn" | tail -40
