"""Pretraining datasets: weighted blends and train/valid/test splits through megatron's builder, and the
data-parallel batch order."""

from __future__ import annotations

import numpy as np
import pytest

from megaflow.config.schema import StageConfig
from megaflow.data.pretrain import build_datasets, consumed_per_dataset
from megaflow.data.sampler import MicroBatches, stack_lm
from megaflow.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    a, b = root / "a.txt", root / "b.txt"
    a.write_text("\n\n".join("apple banana cherry " * 20 for _ in range(200)))
    b.write_text("\n\n".join("xylophone zebra yak " * 20 for _ in range(200)))
    tok = train_tokenizer([str(a), str(b)], 300, str(root / "tok"))
    return root, a, b, tok


def _cfg(root, sources, split=(90, 10, 0)):
    return StageConfig.model_validate({
        "run": {"dir": str(root / "run")},
        "data": {"train": sources, "split": list(split), "seq_length": 32},
        "train": {"steps": 10, "micro_batch_size": 2, "global_batch_size": 4},
    })


def test_weighted_blend_follows_the_weights(corpora):
    root, a, b, tok = corpora
    cfg = _cfg(root, [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}])
    train, valid, test, sources = build_datasets(cfg, tok, str(root / "tok"), [400, 40, 0])
    assert len(train) >= 400 and valid is not None and test is None
    from_a = {t for t in tok.encode(" apple banana cherry") if t >= 7}
    share_a = np.mean([bool(set(train[i]["tokens"].tolist()) & from_a) for i in range(400)])
    assert 0.70 <= share_a <= 0.80, share_a
    per_dataset = consumed_per_dataset(train, sources)(400)
    assert sum(per_dataset.values()) == 400 and abs(list(per_dataset.values())[0] - 300) <= 10


def test_indexed_prefix_is_used_as_is_and_split_has_no_overlap(corpora):
    root, a, _, tok = corpora
    cfg = _cfg(root, [{"path": str(a)}], split=(50, 50, 0))
    train, valid, _, _ = build_datasets(cfg, tok, str(root / "tok"), [20, 20, 0])
    prefix = next((root / "run" / "data").glob("a-*.bin")).with_suffix("")
    cfg2 = _cfg(root, [{"path": str(prefix)}], split=(50, 50, 0))
    train2, _, _, _ = build_datasets(cfg2, tok, str(root / "tok"), [20, 20, 0])
    assert all(np.array_equal(train[i]["tokens"], train2[i]["tokens"]) for i in range(20))
    docs_train, docs_valid = set(np.unique(train.document_index)), set(np.unique(valid.document_index))
    assert docs_train and docs_valid and not docs_train & docs_valid


def test_data_parallel_ranks_split_each_global_batch():
    data = [{"tokens": np.array([i]), "labels": np.array([i]), "loss_mask": np.array([1.0])} for i in range(64)]
    data = [{k: __import__("torch").as_tensor(v) for k, v in d.items()} for d in data]
    single = MicroBatches(data, micro_batch_size=4, dp_rank=0, dp_size=1, collate=stack_lm)
    ranks = [MicroBatches(data, micro_batch_size=2, dp_rank=r, dp_size=2, collate=stack_lm) for r in range(2)]
    seen_single = {int(x) for _ in range(2) for x in next(single)["tokens"].flatten()}
    seen_dp = {int(x) for it in ranks for _ in range(2) for x in next(it)["tokens"].flatten()}
    assert seen_single == seen_dp == set(range(8))  # the same eight samples make the first global batch
    resumed = MicroBatches(data, micro_batch_size=4, dp_rank=0, dp_size=1, consumed_samples=8, collate=stack_lm)
    assert next(resumed)["tokens"].flatten().tolist() == [8, 9, 10, 11]


def test_too_few_documents_are_split_by_tokens_in_order(corpora):
    """Three documents and split 90/10: by documents the validation split would get none (and megatron's
    GPTDataset would loop forever on it); by tokens it gets the corpus' last 10%, and train + valid are
    the corpus' tokens in order, cut at round(0.9 * T)."""
    root, a, _, tok = corpora
    few = root / "few.txt"
    few.write_text("\n\n".join(("apple banana cherry " * 300).strip() for _ in range(3)))
    cfg = _cfg(root, [{"path": str(few)}])
    train, valid, test, sources = build_datasets(cfg, tok, str(root / "tok"), [20, 4, 0])
    assert len(train) >= 20 and len(valid) >= 4 and test is None
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    whole = IndexedDataset(next((root / "run" / "data").glob("few-*.json")).with_suffix("").as_posix())
    parts = [IndexedDataset(p) for p in (sources[0], sources[0].replace("-train", "-valid"))]
    original = np.concatenate([whole[i] for i in range(len(whole))])
    pieces = [np.concatenate([ds[i] for i in range(len(ds))]) for ds in parts]
    assert len(whole) == 3 and len(pieces[0]) == round(0.9 * len(original))
    assert np.array_equal(np.concatenate(pieces), original)


def test_a_split_smaller_than_one_sample_is_one_clear_error(corpora):
    from megaflow.errors import DataError

    root, _, _, tok = corpora
    tiny = root / "tiny.txt"
    tiny.write_text("apple banana cherry " * 40)  # ~120 tokens: 5% of it is less than one sample of 33
    with pytest.raises(DataError, match=r"tiny.txt: its valid split .* would hold \d+ of its \d+ tokens, fewer than "
                                        r"one sample \(data.seq_length \+ 1 = 33\)"):
        build_datasets(_cfg(root, [{"path": str(tiny)}], split=(95, 5, 0)), tok, str(root / "tok"), [20, 4, 0])


def test_document_and_token_bounds_follow_megatron():
    from megaflow.data.splits import bounds, split_matrix, tokens_by_documents

    matrix = split_matrix([95, 5, 0])
    assert matrix[2] is None and bounds(3, matrix)[:2] == [(0, 3), (3, 3)]
    assert tokens_by_documents(np.array([10, 20, 30]), matrix)[:2] == [60, 0]
    assert bounds(1000, matrix)[:2] == [(0, 950), (950, 1000)]
