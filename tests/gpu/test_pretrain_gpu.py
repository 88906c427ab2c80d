"""The pretraining stage on a GPU with Transformer Engine in BF16 and FP8 (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TEST_CONFIG, run_megaflow

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_pretrain_on_gpu(workdir, precision):
    run_dir = f"runs/gpu-{precision}"
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), f"precision={precision}",
                        f"run.dir={run_dir}", "tokenizer.path=runs/gpu-tokenizer", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = workdir / run_dir / "pretrain"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    print(f"{precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 1.0
    result = json.loads((stage / "eval.json").read_text())
    assert result["valid_ppl"] < result["unigram_ppl"]

    proc = run_megaflow("eval", str(stage / "final"), "--json", "--batch-size=8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(result["valid_loss"], rel=2e-2 if precision == "fp8" else 1e-3)
