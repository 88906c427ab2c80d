"""Stage 3a: a reward model, trained on preference pairs with the Bradley-Terry loss.

What is specific to the reward model: the model's scalar head (megaflow.models.gpt.ScalarHead, in place
of the language-model output layer, initialised fresh while the body starts from the SFT checkpoint),
the reward read at the last token of each sequence, and the loss

    l = -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

(megaflow.algorithms.losses.bradley_terry_loss). The final checkpoint records `"head": "scalar"`, so
`megaflow eval --metrics reward_acc`, `megaflow score` and the PPO / GRPO stages load it as a reward model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megaflow.algorithms import preference
from megaflow.algorithms.base import Work
from megaflow.algorithms.preference import PreferenceStage
from megaflow.config import StageConfig
from megaflow.data.preference import PreferenceDataset, split_chosen_rejected
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.training.engine import Task, Trainer
from megaflow.algorithms.losses import bradley_terry_loss
from megaflow.eval.compare import reward_metrics

METRICS = ("accuracy", "margin", "reward/chosen_mean", "reward/rejected_mean")


class RewardTask(Task):
    """Micro-batches of m pairs ([2m, seq] rows, chosen first) -> one reward per row at its last token."""

    rows_per_sample = 2
    head = "scalar"
    loss_names = ("rm loss", *METRICS)

    def __init__(self, use_margin: bool = True, center_coef: float = 0.0):
        self.use_margin, self.center_coef = use_margin, center_coef
        self.recorded: list[torch.Tensor] | None = None  # when a list: every evaluated pair's rewards [m, 2]

    def forward_step(self, data_iterator, model):
        batch = preference.batch_on_device(data_iterator)
        values = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        return values, functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, values: torch.Tensor):
        rewards = values[torch.arange(values.shape[0], device=values.device), batch["last_index"], 0]
        r_chosen, r_rejected = split_chosen_rejected(rewards)
        margin = batch["margin"] if self.use_margin else None
        losses, metrics = bradley_terry_loss(r_chosen, r_rejected, margin, self.center_coef)
        if self.recorded is not None:
            self.recorded.append(torch.stack([r_chosen, r_rejected], dim=1).detach().float().cpu())
        m = len(losses)
        reports = {"rm loss": preference.report(losses.mean(), m)}
        reports |= {k: preference.report(metrics[k], m) for k in METRICS}
        return losses.sum(), torch.tensor(m, dtype=torch.int, device=losses.device), reports


class RewardModel(PreferenceStage):
    name = "rm"
    summary = "a reward model (scalar head, Bradley-Terry loss) on preference pairs"
    language_model_init = False  # a reward model may start from another reward model

    def check(self, cfg: StageConfig) -> None:
        super().check(cfg)
        if cfg.data.preference.packing:
            raise UserError("data.preference.packing: the rm stage reads one reward per sequence from unpacked "
                            "rows; packing is for dpo")

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        s = self.prepare_pairs(cfg, tokenizer, init_dir)
        pad = s.prepared.tokenizer.pad_id
        train_ds = PreferenceDataset(s.train, cfg.data.seq_length, pad)
        valid_ds = PreferenceDataset(s.held_out, cfg.data.seq_length, pad) if s.held_out else None
        task = RewardTask(cfg.rm.use_margin, cfg.rm.center_coef)
        return Work(task, s.vocab, s.prepared.tokenizer, train_ds, valid_ds, self.iterators(cfg),
                    meta={"head": "scalar"}, result={"data": s.prepared.summary.as_dict()})

    def final_eval(self, trainer: Trainer, work: Work, make_valid) -> dict:
        return held_out_evaluation(trainer, work.task, make_valid, len(work.valid), trainer.cfg.train.global_batch_size)


def held_out_evaluation(trainer: Trainer, task: RewardTask, make_valid, n_pairs: int, global_batch: int) -> dict:
    """Accuracy, mean margin and the reward distribution over the held-out pairs (whole global batches)."""
    task.recorded = []
    try:
        means = trainer.evaluate(make_valid, max(1, n_pairs // global_batch))
    finally:
        recorded, task.recorded = task.recorded, None
    rewards = _gather_rewards(recorded)
    out = {"valid_loss": means["loss"], "valid_accuracy": means["accuracy"], "valid_margin": means["margin"],
           "valid_pairs": int(rewards.shape[0])}
    if len(rewards):  # the distribution: chosen and rejected means, mean, std, min and max of all rewards
        out |= {f"valid_{k}": float(v) for k, v in reward_metrics(rewards[:, 0], rewards[:, 1]).items()
                if k.startswith("reward/")}
    dist.print_rank0(f"held-out reward accuracy {means['accuracy']:.1%}, mean margin {means['margin']:.3f} "
                     f"on {rewards.shape[0]} pairs")
    return out


def _gather_rewards(recorded: list[torch.Tensor]) -> torch.Tensor:
    """[n, 2] rewards of every evaluated pair, from the ranks that computed them (each data-parallel
    replica's last pipeline stage, TP rank 0), on every rank."""
    from megatron.core import parallel_state as ps

    holder = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    mine = torch.cat(recorded) if recorded and holder else torch.zeros(0, 2)
    if not torch.distributed.is_initialized():
        return mine
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return torch.cat(everyone)


STAGE = RewardModel()
