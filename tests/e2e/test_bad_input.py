"""Bad input: one clear line naming the key, file or line; exit code 2; nothing written."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, TEST_CONFIG, run_megaflow


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


def test_invalid_utf8_is_replaced_counted_and_warned_about_by_default(tmp_path, tokenizer_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(SAMPLE.read_bytes()[:1000] + b"\n\ncaf\xe9\n\nna\xefve \xff\n")  # 3 bad of ~1 kB: under 1%
    proc = run_megaflow("preprocess", "--input", str(bad), "--tokenizer", str(tokenizer_dir),
                        "--output", str(tmp_path / "ds" / "latin1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 invalid UTF-8" in proc.stdout, proc.stdout
    assert "megaflow: warning: " + str(bad) + ": 3 invalid UTF-8 sequences replaced" in proc.stderr, proc.stderr


def _binary_file(path, size=200_000):
    path.write_bytes(random.Random(0).randbytes(size))  # ~40% invalid UTF-8, some NUL bytes: 4 "documents"
    return path


def test_a_binary_file_is_refused_naming_it(tmp_path, tokenizer_dir):
    blob = _binary_file(tmp_path / "blob.bin")
    line = _fails_cleanly(_train_on(tmp_path, blob, tokenizer_dir), str(blob), "not UTF-8 text", "NUL bytes",
                          "data.max_invalid_utf8")
    assert "over the limit of 1.00%" in line
    assert not (tmp_path / "out").exists()  # run.dir as it was: the empty cache directory went too
    proc = run_megaflow("preprocess", "--input", str(blob), "--tokenizer", str(tokenizer_dir), "--output",
                        str(tmp_path / "ds" / "blob"), "--max-invalid-utf8", "1", cwd=tmp_path)
    assert proc.returncode == 0 and "NUL bytes" in proc.stdout and "warning" in proc.stderr, proc.stderr[-2000:]


def test_a_corpus_of_three_documents_trains_split_by_tokens(tmp_path, tokenizer_dir):
    """Without blank lines a text is one document; three of them left megatron's validation split without
    a document, and its dataset builder spun forever. Now the split is by tokens, in bounded time."""
    lines = [line for line in SAMPLE.read_text().splitlines() if line.strip()]
    third = len(lines) // 3
    few = tmp_path / "few.txt"
    few.write_text("\n\n".join("\n".join(lines[i * third:(i + 1) * third]) for i in range(3)) + "\n")
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), f"data.train=[{{path: {few}}}]",
                        f"tokenizer.path={tokenizer_dir}", "run.dir=out", "train.steps=3", "train.warmup_steps=0",
                        "eval.every=0", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has 3 document(s), too few to split by documents" in proc.stdout
    result = json.loads((tmp_path / "out" / "pretrain" / "eval.json").read_text())
    assert result["step"] == 3 and math.isfinite(result["valid_loss"]) and result["valid_tokens"] > 0


def test_a_corpus_smaller_than_one_sample_is_one_line(tmp_path, tokenizer_dir):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be.\n")
    proc = _train_on(tmp_path, tiny, tokenizer_dir)
    line = _fails_cleanly(proc, str(tiny), "fewer than one sample", "data.seq_length + 1 = 65")
    assert "data.split" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data"]  # the preprocessed corpus, named:
    assert "megaflow: note: kept what the stage made before the error, reused by the next run: out/data" in proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("data.train=[{path: x", "the value is not valid YAML"),
    ("train.steps={a: [}", "the value is not valid YAML"),
    ('run.name="unterminated', "the value is not valid YAML"),
    ("x=${", "override 'x=${'"),
    (".x=1", "the key has an empty part"),
    ("train..steps=1", "the key has an empty part"),
])
def test_malformed_override_is_one_line(tmp_path, override, needle):
    line = _fails_cleanly(run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), override, cwd=tmp_path), needle)
    assert f"override {override!r}" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU-only refusal")
def test_fp8_on_a_machine_without_transformer_engine(tmp_path):
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "precision=fp8", cwd=tmp_path)
    _fails_cleanly(proc, "precision=fp8 needs Transformer Engine on a GPU")
    assert not list(tmp_path.iterdir())  # refused before the tokenizer, the data or the stage directory


def test_eval_missing_checkpoint(tmp_path):
    proc = run_megaflow("eval", str(tmp_path / "nope"), "--json", cwd=tmp_path)
    _fails_cleanly(proc, "not a megaflow checkpoint")
    assert proc.stdout == ""


def _damage(final, tmp_path, how: str):
    """A copy of a final checkpoint with one kind of damage."""
    import shutil

    ckpt = tmp_path / f"ckpt-{how}"
    shutil.copytree(final, ckpt)
    weights = sorted((ckpt / "weights").glob("*.distcp"))[0]
    if how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:100])
        return ckpt, str(weights)
    if how == "truncated-metadata":
        meta = ckpt / "weights" / ".metadata"
        meta.write_bytes(meta.read_bytes()[:50])
        return ckpt, str(meta)
    if how == "invalid-megaflow-json":
        (ckpt / "megaflow.json").write_text('{"model": ')
        return ckpt, str(ckpt / "megaflow.json")
    data = bytearray(weights.read_bytes())  # flipped bytes in the middle of the tensors: the same size
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    return ckpt, str(weights)


@pytest.mark.parametrize("how, command", [
    ("truncated-weights", "init_from"), ("truncated-metadata", "eval"), ("invalid-megaflow-json", "generate"),
    ("flipped-bytes", "init_from"), ("flipped-bytes", "eval"), ("flipped-bytes", "generate"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, tiny_pretrain, how, command):
    """Every loader checks the manifest (sizes, CRC-32) first; a few flipped bytes used to load silently."""
    ckpt, bad_file = _damage(tiny_pretrain / "final", tmp_path, how)
    if command == "init_from":
        proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), f"init_from={ckpt}", "run.dir=out",
                            f"data.train=[{{path: {SAMPLE}}}]", cwd=tmp_path)
    elif command == "eval":
        proc = run_megaflow("eval", str(ckpt), "--json", cwd=tmp_path)
        assert proc.stdout == ""
    else:
        proc = run_megaflow("generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "2", cwd=tmp_path)
    line = _fails_cleanly(proc, bad_file)
    assert ("damaged checkpoint" in line or "not valid JSON" in line), line
    assert not (tmp_path / "out").exists()


def test_no_checksums_checks_sizes_only(tmp_path, tiny_pretrain):
    ckpt, _ = _damage(tiny_pretrain / "final", tmp_path, "flipped-bytes")
    proc = run_megaflow("inspect", str(ckpt), "--no-checksums", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["complete"], proc.stderr[-2000:]
    truncated, bad_file = _damage(tiny_pretrain / "final", tmp_path, "truncated-weights")
    proc = run_megaflow("generate", str(truncated), "--prompt", "To be", "--no-checksums", cwd=tmp_path)
    _fails_cleanly(proc, bad_file, "expected")


@pytest.mark.parametrize("args, needle", [
    (["eval", "x", "--batch-size", "0"], "eval: argument --batch-size: must be at least 1, got 0"),
    (["generate", "x", "--prompt", "a", "--max-new-tokens", "abc"], "generate: argument --max-new-tokens: invalid int value"),
    (["preprocess", "--input", "a", "--tokenizer", "t", "--output", "o", "--max-invalid-utf8", "nan"],
     "must be between 0 and 1"),
    (["train", "pretrain", "--config", "c.yaml", "--nproc-per-node", "0"], "must be at least 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_command_line_errors_are_one_line(tmp_path, args, needle):
    _fails_cleanly(run_megaflow(*args, cwd=tmp_path), needle)
    assert not list(tmp_path.iterdir())


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    _fails_cleanly(run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "run.dir=out", cwd=tmp_path),
                   "run.dir: out is a file")


def test_resuming_with_another_model_is_one_line_and_keeps_the_stage(workdir, tiny_pretrain):
    """The session's pretrain left checkpoints in its run.dir: the same command with another model shape
    would resume them; refused before its config.yaml (or anything) is rewritten."""
    before = {p: p.stat().st_mtime_ns for p in tiny_pretrain.rglob("*")}
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "model.hidden_size=64",
                        "model.ffn_hidden_size=192", cwd=workdir)
    _fails_cleanly(proc, "would resume a checkpoint of another model", "model.hidden_size: 64 vs 128",
                   "checkpoint.resume=false")
    assert {p: p.stat().st_mtime_ns for p in tiny_pretrain.rglob("*")} == before


def test_a_user_error_under_nproc_per_node_is_one_line(tmp_path):
    proc = run_megaflow("train", "pretrain", "--config", str(TEST_CONFIG), "data.train=[{path: nope.txt}]",
                        "--nproc-per-node", "2", cwd=tmp_path)
    _fails_cleanly(proc, "data.train[0].path: file not found: nope.txt")  # and no torchrun report
    assert "ChildFailedError" not in proc.stderr and not list(tmp_path.iterdir())


def test_a_damaged_indexed_dataset_is_one_line(tmp_path, tiny_pretrain):
    prefix = next((tiny_pretrain.parent / "data").glob("tinyshakespeare-*.json")).with_suffix("")
    for suffix in (".bin", ".idx"):
        (tmp_path / f"g{suffix}").write_bytes(Path(f"{prefix}{suffix}").read_bytes())
    (tmp_path / "g.bin").write_bytes((tmp_path / "g.bin").read_bytes()[:1000])
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--data", str(tmp_path / "g"), cwd=tmp_path)
    _fails_cleanly(proc, f"{tmp_path / 'g'}.bin: 1,000 bytes, but its index lists")
    (tmp_path / "g.idx").write_text("garbage\n")
    proc = run_megaflow("eval", str(tiny_pretrain / "final"), "--data", str(tmp_path / "g"), cwd=tmp_path)
    _fails_cleanly(proc, f"{tmp_path / 'g'}.idx: not a readable megatron index")


def test_inspect_reports_an_unreadable_megaflow_json(tmp_path, tiny_pretrain):
    ckpt, bad_file = _damage(tiny_pretrain / "final", tmp_path, "invalid-megaflow-json")
    proc = run_megaflow("inspect", str(ckpt), "--json", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["complete"] is False and bad_file in json.loads(proc.stdout)["problem"]


def test_eval_of_an_sft_checkpoint_without_data_is_one_line(tmp_path, tiny_sft):
    _fails_cleanly(run_megaflow("eval", str(tiny_sft / "final"), cwd=tmp_path),
                   "a checkpoint of the sft stage has no validation split of raw text", "pass --data FILE")
