"""Pretraining data: raw files -> cached indexed datasets -> megatron's blended GPT datasets -> batches.

Raw inputs (text, jsonl, parquet) are preprocessed once into `data.cache_dir` (default `run.dir/data`),
keyed by the file's path, size and mtime and the tokenizer; an existing `.bin/.idx` prefix is used as is.
megatron's BlendedMegatronDatasetBuilder does the weighted blend and the train/valid/test split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaflow.config.schema import StageConfig
from megaflow.data.readers import expand_inputs
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import DataError
from megaflow.runtime import distributed as dist


@dataclass
class MegatronTokenizerView:
    """The four attributes megatron's GPTDataset reads from a tokenizer."""

    vocab_size: int
    eod: int
    pad: int
    bos: int | None = None

    @property
    def unique_identifiers(self) -> dict:  # part of megatron's dataset cache key
        return {"class": "megaflow.Tokenizer", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


def indexed_prefix_of(path: str) -> str | None:
    base = path.removesuffix(".bin").removesuffix(".idx")
    if os.path.isfile(base + ".bin") and os.path.isfile(base + ".idx"):
        return base
    return None


def _cache_key(files: list[str], tokenizer_dir: str, field: str, split: str) -> str:
    stats = [(str(Path(f).resolve()), (st := Path(f).stat()).st_size, st.st_mtime_ns) for f in files]
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    tok_sig = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else str(tokenizer_dir)
    raw = json.dumps([stats[0][0], stats[0][1], stats[0][2], tok_sig, field, split] if len(stats) == 1
                     else [stats, tok_sig, field, split])
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def indexed_prefixes(cfg: StageConfig, tokenizer_dir: str, log=dist.print_rank0) -> list[tuple[str, float]]:
    """(prefix, weight) for every `data.train` source, preprocessing raw files on rank 0 first."""
    from megaflow.data.preprocess import preprocess

    if not cfg.data.train:
        raise DataError("data.train: no training data given")
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.run.dir) / "data")
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out = []
    for i, src in enumerate(cfg.data.train):
        prefix = indexed_prefix_of(src.path)
        if prefix is None:
            path = Path(src.path)
            if not path.exists():
                raise DataError(f"data.train[{i}].path: file not found: {src.path}")
            files = expand_inputs([str(path)])  # a directory: its data files, e.g. a curate stage's shards
            key = _cache_key(files, tokenizer_dir, src.field, cfg.data.split_documents_on)
            prefix = str(cache_dir / f"{path.name.split('.')[0]}-{key}")
            # PREFIX.json is written last by preprocess: without it the pair may be half replaced
            if rank0 and not Path(prefix + ".json").is_file():
                log(f"data: preprocessing {src.path} -> {prefix}.bin/.idx")
                preprocess(files, tokenizer_dir, prefix, workers=cfg.data.workers, field=src.field,
                           split_documents_on=cfg.data.split_documents_on, invalid_utf8=cfg.data.invalid_utf8,
                           max_invalid_utf8=cfg.data.max_invalid_utf8)
        out.append((prefix, src.weight))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def build_datasets(cfg: StageConfig, tokenizer: Tokenizer, tokenizer_dir: str, num_samples: list[int],
                   log=dist.print_rank0):
    """Train, valid and test GPTDatasets (None where a split has no weight) with at least the given
    numbers of samples, and the source prefixes; megatron's builder writes its shuffle indices next to the
    cached data. `log` hears what each phase does."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megaflow.data.splits import SPLIT_NAMES, plan_splits

    prefixes = indexed_prefixes(cfg, tokenizer_dir, log)
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.run.dir) / "data")
    plan = plan_splits([p for p, _ in prefixes], cfg.data.split, cfg.data.seq_length, cache_dir,
                       write=dist.is_rank0(), names=[src.path for src in cfg.data.train], log=log)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    weights = [w for _, w in prefixes] if len(prefixes) > 1 else None
    if plan.per_split is None:
        blend = dict(blend=(plan.prefixes, weights), split=",".join(str(s) for s in cfg.data.split))
        paths = plan.prefixes
    else:
        blend = dict(blend_per_split=[None if ps is None else (ps, weights) for ps in plan.per_split])
        paths = plan.per_split[0]
    view = MegatronTokenizerView(tokenizer.vocab_size, tokenizer.eod_id, tokenizer.pad_id, tokenizer.bos_id)
    ds_cfg = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.data.seq_length,
        **blend,
        path_to_cache=str(cache_dir / "index-cache"),
        tokenizer=view,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    wanted = ", ".join(f"{name} {n:,}" for name, n, w in zip(SPLIT_NAMES, num_samples, cfg.data.split) if w > 0)
    log(f"data: building sample indices ({wanted} samples of {cfg.data.seq_length} tokens)")
    try:
        return (*BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, ds_cfg).build(), paths)
    except AssertionError as e:
        raise DataError(f"data: cannot build datasets from {paths}: {e or 'split too small for the sequence length'}") from None


def consumed_per_dataset(train_ds, prefixes: list[str]):
    """A function: consumed samples of the (possibly blended) train split -> samples drawn from each source.

    The blend's sample order is fixed by its seed, so the global count is the exact data position; this
    breakdown is what a user reads in a checkpoint's megaflow.json."""
    index = getattr(train_ds, "dataset_index", None)

    def position(consumed: int) -> dict[str, int]:
        if index is None:
            return {prefixes[0]: consumed}
        full, partial = divmod(consumed, len(index))
        counts = full * np.bincount(index, minlength=len(prefixes)) + np.bincount(index[:partial], minlength=len(prefixes))
        return {p: int(c) for p, c in zip(prefixes, counts)}

    return position


def token_counts(dataset, vocab_size: int, max_samples: int = 20000) -> np.ndarray:
    """Label-token frequencies over the first `max_samples` samples of a split."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(len(dataset), max_samples)):
        counts += np.bincount(dataset[i]["labels"].numpy(), minlength=vocab_size)
    return counts


def unigram_perplexity(dataset, num_samples: int, train_counts: np.ndarray) -> float:
    """Perplexity on `dataset` of a unigram model fitted to `train_counts` (add-one smoothed): the baseline
    a language model must beat by a wide margin.

        ppl = exp(-mean_t log p(x_t)),   p(v) = (c_v + 1) / (sum_v c_v + V)
    """
    labels = np.concatenate([dataset[i]["labels"].numpy() for i in range(min(num_samples, len(dataset)))])
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    return float(np.exp(-np.log(probs[labels]).mean()))
