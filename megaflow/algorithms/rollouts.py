"""Rollouts as the engine trains on them: rows of prompt + response (RolloutDataset), how the forward-only
passes read them (token_logps, values_of, last_values for megaflow.training.collect) and the losses of the
RL stages' two trainable models (ActorTask, CriticTask), each aggregated into the engine's (sum, count)
by rl_losses.aggregate. megaflow/algorithms/rl.py runs the iteration around them.
"""

from __future__ import annotations

import functools

import torch

from megaflow.algorithms import rl_losses as L
from megaflow.data.packing import trim_padding
from megaflow.models import gpt
from megaflow.runtime import distributed as dist
from megaflow.training.engine import Task

ROW_KEYS = ("tokens", "labels", "loss_mask", "segment_ids", "position_ids", "train_mask", "old_logps", "ref_logps",
            "advantages", "is_weight", "returns", "old_values")


# --- rollouts as training rows ---------------------------------------------------------------------


class RolloutDataset:
    """Rollouts (prompt + response ids) as right-padded rows of seq_length positions: tokens = seq[:-1],
    labels = seq[1:], loss_mask 1 at the label positions of response tokens, plus per-token fields
    ([N, seq_length] tensors aligned with the labels) set as they are computed."""

    def __init__(self, sequences: list[list[int]], prompt_lengths: list[int], seq_length: int, pad_id: int):
        n = len(sequences)
        self.seq_length = seq_length
        self.rows = {k: torch.full((n, seq_length), pad_id if k in ("tokens", "labels") else 0, dtype=torch.long)
                     for k in ("tokens", "labels", "segment_ids", "position_ids")}
        self.rows["loss_mask"] = torch.zeros(n, seq_length)
        for i, (seq, plen) in enumerate(zip(sequences, prompt_lengths)):
            m = len(seq) - 1
            self.rows["tokens"][i, :m] = torch.tensor(seq[:-1])
            self.rows["labels"][i, :m] = torch.tensor(seq[1:])
            self.rows["segment_ids"][i, :m] = 1
            self.rows["loss_mask"][i, plen - 1:m] = 1.0
        self.rows["position_ids"][:] = torch.arange(seq_length)
        self.rows["train_mask"] = self.rows["loss_mask"].clone()
        self.lengths = [len(s) for s in sequences]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.rows.items()} | {"index": torch.tensor(i)}

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rows["loss_mask"]


def collate(multiple: int):
    """Stack items; cut after the longest row, to `multiple` (0: keep seq_length, as a pipeline needs)."""
    def stack(items):
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return trim_padding(batch, multiple, ROW_KEYS) if multiple else batch
    return stack


def on_device(batch: dict) -> dict:
    return {k: v.to(dist.device(), non_blocking=True) for k, v in batch.items()}


def token_logps(temperature: float, entropy: bool):
    """collect()'s compute: per-token log-probs of the labels under softmax(logits / T) ([b, s], with
    entropy [b, s, 2]), at the response positions."""
    def compute(model, batch):
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     output_processor=gpt.token_logps_at_positions(batch["loss_mask"], temperature, entropy))
    return compute


def values_of(model, batch):
    """collect()'s compute for a scalar-head model: the value at every position, [b, s] (the hidden states
    to send on, on the pipeline stages before the last)."""
    out = model(batch["tokens"], batch["position_ids"], None)
    return out[..., 0] if gpt.unwrap(model).post_process else out


def last_values(model, batch):
    """collect()'s compute for a reward model: its value at each row's last real position, [b] (as the
    reward model was trained: megaflow.algorithms.rm)."""
    values = model(batch["tokens"], batch["position_ids"], None)
    if not gpt.unwrap(model).post_process:  # hidden states on the stages before the last
        return values
    last = batch["segment_ids"].sum(dim=1) - 1
    return values[torch.arange(values.shape[0], device=values.device), last, 0]


# --- the losses the engine optimises -----------------------------------------------------------------


def _report(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float(), count.detach().float()])


class ActorTask(Task):
    """The policy's loss per micro-batch of rollout rows: clipped surrogate (weighted by the truncated IS
    weights), + kl_loss_coef * KL(pi || ref), - entropy_coef * H, aggregated by rl.loss_aggregation."""

    loss_names = ("actor loss", "pg loss", "kl", "entropy", "clip fraction", "ratio")
    progress = ("reward/mean",)

    def __init__(self, rl, norm_length: int):
        self.rl, self.norm_length = rl, norm_length

    def forward_step(self, data_iterator, model):
        batch = on_device(next(data_iterator))
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                    output_processor=gpt.token_logps_at_positions(batch["loss_mask"], self.rl.temperature, True))
        return out, functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, out: torch.Tensor):
        rl = self.rl
        logps, entropy = out[..., 0], out[..., 1]
        mask = batch["train_mask"].float()
        pg, clipped = L.policy_loss(logps, batch["old_logps"], batch["advantages"], rl.clip_low, rl.clip_high,
                                    rl.dual_clip)
        pg = pg * batch["is_weight"]
        kl = L.kl_estimate(logps, batch["ref_logps"], rl.kl_loss_estimator)
        loss = pg + rl.kl_loss_coef * kl - rl.entropy_coef * entropy
        total, count = L.aggregate(loss, mask, rl.loss_aggregation, self.norm_length)
        tokens = mask.sum()
        ratio = torch.exp((logps - batch["old_logps"]).clamp(-20, 20))
        reports = {"actor loss": _report(total, count)}
        for name, x in (("pg loss", pg), ("kl", kl), ("entropy", entropy), ("clip fraction", clipped), ("ratio", ratio)):
            reports[name] = _report((x.detach() * mask).sum(), tokens)
        return total, count.round().to(torch.int), reports


class CriticTask(Task):
    """The critic's clipped value loss per micro-batch, aggregated as the actor's."""

    head = "scalar"
    loss_names = ("value loss", "value clip fraction")

    def __init__(self, rl, norm_length: int):
        self.rl, self.norm_length = rl, norm_length

    def forward_step(self, data_iterator, model):
        batch = on_device(next(data_iterator))
        return model(batch["tokens"], batch["position_ids"], None), functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, values: torch.Tensor):
        mask = batch["train_mask"].float()
        loss, clipped = L.value_loss(values[..., 0], batch["old_values"], batch["returns"], self.rl.value_clip)
        total, count = L.aggregate(loss, mask, self.rl.loss_aggregation, self.norm_length)
        return total, count.round().to(torch.int), {"value loss": _report(total, count),
                                                    "value clip fraction": _report((clipped * mask).sum(), mask.sum())}
