"""Readers and preprocessing into megatron .bin/.idx: token counts, formats, determinism, bad input."""

import gzip
import json
import os

import numpy as np
import pytest

import megaflow.data.preprocess as preprocess_module
from megaflow.data.preprocess import cached_stats, count_tokens, preprocess
from megaflow.data.readers import ReadStats, iter_documents
from megaflow.data.tokenizer import Tokenizer, train_tokenizer
from megaflow.errors import DataError, UserError



@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([str(corpus)], 500, str(output))
    return str(output)


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def _documents(path, **options) -> list[str]:
    return list(iter_documents(path, **options))


# --- readers ------------------------------------------------------------------------------------


def test_blank_lines_split_plain_text(tmp_path):
    path = tmp_path / "hand.txt"
    path.write_bytes(b"one\ntwo\n\n\n\nthree\n \t \nfour\r\nfive\r\n\r\n   \n\n  six  \n")
    assert _documents(path) == ["one\ntwo", "three", "four\nfive", "  six  "]
    assert _documents(path, split_documents_on="none") == ["one\ntwo\n\n\n\nthree\n \t \nfour\nfive\n\n   \n\n  six  "]


def test_gzipped_text_reads_like_plain_text(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write(b"alpha\n\nbeta\n")
    assert _documents(tmp_path / "a.txt.gz") == ["alpha", "beta"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text('{"text": "a"}\n\n{broken\n')
    with pytest.raises(DataError, match=r"file\.jsonl:3: not valid JSON"):
        _documents(path)
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:2: no field 'text'"):
        _documents(path)
    path.write_text('{"text": 7}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1: field 'text' is not a string \(got int\)"):
        _documents(path)
    path.write_text('["text"]\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1: expected a JSON object"):
        _documents(path)


def test_missing_file_and_parquet_column(tmp_path):
    with pytest.raises(DataError, match="input file not found: .*nope.txt"):
        _documents(tmp_path / "nope.txt")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: body\)"):
        _documents(tmp_path / "t.parquet")


def test_invalid_utf8_is_replaced_and_counted_or_reported(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\n\ncaf\xe9 au lait\nbad \xff\xfe bytes\n\n\xf0\x9f\x8e\x89 ok\n")
    stats = ReadStats()
    docs = list(iter_documents(path, stats=stats))
    assert docs == ["fine line", "caf\ufffd au lait\nbad \ufffd\ufffd bytes", "\U0001f389 ok"]
    assert (stats.invalid_utf8_replaced, stats.documents) == (3, 3)
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8 \(byte 0xe9"):
        _documents(path, invalid_utf8="error")


def test_lone_surrogates_in_jsonl_count_as_invalid_utf8(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud83c\\udf89"}\n{"text": "lone \\udc80 here"}\n')
    stats = ReadStats()
    assert list(iter_documents(path, stats=stats)) == ["ok \U0001f389", "lone \ufffd here"]
    assert stats.invalid_utf8_replaced == 1
    with pytest.raises(DataError, match=r"s\.jsonl:2: invalid UTF-8"):
        _documents(path, invalid_utf8="error")


# --- preprocess ---------------------------------------------------------------------------------


def test_tokens_match_the_tokenizer(corpus, tokenizer_dir, tmp_path):
    prefix = tmp_path / "out" / "shakespeare"  # the parent directory does not exist yet
    stats = preprocess([str(corpus)], tokenizer_dir, str(prefix))
    tok = Tokenizer.load(tokenizer_dir)
    docs = _documents(corpus)
    expected_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    assert (stats.documents, stats.tokens, stats.files) == (len(docs), expected_tokens, 1)
    assert count_tokens([str(corpus)], tok) == expected_tokens

    dataset = _indexed(prefix)
    assert len(dataset) == len(docs) and len(dataset.document_indices) == len(docs) + 1
    assert int(dataset.sequence_lengths.sum()) == expected_tokens
    assert dataset[0].dtype == np.uint16
    assert dataset[0].tolist() == tok.encode(docs[0]) + [tok.eod_id]
    assert dataset[len(docs) - 1].tolist() == tok.encode(docs[-1]) + [tok.eod_id]
    assert tok.decode(dataset[1][:-1]) == docs[1]

    metadata = json.loads(prefix.with_suffix(".json").read_text())
    assert metadata["stats"]["tokens"] == expected_tokens
    assert metadata["inputs"][0]["size"] == corpus.stat().st_size
    assert str(stats.tokens) in stats.summary().replace(",", "")
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["shakespeare.bin", "shakespeare.idx", "shakespeare.json"]


def test_worker_count_does_not_change_the_output(corpus, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_module, "CHUNK_DOCUMENTS", 16)  # many chunks, several in flight
    one = preprocess([str(corpus)], tokenizer_dir, str(tmp_path / "one"), workers=1)
    two = preprocess([str(corpus)], tokenizer_dir, str(tmp_path / "two"), workers=2, progress=True)
    assert one.documents > 5 * 16
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    assert (one.documents, one.tokens) == (two.documents, two.tokens)


def test_jsonl_gz_and_parquet_with_a_custom_field(tokenizer_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = ["To be, or not to be", "that is the question:", "  \n ", "Whether 'tis nobler 🎭"]
    lines = "".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "a.jsonl").write_text(lines + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"id": list(range(4)), "content": texts}), tmp_path / "a.parquet")
    outputs = []
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
        stats = preprocess([str(tmp_path / name)], tokenizer_dir, str(tmp_path / name), field="content")
        assert stats.documents == 3  # the whitespace-only record is skipped
        outputs.append((tmp_path / f"{name}.bin").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    with pytest.raises(DataError, match=r"a\.jsonl:1: no field 'text'"):
        preprocess([str(tmp_path / "a.jsonl")], tokenizer_dir, str(tmp_path / "x"))


def test_empty_corpus_writes_nothing(corpus, tokenizer_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n\t\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"empty\.txt: no documents \(empty corpus\)"):
        preprocess([str(corpus), str(tmp_path / "empty.txt")], tokenizer_dir, str(out / "data"), workers=2)
    assert list(out.iterdir()) == []


def test_a_failed_run_keeps_the_previous_dataset(corpus, tokenizer_dir, tmp_path):
    prefix = tmp_path / "data"
    preprocess([str(corpus)], tokenizer_dir, str(prefix))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        preprocess([str(corpus), str(tmp_path / "bad.jsonl")], tokenizer_dir, str(prefix))
    (tmp_path / "bad.jsonl").unlink()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_invalid_utf8_policy_in_preprocess(tokenizer_dir, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good\n\nbad \xff here\n\xc3(\n")
    stats = preprocess([str(tmp_path / "bad.txt")], tokenizer_dir, str(tmp_path / "out"), max_invalid_utf8=1.0)
    assert (stats.documents, stats.invalid_utf8_replaced) == (2, 2)
    assert "2 invalid UTF-8" in stats.summary()
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8 text .*2 invalid UTF-8 sequences and 0 NUL bytes in 20 "
                                        r"bytes, over the limit of 1\.00%"):  # the default
        preprocess([str(tmp_path / "bad.txt")], tokenizer_dir, str(tmp_path / "default"))
    assert not any(p.name.startswith("default") for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8"):
        preprocess([str(tmp_path / "bad.txt")], tokenizer_dir, str(tmp_path / "strict"), invalid_utf8="error")
    assert not any(p.name.startswith("strict") for p in tmp_path.iterdir())


def test_bad_arguments(corpus, tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="a directory; give a file prefix"):
        preprocess([str(corpus)], tokenizer_dir, str(tmp_path) + "/")
    assert not list(tmp_path.glob(".*"))
    with pytest.raises(DataError, match="input file not found: .*missing.txt"):
        preprocess([str(tmp_path / "missing.txt")], tokenizer_dir, str(tmp_path / "o"))
    with pytest.raises(DataError, match="tokenizer not found"):
        preprocess([str(corpus)], str(tmp_path / "no-tokenizer"), str(tmp_path / "o"))
    with pytest.raises(UserError, match="workers"):
        preprocess([str(corpus)], tokenizer_dir, str(tmp_path / "o"), workers=0)
    assert list(tmp_path.iterdir()) == []


def test_cached_stats_notice_changed_inputs(corpus, tokenizer_dir, tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("a b c\n\nd e f\n")
    stats = preprocess([str(text)], tokenizer_dir, str(tmp_path / "d"))
    assert cached_stats([str(text)], tokenizer_dir, str(tmp_path / "d")) == stats
    assert cached_stats([str(text)], tokenizer_dir, str(tmp_path / "d"), field="body") is None
    os.utime(text, (1, 1))
    assert cached_stats([str(text)], tokenizer_dir, str(tmp_path / "d")) is None
