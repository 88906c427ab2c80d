"""Bad input: one clear line naming the key, file or line; exit code 2; nothing written."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_CONFIG, run_megaflow


def _fails_cleanly(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megaflow: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["train.stepz=3"], ["train.stepz: unknown config key"]),
        (["train.steps=three"], ["train.steps:", "three"]),
        (["parallel.tp=3"], ["parallel.tp (3) must divide model.num_attention_heads (8)"]),
        (["data.seq_length=1024"], ["data.seq_length (1024) exceeds", "max_position_embeddings (256)"]),
    ],
)
def test_bad_config(tmp_path, overrides, needles):
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), *overrides, cwd=tmp_path)
    _fails_cleanly(proc, *needles)
    assert not list(tmp_path.iterdir())  # nothing written


def test_layout_that_does_not_fit_the_world(tmp_path):
    """Checked before the ranks are started (and so before any model is built)."""
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "parallel.tp=2", "--nproc-per-node", "3",
                        cwd=tmp_path)
    _fails_cleanly(proc, "--nproc-per-node 3: world size 3 is not divisible by parallel.tp*pp*cp (2*1*1 = 2)")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU-only refusal")
def test_context_parallel_on_cpu(tmp_path):
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "parallel.cp=2", "--nproc-per-node", "2",
                        cwd=tmp_path)
    _fails_cleanly(proc, "parallel.cp > 1 needs GPUs")
    assert not list(tmp_path.iterdir())


def test_missing_data_file(tmp_path):
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), cwd=tmp_path)
    _fails_cleanly(proc, "file not found", "data/sample/tinyshakespeare.txt")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def tokenizer_dir(tiny_pretrain):
    return tiny_pretrain / "final" / "tokenizer"


def _train_on(tmp_path, data_file, tokenizer_dir, *extra):
    return run_megaflow(
        "train", "pretrain", "--config", str(TEST_CONFIG), f"data.train=[{{path: {data_file}}}]",
        f"tokenizer.path={tokenizer_dir}", "run.dir=out", *extra, cwd=tmp_path,
    )


def test_empty_corpus(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    _fails_cleanly(_train_on(tmp_path, empty, tokenizer_dir), "empty.txt", "empty corpus")
    assert not list((tmp_path / "out").rglob("*.bin")) and not (tmp_path / "out" / "pretrain").exists()


def test_jsonl_line_that_is_not_json(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    _fails_cleanly(_train_on(tmp_path, bad, tokenizer_dir), "bad.jsonl:3", "not valid JSON")
    assert not (tmp_path / "out" / "pretrain").exists()


def test_invalid_utf8_is_refused_when_asked(tmp_path, tokenizer_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"good line\n\ncaf\xe9 au lait\n")
    line = _fails_cleanly(_train_on(tmp_path, bad, tokenizer_dir, "data.invalid_utf8=error"), "latin1.txt:3")
    assert "UTF-8" in line


def test_invalid_utf8_is_replaced_and_counted_by_default(tmp_path, tokenizer_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n\nna\xefve \xff\n")
    proc = run_megaflow("preprocess", "--input", str(bad), "--tokenizer", str(tokenizer_dir),
                        "--output", str(tmp_path / "ds" / "latin1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 invalid UTF-8" in proc.stdout or "invalid_utf8_replaced=3" in proc.stdout, proc.stdout


def test_eval_missing_checkpoint(tmp_path):
    proc = run_megaflow("eval", str(tmp_path / "nope"), "--json", cwd=tmp_path)
    _fails_cleanly(proc, "not a megaflow checkpoint")
    assert proc.stdout == ""
