"""What the preference stages (reward model, DPO) share: their inputs and data with its held-out split
(PreferenceStage), and micro-batches of (chosen, rejected) rows.

A micro-batch of m pairs is one [2m, seq] forward, chosen rows first (megaflow.data.preference; the
engine counts `rows_per_sample = 2` rows per sample for throughput and pipeline shapes), or, packed
(DPO with `data.preference.packing`), m rows of 2 * seq holding several pairs each
(megaflow.data.pair_packing; `row_length_factor = 2`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from megaflow.algorithms.runner import TrainingStage
from megaflow.config import StageConfig
from megaflow.data import preference
from megaflow.data.records import files_key
from megaflow.data.sft import split_holdout
from megaflow.data.tokenizer import Tokenizer
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.training import init_from


class PreferenceStage(TrainingStage):
    """The reward model and DPO: pairs from files (the held-out files, else a seeded fraction), a start
    from a trained checkpoint (usually SFT's), micro-batches of (chosen, rejected) rows."""

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        valid = cfg.data.preference.valid
        return super().inputs(cfg) | {f"data.preference.valid[{i}]": path for i, path in enumerate(valid)}

    def check(self, cfg: StageConfig) -> None:
        if not cfg.data.train:
            raise UserError(f"data.train: no preference data given ({self.name} trains on chosen/rejected pairs)")
        super().check(cfg)
        if cfg.parallel.cp > 1:
            raise UserError(f"parallel.cp={cfg.parallel.cp}: the {self.name} stage does not support context "
                            "parallelism yet")

    def prepare_pairs(self, cfg: StageConfig, base_tokenizer: Tokenizer, init_dir: Path) -> Pairs:
        opts = options(cfg)
        dist.print_rank0(f"data: reading and tokenizing {files_key('data.train', [src.path for src in cfg.data.train])}")
        prepared = preference.prepare([src.path for src in cfg.data.train], base_tokenizer, opts)
        if cfg.data.preference.valid:
            held_out = preference.tokenize_pairs(preference.load_pairs(cfg.data.preference.valid, opts),
                                                 prepared.template, opts,
                                                 source=files_key("data.preference.valid", cfg.data.preference.valid))
            train = prepared.samples
        else:
            train, held_out = split_holdout(prepared.samples, cfg.data.preference.valid_fraction, cfg.train.seed)
        vocab = init_from.adopt(cfg, init_dir, base_tokenizer.vocab_size, log=dist.print_rank0)
        if prepared.tokenizer.vocab_size > base_tokenizer.vocab_size:
            raise UserError(f"data.preference.chat_template: the template adds tokens {prepared.added_tokens} that "
                            f"the model from {cfg.init_from} never learned; use the SFT stage's template (the "
                            "tokenizer's own)")
        for line in prepared.summary.lines():
            dist.print_rank0(line)
        dist.print_rank0(f"{len(train)} training pairs, {len(held_out)} held out")
        return Pairs(prepared, train, held_out, vocab)

    def iterators(self, cfg: StageConfig):
        return lambda dataset, n_chunks, consumed, shuffle: batch_iterators(cfg, n_chunks, dataset, consumed, shuffle)


def options(cfg: StageConfig) -> preference.PreferenceDataOptions:
    return preference.PreferenceDataOptions.from_config(cfg.data.preference, seq_length=cfg.data.seq_length,
                                                        invalid_utf8=cfg.data.invalid_utf8)


@dataclass
class Pairs:
    prepared: preference.PreparedPreference  # its tokenizer may hold the chat template's added tokens
    train: list[preference.PreferenceSample]
    held_out: list[preference.PreferenceSample]
    vocab: int  # padded vocabulary size to build the model with


def batch_iterators(cfg: StageConfig, n_chunks: int, dataset, consumed: int = 0, shuffle: bool = True) -> list:
    """One iterator per model chunk over this data-parallel rank's micro-batches: of pairs (a
    PreferenceDataset: [2m, seq] rows, cut after the longest unless `data.padding: max_length`) or of
    packed rows (a PackedPreferenceDataset: [m, 2 seq], full by construction)."""
    from megaflow.data.pair_packing import PackedPreferenceDataset
    from megaflow.data.sampler import MicroBatches, stack
    from megaflow.algorithms.base import pad_multiple
    from megaflow.training.engine import data_parallel_rank_and_size

    dp_rank, dp_size = data_parallel_rank_and_size()
    if isinstance(dataset, PackedPreferenceDataset):
        collate, multiple = stack, 0
    else:
        collate, multiple = preference.collate_pairs, pad_multiple(cfg)
    return [MicroBatches(dataset, cfg.train.micro_batch_size, dp_rank, dp_size, consumed, cfg.train.seed, shuffle,
                         multiple, collate) for _ in range(n_chunks)]


def batch_on_device(data_iterator) -> dict[str, torch.Tensor]:
    """The next micro-batch of pairs on this rank's device, with `position_ids` and the attention.

    Unpacked rows are right-padded, so causal attention (no mask) never lets a real token see padding. Packed rows (megaflow.data.pair_packing) get `pair_mask` with the
    local spec, and TE's packed (THD) attention over one segment per sequence otherwise, as
    `packed_seq_params`, with every [b, s] tensor flattened to [1, b*s]."""
    from megaflow.data import pair_packing
    from megaflow.data.packing import packed_seq_params, to_thd
    from megaflow.models import gpt

    batch = {k: v.to(dist.device(), non_blocking=True) for k, v in next(data_iterator).items()}
    batch["packed_seq_params"] = None
    if "branch_ids" not in batch:
        batch["attention_mask"] = None  # causal
    elif gpt.use_transformer_engine():
        rows = {k: batch[k] for k in ("tokens", "labels", "position_ids")}
        rows["segment_ids"] = pair_packing.thd_segments(batch["segment_ids"], batch["branch_ids"])
        flat = to_thd(rows)
        batch |= {k: flat[k] for k in ("tokens", "labels", "position_ids")}
        batch["packed_seq_params"] = packed_seq_params(flat["segment_ids"])
        batch["attention_mask"] = None
    else:
        batch["attention_mask"] = pair_packing.pair_mask(batch["segment_ids"], batch["branch_ids"])
    return batch


def forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy [b, s] of a micro-batch of pairs (either layout; on pipeline stages before
    the last, the hidden states to send on). Rows with shared prompts
    put each branch at its own positions (RoPE too: megaflow.models.gpt.rotary_positions)."""
    from megaflow.models import gpt

    shared = "branch_ids" in batch and batch["packed_seq_params"] is None
    kwargs = {}
    if batch["packed_seq_params"] is None and not gpt.unwrap(model).config.sequence_parallel:
        kwargs["output_processor"] = gpt.loss_at_positions(batch["loss_mask"])  # logits of response tokens only
    with gpt.rotary_positions(model, batch["position_ids"]) if shared else contextlib.nullcontext():
        ce = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   packed_seq_params=batch["packed_seq_params"], **kwargs)
    return ce.reshape(batch["loss_mask"].shape) if ce.dim() == 2 else ce  # hidden states before the last stage


@dataclass
class PairLogps:
    """Summed response log-probs of the pairs of a micro-batch, their response lengths, their dataset
    indices (packed layout; None unpacked) and the chosen responses' per-token mask."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    index: torch.Tensor | None
    chosen_token_mask: torch.Tensor


def pair_logps(batch: dict[str, torch.Tensor], token_logps: torch.Tensor) -> PairLogps:
    """Per-pair sums of `token_logps` [b, s] over each response's masked tokens, for either layout:
    unpacked ([2m, s] rows, chosen first) or packed (scatter-add by `seq_index`)."""
    from megaflow.data.pair_packing import sequence_sums
    from megaflow.data.preference import split_chosen_rejected
    from megaflow.algorithms.losses import sequence_logps

    mask = batch["loss_mask"].float()
    if "seq_index" not in batch:
        chosen, rejected = split_chosen_rejected(sequence_logps(token_logps, mask))
        len_c, len_r = split_chosen_rejected(mask.sum(-1))
        chosen_rows = torch.zeros_like(mask)
        chosen_rows[: mask.shape[0] // 2] = 1
        return PairLogps(chosen, rejected, len_c, len_r, None, mask * chosen_rows)
    slots = batch["pair_index"].shape[1]
    sums = sequence_sums(token_logps.float() * mask, batch["seq_index"], slots).reshape(-1, 2)
    lengths = sequence_sums(mask, batch["seq_index"], slots).reshape(-1, 2)
    index = batch["pair_index"].reshape(-1)
    valid = index >= 0
    return PairLogps(sums[valid, 0], sums[valid, 1], lengths[valid, 0], lengths[valid, 1], index[valid],
                     mask * (batch["branch_ids"] == 1))


def per_pair(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A per-pair batch entry (`ref_logps` [m, 2] or `margin` [m]) in pair_logps' order."""
    value = batch[key]
    if "seq_index" not in batch:
        return torch.stack(list(value.reshape(2, -1)), 1) if key == "ref_logps" else value
    valid = batch["pair_index"].reshape(-1) >= 0
    return value.reshape(valid.shape[0], *value.shape[2:])[valid]


def report(mean: torch.Tensor, count: int | float) -> torch.Tensor:
    """A metric as the engine reduces it, [sum, count], from its mean over `count` items (pairs or tokens):
    so every pair weighs the same over micro-batches and data-parallel ranks."""
    mean = mean.detach().float().reshape(())
    return torch.stack([mean * count, torch.tensor(float(count), device=mean.device)])
