"""What the preference stages (reward model, DPO) share: their inputs, the start from an SFT checkpoint,
the preference data with its held-out split, and micro-batches of (chosen, rejected) rows.

A micro-batch of m pairs is one [2m, seq] forward, chosen rows first (megaflow.data.preference); the
engine counts `rows_per_sample = 2` rows per sample for throughput and pipeline shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megaflow.config import StageConfig
from megaflow.config.schema import ModelConfig
from megaflow.data import preference
from megaflow.data.sft import split_holdout
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.training import checkpoint, init_from, stage
from megaflow.training.lm import causal_mask


def check_inputs(cfg: StageConfig) -> None:
    """Fail before anything is written (or megatron imported): data files, the initial checkpoint, layout."""
    if not cfg.data.train:
        raise UserError(f"data.train: no preference data given ({cfg.stage} trains on chosen/rejected pairs)")
    for i, src in enumerate(cfg.data.train):
        if not Path(src.path).exists():
            raise UserError(f"data.train[{i}].path: not found: {src.path}")
    for i, path in enumerate(cfg.data.preference.valid):
        if not Path(path).exists():
            raise UserError(f"data.preference.valid[{i}]: not found: {path}")
    if not cfg.init_from:
        raise UserError(f"init_from: the {cfg.stage} stage starts from a trained model: a megaflow checkpoint "
                        "(usually the SFT stage's final/) or hf:PATH")
    init_from.check_spec(cfg.init_from, cfg.model if cfg.model.model_fields_set else None)
    if cfg.parallel.cp > 1:
        raise UserError(f"parallel.cp={cfg.parallel.cp}: the {cfg.stage} stage does not support context parallelism yet")


def options(cfg: StageConfig) -> preference.PreferenceDataOptions:
    return preference.PreferenceDataOptions.from_config(cfg.data.preference, seq_length=cfg.data.seq_length,
                                                        invalid_utf8=cfg.data.invalid_utf8)


@dataclass
class Start:
    init_dir: Path  # the checkpoint the stage starts from
    base_tokenizer: Tokenizer  # the checkpoint's tokenizer
    prepared: preference.PreparedPreference  # its tokenizer may hold the chat template's added tokens
    train: list[preference.PreferenceSample]
    held_out: list[preference.PreferenceSample]
    vocab: int  # padded vocabulary size to build the model with


def start(cfg: StageConfig) -> Start:
    """Resolve the initial checkpoint, take its model (unless the config gives one) and tokenizer, set up
    the processes, and prepare the preference data: the held-out files, else a seeded fraction."""
    check_inputs(cfg)
    init_dir = init_from.resolve_init_from(cfg.init_from, log=dist.print_rank0)
    if not cfg.model.model_fields_set:
        cfg.model = ModelConfig(**checkpoint.read_meta(init_dir)["model"])
    stage.setup_runtime(cfg)
    if not cfg.tokenizer.path:
        cfg.tokenizer.path = str(init_dir / "tokenizer")
    base_tokenizer, _ = stage.ensure_tokenizer(cfg)
    opts = options(cfg)
    prepared = preference.prepare([src.path for src in cfg.data.train], base_tokenizer, opts)
    if cfg.data.preference.valid:
        held_out = preference.tokenize_pairs(preference.load_pairs(cfg.data.preference.valid, opts),
                                             prepared.template, opts)
        train = prepared.samples
    else:
        train, held_out = split_holdout(prepared.samples, cfg.data.preference.valid_fraction, cfg.train.seed)
    vocab = init_from.adopt(cfg, init_dir, base_tokenizer.vocab_size, log=dist.print_rank0)
    if prepared.tokenizer.vocab_size > base_tokenizer.vocab_size:
        raise UserError(f"data.preference.chat_template: the template adds tokens {prepared.added_tokens} that the "
                        f"model from {cfg.init_from} never learned; use the SFT stage's template (the tokenizer's own)")
    for line in prepared.summary.lines():
        dist.print_rank0(line)
    dist.print_rank0(f"{len(train)} training pairs, {len(held_out)} held out")
    return Start(init_dir, base_tokenizer, prepared, train, held_out, vocab)


def batch_iterators(cfg: StageConfig, n_chunks: int, dataset: preference.PreferenceDataset, consumed: int = 0,
                    shuffle: bool = True) -> list[preference.PreferenceBatchIterator]:
    """One iterator per model chunk over this data-parallel rank's micro-batches of pairs."""
    from megaflow.training.engine import data_parallel_rank_and_size

    dp_rank, dp_size = data_parallel_rank_and_size()
    return [preference.PreferenceBatchIterator(dataset, cfg.train.micro_batch_size, dp_rank, dp_size, consumed,
                                               cfg.train.seed, shuffle) for _ in range(n_chunks)]


def batch_on_device(data_iterator) -> dict[str, torch.Tensor]:
    """The next micro-batch of pairs on this rank's device, with `position_ids` (0..L-1 within each row)
    and `attention_mask` (the local spec's causal mask; None with TE). Rows are right-padded, so causal
    attention never lets a real token see padding."""
    batch = {k: v.to(dist.device(), non_blocking=True) for k, v in next(data_iterator).items()}
    mask = causal_mask(batch["tokens"].shape[1])
    batch["attention_mask"] = mask.to(dist.device()) if mask is not None else None
    return batch


def report(mean: torch.Tensor, count: int | float) -> torch.Tensor:
    """A metric as the engine reduces it, [sum, count], from its mean over `count` items (pairs or tokens):
    so every pair weighs the same over micro-batches and data-parallel ranks."""
    mean = mean.detach().float().reshape(())
    return torch.stack([mean * count, torch.tensor(float(count), device=mean.device)])
