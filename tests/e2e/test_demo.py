"""The embedded sample itself (configs/stages/pretrain-tiny.yaml, what `bash scripts/demo.sh` runs)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_megaflow

pytestmark = pytest.mark.slow


def test_demo_beats_a_unigram_model_by_half(workdir):
    proc = run_megaflow("train", "pretrain", "--config", str(REPO / "configs/stages/pretrain-tiny.yaml"),
                        "checkpoint.every=0", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((workdir / "runs" / "tiny" / "pretrain" / "eval.json").read_text())
    print(f"demo: valid ppl {result['valid_ppl']:.1f} vs unigram {result['unigram_ppl']:.1f} "
          f"in {result['minutes']:.1f} min")
    assert result["valid_ppl"] <= 0.5 * result["unigram_ppl"]
