"""The SFT stage end to end: the tiny pretrained model learns megaflow's synthetic instruction set
(data/sample/sft-words: copy, first word and last word of three common words), which it cannot do before.

Measured (2 CPU cores, 2026-11-26): held-out exact match of the base model 0%, after SFT_STEPS steps of
SFT the number the test prints; the test asserts base <= 5% and SFT >= MIN_EXACT_MATCH."""

from __future__ import annotations

import json

import pytest

from tests.conftest import HELD_OUT, REPO, SFT_CONFIG, SFT_STEPS, run_megaflow

pytestmark = pytest.mark.slow

MIN_EXACT_MATCH = 0.5


def _exact_match(workdir, ckpt, limit):
    proc = run_megaflow("eval", str(ckpt), "--metrics", "exact_match", "--data", str(HELD_OUT), "--limit", str(limit),
                        "--max-new-tokens", "16", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["exact_match"]


def test_sft_teaches_the_instructions(workdir, tiny_pretrain, tiny_sft):
    result = json.loads((tiny_sft / "eval.json").read_text())
    base = _exact_match(workdir, tiny_pretrain / "final", 50)
    print(f"held-out exact match: base model {base:.1%} (50 examples), after {SFT_STEPS} SFT steps "
          f"{result['exact_match']:.1%} ({result['exact_match_examples']} examples); valid loss {result['valid_loss']:.3f}")
    assert base <= 0.05
    assert result["exact_match_examples"] == 200
    assert result["exact_match"] >= MIN_EXACT_MATCH
    rows = [json.loads(line) for line in (tiny_sft / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    assert len(losses) == SFT_STEPS and losses[-1] < losses[0] / 3


def test_eval_reproduces_the_stage_exact_match(workdir, tiny_sft):
    """The same number from the saved checkpoint (`megaflow eval --metrics exact_match`) as from the
    trainer's own weights at the end of the stage: 40 examples, the same greedy decoding."""
    result = json.loads((tiny_sft / "eval.json").read_text())
    first = sum(s["prediction"].strip() == s["answer"].strip() for s in result["exact_match_samples"])
    again = _exact_match(workdir, tiny_sft / "final", len(result["exact_match_samples"]))
    assert again == first / len(result["exact_match_samples"])


def test_the_final_checkpoint_records_its_parent_and_tokenizer(tiny_pretrain, tiny_sft):
    meta = json.loads((tiny_sft / "final" / "megaflow.json").read_text())
    assert meta["stage"] == "sft" and meta["parents"] == [str(tiny_pretrain / "final")]
    assert (tiny_sft / "final" / "tokenizer" / "tokenizer.json").is_file()


def test_unpacked_rows_cut_after_the_longest_give_the_losses_of_full_rows(workdir, tiny_pretrain):
    """Without packing, `data.padding: longest` (the default) computes each micro-batch only up to its
    longest sample: the same losses as rows padded to seq_length, fewer positions counted."""
    runs = {}
    for padding in ("longest", "max_length"):
        proc = run_megaflow("train", "sft", "--config", str(SFT_CONFIG), f"init_from={tiny_pretrain / 'final'}",
                            f"data.train=[{{path: {REPO / 'data/sample/sft-words/train.jsonl'}}}]", "data.sft.valid=[]",
                            "data.sft.packing=false", f"data.padding={padding}", f"run.dir=runs/sft-{padding}",
                            "train.steps=3", "train.warmup_steps=0", "eval.final=false", cwd=workdir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (workdir / "runs" / f"sft-{padding}" / "sft" / "metrics.jsonl").read_text().splitlines()
        runs[padding] = [json.loads(line) for line in lines if "split" not in line]
    losses = {k: [r["loss"] for r in rows] for k, rows in runs.items()}
    print(f"cut rows {losses['longest']} vs full rows {losses['max_length']}")
    assert losses["longest"] == pytest.approx(losses["max_length"], abs=1e-5)
    assert [r["tokens_seen"] for r in runs["max_length"]] == [16 * 64 * (k + 1) for k in range(3)]
    assert 0 < runs["longest"][-1]["tokens_seen"] <= runs["max_length"][-1]["tokens_seen"] / 2  # samples <= 32 tokens


def test_sft_bad_inputs_are_one_line(workdir, tmp_path, tiny_pretrain):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ho"}\n{"prompt": "only a prompt"}\n')
    cases = [
        (["init_from=null"], "init_from: the sft stage starts from a trained model"),
        ([f"init_from={tiny_pretrain / 'final'}", f"data.train=[{{path: {bad}}}]", "data.sft.valid=[]"],
         f"{bad}:2:"),
        ([f"init_from={tiny_pretrain / 'final'}", "data.train=[{path: nope.jsonl}]"], "data.train[0].path: file not found"),
    ]
    for overrides, needle in cases:
        proc = run_megaflow("train", "sft", "--config", str(SFT_CONFIG), f"run.dir={tmp_path / 'run'}", *overrides,
                            cwd=REPO)  # the config's relative data paths
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megaflow: error:")]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
