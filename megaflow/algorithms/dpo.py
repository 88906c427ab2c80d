"""Stage 3b: direct preference optimisation (DPO, IPO, conservative DPO, RPO) from the SFT model.

What is specific to DPO: the policy's summed response log-probs of chosen and rejected responses (one
forward per micro-batch: [2m, seq] rows, chosen first, or with `data.preference.packing` rows of several
pairs sharing their prompts, megaflow/data/pair_packing.py), the reference's (cached on disk before training,
or a live frozen model when `dpo.reference: live`), and the loss of megaflow.algorithms.losses.dpo_loss /
rpo_loss. Every metric is TRL's: implicit rewards beta * log(pi / pi_ref) of chosen and rejected, their
margin and accuracy, the policy's log-probs, and kl/chosen, the mean per-token log-ratio of policy to
reference on the chosen responses (an estimate of how far the policy moved, not a KL of its samples).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megaflow.algorithms import preference, reference
from megaflow.algorithms.base import Work
from megaflow.algorithms.preference import PreferenceStage
from megaflow.config import StageConfig
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist
from megaflow.training import init_from, stage
from megaflow.training.engine import Task, Trainer
from megaflow.algorithms.losses import dpo_loss, nll_loss, rpo_loss

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


class DPOTask(Task):
    """Micro-batches of m pairs -> the DPO-family loss of each pair. The reference's summed log-probs
    come with the batch (`ref_logps`, cached) or from `reference_model` (live, one pipeline stage)."""

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 rpo_alpha: float | None = None, reference_model: reference.ReferenceModel | None = None,
                 packed: bool = False):
        # a sample is a pair as two rows of seq_length, or a packed row of 2 * seq_length holding several
        self.rows_per_sample, self.row_length_factor = (1, 2) if packed else (2, 1)
        self.loss_type, self.beta, self.label_smoothing, self.rpo_alpha = loss_type, beta, label_smoothing, rpo_alpha
        self.reference_model = reference_model
        self.loss_names = ("dpo loss", *PAIR_METRICS, "kl/chosen") + (("nll_loss",) if rpo_alpha is not None else ())

    def forward_step(self, data_iterator, model):
        batch = preference.batch_on_device(data_iterator)
        ce = preference.forward(model, batch)
        if self.reference_model is not None:
            live = preference.pair_logps(batch, self.reference_model.token_logps(batch))
            batch["live_ref"] = torch.stack([live.chosen, live.rejected], 1)
        return ce, functools.partial(self.loss_func, batch)

    def loss_func(self, batch: dict, ce: torch.Tensor):
        token_logps = -ce.float()
        pairs = preference.pair_logps(batch, token_logps)
        ref = batch["live_ref"] if "live_ref" in batch else preference.per_pair(batch, "ref_logps")
        args = (pairs.chosen, pairs.rejected, ref[:, 0], ref[:, 1], self.beta)
        kwargs = {"loss_type": self.loss_type, "label_smoothing": self.label_smoothing,
                  "chosen_lengths": pairs.chosen_lengths, "rejected_lengths": pairs.rejected_lengths}
        if self.rpo_alpha is not None:
            chosen_nll = nll_loss(token_logps, pairs.chosen_token_mask)
            losses, metrics = rpo_loss(*args, self.rpo_alpha, chosen_nll, **kwargs)
        else:
            losses, metrics = dpo_loss(*args, **kwargs)
        m, chosen_tokens = len(losses), float(pairs.chosen_lengths.sum())
        reports = {"dpo loss": preference.report(losses.mean(), m)}
        reports |= {k: preference.report(metrics[k], m) for k in PAIR_METRICS}
        reports["kl/chosen"] = preference.report(metrics["kl/chosen"], chosen_tokens)  # token-weighted
        if self.rpo_alpha is not None:
            reports["nll_loss"] = preference.report(metrics["nll_loss"], chosen_tokens)
        return losses.sum(), torch.tensor(m, dtype=torch.int, device=losses.device), reports


class DPO(PreferenceStage):
    name = "dpo"
    summary = "direct preference optimisation (DPO, IPO, conservative DPO, RPO) against a reference"

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        out = super().inputs(cfg)
        if cfg.dpo.reference_from:
            out["dpo.reference_from"] = cfg.dpo.reference_from
        return out

    def check(self, cfg: StageConfig) -> None:
        super().check(cfg)
        if cfg.dpo.reference == "live" and cfg.parallel.pp > 1:
            raise UserError("dpo.reference=live runs the reference inside the policy's forward step, which a "
                            "pipeline cannot; use dpo.reference=cached (the default) with parallel.pp > 1")

    def check_init(self, cfg: StageConfig) -> None:
        super().check_init(cfg)
        if cfg.dpo.reference_from:
            init_from.check_spec(cfg.dpo.reference_from, key="dpo.reference_from")

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        """Pairs, and the reference's log-probs: computed once and cached on disk, or a live model."""
        s = self.prepare_pairs(cfg, tokenizer, init_dir)
        ref_dir = init_dir
        if cfg.dpo.reference_from:
            ref_dir = init_from.resolve_init_from(cfg.dpo.reference_from, log=dist.print_rank0)
        pad = s.prepared.tokenizer.pad_id
        live = None
        if cfg.dpo.reference == "cached":
            cache_dir = stage.stage_dir(cfg).parent / "cache"
            train_ref, path, computed = reference.cached_logps(cfg, s.vocab, ref_dir, s.train, pad, cache_dir)
            dist.print_rank0(f"reference log-probs {'computed -> ' if computed else 'from cache '}{path}")
            held_ref = reference.cached_logps(cfg, s.vocab, ref_dir, s.held_out, pad, cache_dir)[0] if s.held_out else None
        else:
            live, train_ref, held_ref = reference.ReferenceModel(cfg, s.vocab, ref_dir), None, None
        train_ds = reference.pair_dataset(cfg, s.train, pad, train_ref)
        valid_ds = reference.pair_dataset(cfg, s.held_out, pad, held_ref) if s.held_out else None
        if cfg.data.preference.packing:
            dist.print_rank0(f"packed {len(s.train)} pairs into {len(train_ds)} rows of {train_ds.row_length} "
                             f"(packing efficiency {train_ds.efficiency():.1%}, prompts shared: {train_ds.share})")
        d = cfg.dpo
        task = DPOTask(d.loss_type, d.beta, d.label_smoothing, d.rpo_alpha, live, packed=cfg.data.preference.packing)
        return Work(task, s.vocab, s.prepared.tokenizer, train_ds, valid_ds, self.iterators(cfg),
                    meta={"reference": str(ref_dir)}, result={"data": s.prepared.summary.as_dict()})

    @staticmethod
    def _valid_iters(trainer: Trainer, work: Work) -> int:
        return max(1, len(work.valid) // trainer.cfg.train.global_batch_size)

    def before_train(self, trainer: Trainer, work: Work, make_valid, resumed: bool) -> dict:
        """The held-out metrics of the starting policy, to compare with the trained one's: measured on a
        fresh start and kept in before.json, so a resumed run reports the same ones."""
        import json

        path = trainer.stage_dir / "before.json"
        if resumed:
            return json.loads(path.read_text()) if path.is_file() else {}
        before = _held_out(trainer.evaluate(make_valid, self._valid_iters(trainer, work)), "before")
        trainer.write_json("before.json", before)
        return before

    def final_eval(self, trainer: Trainer, work: Work, make_valid) -> dict:
        return _held_out(trainer.evaluate(make_valid, self._valid_iters(trainer, work)), "valid")


def _held_out(means: dict, prefix: str) -> dict:
    """The held-out DPO metrics under `prefix`: loss, reward accuracy and margin, log-probs, kl/chosen."""
    dist.print_rank0(f"held-out ({prefix}): dpo loss {means['loss']:.4f}, reward accuracy "
                     f"{means['rewards/accuracies']:.1%}, margin {means['rewards/margins']:.4f}")
    keep = {"loss": means["loss"]} | {k: v for k, v in means.items() if "/" in k or k == "nll_loss"}
    return {f"{prefix}_{k.replace('/', '_')}": v for k, v in keep.items()}


STAGE = DPO()
