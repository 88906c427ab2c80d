"""A frozen reference model and its response log-probs, for the stages that measure a policy against
one (DPO now; PPO's KL penalty and GRPO later).

The reference is built in the policy's own layout and precision from a final checkpoint, in eval mode
without gradients. Its summed response log-probs over a preference dataset are computed once and cached
on disk under a key of the reference checkpoint (its manifest of checksums), the data (every token id
and mask), the sequence length and the precision, so a rerun or a resume reuses them and anything that
changes them computes them afresh.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from megaflow.config import StageConfig
from megaflow.data.pair_packing import PackedPreferenceDataset
from megaflow.data.preference import PreferenceDataset, PreferenceSample
from megaflow.models import gpt
from megaflow.runtime import distributed as dist
from megaflow.algorithms import preference
from megaflow.models import weights
from megaflow.training.engine import Task, data_parallel_rank_and_size, forward_backward


class ReferenceModel:
    """Model chunks for this rank's share of the policy's layout, with the weights of `ckpt`, frozen (a
    reference policy; with head="scalar", a reward model)."""

    def __init__(self, cfg: StageConfig, vocab_size: int, ckpt: str | Path, head: str = "lm", model=None):
        model = model or cfg.model  # another architecture (a reward model's own) in the same layout
        tcfg = gpt.transformer_config(model, cfg.parallel, cfg.precision, cfg.fp8_recipe)
        tcfg.calculate_per_token_loss = True
        self.chunks = gpt.build_gpt_chunks(model, tcfg, vocab_size, head=head, attention=cfg.attention)
        weights.load_weights(ckpt, self.chunks)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)

    @torch.no_grad()
    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs [rows, seq] of a micro-batch (one pipeline stage only: live reference)."""
        return -preference.forward(self.chunks[0], batch)


class _RecordingTask(Task):
    """Forward-only: summed response log-probs of each pair, recorded with the pair's index."""

    loss_names = ("logps",)

    def __init__(self, packed: bool = False):
        self.recorded: list[torch.Tensor] = []
        self.rows_per_sample, self.row_length_factor = (1, 2) if packed else (2, 1)

    def forward_step(self, data_iterator, model):
        batch = preference.batch_on_device(data_iterator)
        return preference.forward(model, batch), functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, ce: torch.Tensor):
        pairs = preference.pair_logps(batch, -ce)
        index = pairs.index if pairs.index is not None else batch["index"]
        self.recorded.append(torch.stack([index.double(), pairs.chosen.double(), pairs.rejected.double()], 1).cpu())
        m = len(pairs.chosen)
        count = torch.tensor(m, dtype=torch.int, device=ce.device)
        return pairs.chosen.sum(), count, {"logps": preference.report(pairs.chosen.mean(), m)}


def cache_key(ckpt: str | Path, samples: list[PreferenceSample], seq_length: int, precision: str) -> str:
    """sha256 of what the cached log-probs depend on: the reference checkpoint's file checksums (its
    manifest; megaflow.json where there is none), the token ids and masks of every pair in order, the
    sequence length and the precision."""
    ckpt = Path(ckpt)
    h = hashlib.sha256()
    identity = ckpt / "manifest.json" if (ckpt / "manifest.json").is_file() else ckpt / weights.META_FILE
    h.update(identity.read_bytes())
    h.update(f"{seq_length}:{precision}:{len(samples)}".encode())
    for s in samples:
        for array in (s.chosen_ids, s.chosen_mask, s.rejected_ids, s.rejected_mask):
            h.update(np.ascontiguousarray(array).tobytes())
            h.update(b"|")
    return h.hexdigest()[:24]


def compute_logps(cfg: StageConfig, model: ReferenceModel, dataset: PreferenceDataset | PackedPreferenceDataset) -> np.ndarray:
    """[n, 2] summed response log-probs (chosen, rejected) of every pair, on every rank. Each
    data-parallel replica computes its share of the micro-batches (through megatron's forward-only
    schedule, so any TP/PP layout works); the shares are gathered."""
    mbs = cfg.train.micro_batch_size
    _, dp_size = data_parallel_rank_and_size()
    n_micro = -(-len(dataset) // (mbs * dp_size))
    task = _RecordingTask(packed=isinstance(dataset, PackedPreferenceDataset))
    iterators = preference.batch_iterators(cfg, len(model.chunks), dataset, shuffle=False)
    with torch.no_grad():
        forward_backward(model.chunks, task, iterators, n_micro, cfg.data.seq_length, mbs, forward_only=True)
    mine = torch.cat(task.recorded) if task.recorded else torch.zeros(0, 3, dtype=torch.float64)
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        mine = torch.cat(everyone)
    out = np.full((len(dataset.samples), 2), np.nan)
    out[mine[:, 0].long().numpy()] = mine[:, 1:].numpy()  # a pair computed twice (wrap-around) has equal values
    if np.isnan(out).any():
        raise RuntimeError(f"reference log-probs: {int(np.isnan(out).any(1).sum())} pairs were not computed")
    return out


def pair_dataset(cfg: StageConfig, samples: list[PreferenceSample], pad_id: int, reference: np.ndarray | None = None):
    """The stage's dataset of pairs: packed rows when `data.preference.packing` (sharing each pair's prompt
    with megatron's local attention), else two padded rows per pair."""
    from megaflow.models.gpt import use_transformer_engine

    if cfg.data.preference.packing:
        return PackedPreferenceDataset(samples, cfg.data.seq_length, pad_id, share=not use_transformer_engine(),
                                       reference=reference)
    return PreferenceDataset(samples, cfg.data.seq_length, pad_id, reference)


def cached_logps(cfg: StageConfig, vocab_size: int, ckpt: str | Path, samples: list[PreferenceSample],
                 pad_id: int, cache_dir: Path) -> tuple[np.ndarray, Path, bool]:
    """(log-probs [n, 2], cache file, whether it was computed now): read from `cache_dir` when a file with
    this key exists, else computed with a ReferenceModel (freed afterwards) and written by rank 0."""
    path = cache_dir / f"reference-logps-{cache_key(ckpt, samples, cfg.data.seq_length, cfg.precision)}.npy"
    if path.is_file():
        return np.load(path), path, False
    model = ReferenceModel(cfg, vocab_size, ckpt)
    logps = compute_logps(cfg, model, pair_dataset(cfg, samples, pad_id))
    del model
    if dist.is_rank0():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, logps)
        os.replace(tmp, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return logps, path, True
