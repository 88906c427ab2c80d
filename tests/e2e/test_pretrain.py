"""The pretraining stage end to end on the bundled sample (the test variant of pretrain-tiny)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import TEST_CONFIG, run_megaflow

pytestmark = pytest.mark.slow


def _metrics(stage_dir, split=None):
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def test_loss_falls(tiny_pretrain):
    losses = [r["loss"] for r in _metrics(tiny_pretrain)]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"train loss {first:.3f} -> {last:.3f}")
    assert last < first - 1.0
    assert all(math.isfinite(r["grad_norm"]) and r["tok_per_s"] > 0 and r["mfu"] > 0 for r in _metrics(tiny_pretrain))


def test_eval_reports_perplexity(tiny_pretrain):
    result = json.loads((tiny_pretrain / "eval.json").read_text())
    assert result["valid_ppl"] == pytest.approx(math.exp(result["valid_loss"]))
    assert result["valid_tokens"] == 2 * 16 * 64  # eval.iters x global batch x seq
    print(f"valid ppl {result['valid_ppl']:.1f}, unigram {result['unigram_ppl']:.1f}")
    assert result["valid_ppl"] < result["unigram_ppl"]
    valid_rows = _metrics(tiny_pretrain, "valid")
    assert [r["step"] for r in valid_rows] == [20, 40]
    assert valid_rows[-1]["loss"] == pytest.approx(result["valid_loss"])


def test_run_directory_layout(tiny_pretrain):
    assert (tiny_pretrain / "config.yaml").is_file()
    latest = (tiny_pretrain / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000040" and (tiny_pretrain / "checkpoints" / latest).is_dir()
    assert not list((tiny_pretrain / "checkpoints").glob("*.tmp"))
    assert len(list((tiny_pretrain / "checkpoints").glob("iter_*"))) == 1  # checkpoint.keep=1
    meta = json.loads((tiny_pretrain / "final" / "megaflow.json").read_text())
    assert meta["stage"] == "pretrain" and meta["step"] == 40 and meta["tokens_seen"] == 40 * 16 * 64
    assert (tiny_pretrain / "final" / "tokenizer" / "tokenizer.json").is_file()
    assert list((tiny_pretrain / "tensorboard").glob("events.*"))


def test_final_checkpoint_reproduces_evaluation(tiny_pretrain, workdir):
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # --json: one object on stdout, nothing else
    expected = json.loads((tiny_pretrain / "eval.json").read_text())
    assert result["tokens"] == expected["valid_tokens"]
    assert result["loss"] == pytest.approx(expected["valid_loss"], rel=1e-6, abs=1e-6)


def test_eval_on_a_text_file(tiny_pretrain, workdir, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text((workdir / "data" / "sample" / "tinyshakespeare.txt").read_text()[-20000:])
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--data", str(held_out), "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["samples"] > 0 and math.isfinite(result["ppl"]) and result["ppl"] < 1024


def test_rerun_resumes_from_latest_instead_of_retraining(tiny_pretrain, tmp_path):
    """A finished run started again loads `latest` (step 40 = train.steps) and does no more steps."""
    import shutil

    shutil.copytree(tiny_pretrain.parents[1], tmp_path / "runs", symlinks=True)
    (tmp_path / "data").symlink_to(tiny_pretrain.parents[2] / "data")
    copy = tmp_path / "runs" / "tiny-test" / "pretrain"
    before = len(_metrics(copy))
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "eval.final=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    assert len(_metrics(copy)) == before


def test_inspect_reports_a_checkpoint_and_catches_corruption(tiny_pretrain, workdir, tmp_path):
    import shutil

    proc = run_megaflow("inspect", str(tiny_pretrain), "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["kind"] == "final" and info["complete"] and info["stage"] == "pretrain" and info["step"] == 40
    assert info["tokens_seen"] == 40 * 16 * 64 and info["model"]["hidden_size"] == 128
    assert info["parallel_at_save"]["tp"] == 1 and info["parallel_at_save"]["dp"] == 1
    assert info["model_parameters"] > 1_000_000 and info["bytes"] > 4_000_000
    assert info["tokenizer"].endswith("final/tokenizer")

    copy = tmp_path / "iter"
    shutil.copytree(tiny_pretrain / "checkpoints" / "iter_0000040", copy)
    text = run_megaflow("inspect", str(copy), cwd=workdir)
    assert text.returncode == 0 and "complete     yes" in text.stdout and "step 40" in text.stdout
    victim = max(copy.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)
    bad = run_megaflow("inspect", str(copy), "--json", cwd=workdir)
    assert bad.returncode == 1
    info = json.loads(bad.stdout)
    assert not info["complete"] and victim.name in info["problem"] and "truncated" in info["problem"]
