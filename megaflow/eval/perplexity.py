"""Perplexity of a checkpoint.

Without `--data`, the checkpoint's own validation split is rebuilt from the config stored in its
megaflow.json (same files, split, seed and sample count), so the number reproduces the stage's eval.json.
With `--data`, a file (or indexed prefix) is cut into consecutive windows of `seq_length + 1` tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from megaflow.config import StageConfig
from megaflow.config.loader import validate
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.models import manifest
from megaflow.models import weights
from megaflow.training import stage
from megaflow.training.engine import build_model, data_parallel_rank_and_size, evaluate
from megaflow.training.lm import LanguageModelTask


class WindowDataset:
    """Consecutive non-overlapping windows over all tokens of an indexed dataset (documents joined by
    their end-of-document tokens); the last partial window is dropped."""

    def __init__(self, prefix: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megaflow.data.splits import sequence_lengths

        sequence_lengths(prefix)  # a damaged pair is one line naming the file
        indexed = IndexedDataset(prefix)
        self.tokens = np.concatenate([indexed[i] for i in range(len(indexed))]).astype(np.int64)
        self.seq = seq_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[i * self.seq : (i + 1) * self.seq + 1])
        return {"tokens": chunk[:-1], "labels": chunk[1:], "loss_mask": torch.ones(self.seq)}


def _stage_config(meta: dict, seq_length: int | None, batch_size: int) -> StageConfig:
    raw = dict(meta.get("config") or {})
    raw.pop("parallel", None)
    raw.setdefault("model", meta["model"])
    raw["train"] = {**raw.get("train", {}), "micro_batch_size": batch_size, "global_batch_size": batch_size}
    raw.setdefault("data", {})
    return validate(raw | {"data": raw["data"] | ({"seq_length": seq_length} if seq_length else {})})


def evaluate_checkpoint(ckpt: str, data: str | None = None, seq_length: int | None = None, batch_size: int = 8,
                        max_batches: int | None = None, quiet: bool = False, split_of: str | None = None) -> dict:
    """Loss and perplexity of the weights in `ckpt` (a final/ directory) on `data` or on a pretraining
    checkpoint's validation split: its own, or `split_of`'s (every stage of a pipeline on the same text)."""
    meta = weights.read_meta(ckpt)
    manifest.require_intact(ckpt)  # before any data is built
    split_meta = meta if split_of is None else weights.read_meta(split_of)
    cfg = _stage_config(meta | {"config": split_meta.get("config")}, seq_length, batch_size)
    cfg.model = _stage_config(meta, seq_length, batch_size).model
    tokenizer = Tokenizer.load(str(Path(ckpt) / meta.get("tokenizer", "tokenizer")))
    stage.setup_runtime(cfg)
    dp_rank, dp_size = data_parallel_rank_and_size()

    if data is None:
        from megaflow.data.pretrain import build_datasets

        if "eval_samples" not in split_meta:
            raise UserError(f"{split_of or ckpt}: a checkpoint of the {split_meta.get('stage', 'unknown')} stage has "
                            "no validation split of raw text to evaluate by default; pass --data FILE")

        # The same sample counts as the stage asked for, so megatron builds the same shuffle.
        n, built = split_meta["eval_samples"], split_meta["valid_samples_built"]
        _, dataset, _, _ = build_datasets(cfg, tokenizer, str(Path(ckpt) / "tokenizer"), [1, built, 1],
                                          log=(lambda _: None) if quiet else dist.print_rank0)
        if dataset is None:
            raise UserError(f"{ckpt}: its config has no validation split; pass --data")
        n_samples, source = n, "validation split"
    else:
        from megaflow.data.pretrain import indexed_prefix_of
        from megaflow.data.preprocess import preprocess

        prefix = indexed_prefix_of(data)
        tmp = None
        if prefix is None:
            if not Path(data).is_file():
                raise UserError(f"--data: file not found: {data}")
            tmp = tempfile.TemporaryDirectory(prefix="megaflow-eval-")
            prefix = str(Path(tmp.name) / "eval")
            if dist.is_rank0():
                preprocess([data], str(Path(ckpt) / "tokenizer"), prefix)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        dataset = WindowDataset(prefix, cfg.data.seq_length)
        n_samples, source = len(dataset), data
    per_batch = batch_size * dp_size
    batches = n_samples // per_batch
    if max_batches is not None:
        batches = min(batches, max_batches)
    if batches == 0:
        raise UserError(f"--data: {source} holds fewer than {per_batch} windows of {cfg.data.seq_length} tokens")

    model, _ = build_model(cfg, meta["padded_vocab_size"])
    weights.load_weights(ckpt, model)
    from megaflow.data.sampler import MicroBatches, stack_lm

    iterators = [MicroBatches(dataset, batch_size, dp_rank, dp_size, collate=stack_lm) for _ in model]
    result = evaluate(model, LanguageModelTask(), iterators, batches, 1, cfg.data.seq_length, batch_size)
    return {"data": source, "samples": batches * per_batch, "loss": result["loss"], "ppl": result["ppl"],
            "tokens": result["tokens"]}
