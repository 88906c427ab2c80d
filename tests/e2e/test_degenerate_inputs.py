"""No stage sits silent: each gets the smallest input it could be given (one document, one record, one
pair, a held-out fraction larger than the data, a held-out file with nothing usable) and must end, done
or with one line, within a bounded time (the subprocess' timeout fails the test)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, SAMPLE, SFT_CONFIG, TEST_CONFIG, run_megaflow

pytestmark = pytest.mark.slow

BOUND_S = 240  # each of these runs takes 10-20 s on 2 cores
SHORT = ["train.steps=2", "train.warmup_steps=0", "checkpoint.every=0"]
CONFIGS = {"pretrain": TEST_CONFIG, "sft": SFT_CONFIG, "rm": REPO / "configs/stages/rm-tiny.yaml",
           "dpo": REPO / "configs/stages/dpo-tiny.yaml"}


def _first_lines(path, n: int, out):
    out.write_text("".join(path.read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "dpo"])
def test_each_stage_ends_on_the_smallest_input(tmp_path, workdir, tiny_pretrain, tiny_sft, stage):
    if stage == "pretrain":  # the whole corpus as one document: by documents, the valid split gets nothing
        overrides = [f"data.train=[{{path: {SAMPLE}}}]", "data.split_documents_on=none", "eval.every=0",
                     f"tokenizer.path={tiny_pretrain / 'final' / 'tokenizer'}"]
    elif stage == "sft":
        one = _first_lines(REPO / "data/sample/sft-words/train.jsonl", 1, tmp_path / "one.jsonl")
        overrides = [f"init_from={tiny_pretrain / 'final'}", f"data.train=[{{path: {one}}}]", "data.sft.valid=[]",
                     "data.sft.valid_fraction=0.5"]
    else:
        one = _first_lines(REPO / "data/sample/pref-words/train.jsonl", 1, tmp_path / "one.jsonl")
        overrides = [f"init_from={tiny_sft / 'final'}", f"data.train=[{{path: {one}}}]", "data.preference.valid=[]"]
    proc = run_megaflow("train", stage, "--config", str(CONFIGS[stage]), f"run.dir={tmp_path / 'run'}", *SHORT,
                        *overrides, cwd=workdir, timeout=BOUND_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / stage / "eval.json").read_text())
    assert result["status"] == "done" and result["step"] == 2
    if stage == "pretrain":
        assert "split by tokens instead" in proc.stdout and result["valid_tokens"] > 0


def test_a_held_out_fraction_larger_than_the_data_leaves_one_pair_to_train_on(tmp_path, workdir, tiny_sft):
    two = _first_lines(REPO / "data/sample/pref-words/train.jsonl", 2, tmp_path / "two.jsonl")
    proc = run_megaflow("train", "dpo", "--config", str(CONFIGS["dpo"]), f"run.dir={tmp_path / 'run'}", *SHORT,
                        f"init_from={tiny_sft / 'final'}", f"data.train=[{{path: {two}}}]", "data.preference.valid=[]",
                        "data.preference.valid_fraction=0.9", cwd=workdir, timeout=BOUND_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 training pairs, 1 held out" in proc.stdout


def test_a_held_out_file_with_nothing_usable_is_one_line(tmp_path, workdir, tiny_sft):
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"prompt": "", "chosen": "", "rejected": ""}\n')
    proc = run_megaflow("train", "rm", "--config", str(CONFIGS["rm"]), f"run.dir={tmp_path / 'run'}", *SHORT,
                        f"init_from={tiny_sft / 'final'}", f"data.preference.valid=[{useless}]",
                        f"data.train=[{{path: {REPO / 'data/sample/pref-words/train.jsonl'}}}]",
                        "data.preference.allow_skip=true", cwd=workdir, timeout=BOUND_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megaflow: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"megaflow: error: data.preference.valid ({useless}): no usable pairs"), errors
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
