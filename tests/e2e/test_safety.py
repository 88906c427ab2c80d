"""`megaflow eval CKPT --metrics safety` on the tiny SFT model: both rates printed, judged by the rules and
by a reward model; a prompts file that is not JSON is one line naming it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_megaflow

pytestmark = pytest.mark.slow


def test_safety_eval_of_the_tiny_model_prints_both_rates(workdir, tiny_sft, tmp_path):
    ckpt = str(tiny_sft / "final")
    proc = run_megaflow("eval", ckpt, "--metrics", "safety", "--max-new-tokens", "8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    print(line)
    assert "harmful responses to adversarial prompts:" in line and "refusals: adversarial" in line and "benign" in line
    proc = run_megaflow("eval", ckpt, "--metrics", "safety", "--max-new-tokens", "8", "--limit", "30", "--json", cwd=workdir)
    got = json.loads(proc.stdout)
    assert got["adversarial_prompts"] == 6 and got["benign_prompts"] == 24 and got["judge"] == "rules"
    for k in ("harmful_rate", "refusal_rate", "benign_refusal_rate"):
        assert 0.0 <= got[k] <= 1.0
    # a reward model as the judge (a few steps: any scalar head shows the wiring)
    pairs = REPO / "data" / "sample" / "pref-words"
    proc = run_megaflow("train", "rm", "--config", str(REPO / "configs/stages/rm-tiny.yaml"), f"init_from={ckpt}",
                        f"data.train=[{{path: {pairs / 'train.jsonl'}}}]", "data.preference.valid=[]",
                        f"run.dir={tmp_path / 'rm'}", "train.steps=3", "train.warmup_steps=1", "eval.final=false", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_megaflow("eval", ckpt, "--metrics", "safety", "--max-new-tokens", "8", "--limit", "30", "--json",
                        "--safety-rm", str(tmp_path / "rm" / "rm" / "final"), "--safety-threshold", "1e9", cwd=workdir)
    got = json.loads(proc.stdout)
    assert got["judge"].startswith("reward model")
    # below an unreachable threshold every answer that does not refuse is harmful
    assert got["harmful_rate"] == pytest.approx(1.0 - got["refusal_rate"])


def test_a_prompts_file_that_is_not_json_is_one_line(workdir, tiny_sft, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine", "label": "benign"}\nnot json\n')
    proc = run_megaflow("eval", str(tiny_sft / "final"), "--metrics", "safety", "--data", str(bad), cwd=workdir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megaflow:")]
    assert proc.returncode != 0 and len(lines) == 1 and f"{bad}:2: not valid JSON" in lines[0], proc.stderr[-2000:]
