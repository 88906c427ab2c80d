"""The next-token language-modelling hooks in megatron's schedule convention (get_batch, loss_func,
forward_step). Pretraining uses them as they are; SFT reuses them with its own loss masks; perplexity
evaluation runs them forward-only."""

from __future__ import annotations

import functools

import torch

from megaflow.training.engine import Task
from megaflow.runtime import distributed as dist


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the per-token losses where `loss_mask` is 1:

        loss_sum = sum_t mask_t * l_t,   num_tokens = sum_t mask_t

    The engine divides the sum by the token count of the whole global batch (over micro-batches and
    data-parallel ranks), so every token weighs the same however the batch is split.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    return loss_sum, mask.sum().to(torch.int)


def slice_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under context parallelism each rank keeps 2 of the sequence's 2*cp chunks (rank r: chunks r and
    2cp-1-r, which balances causal attention work); megatron's split, along dim 1 of every tensor."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())


class LanguageModelTask(Task):
    """Batches are dicts of `tokens`, `labels`, `loss_mask` ([batch, seq] each)."""

    loss_names = ("lm loss",)
    reports_perplexity = True

    @staticmethod
    def get_batch(data_iterator):
        """The micro-batch on this rank's device; under context parallelism, this rank's part of the
        sequence. No attention mask: every attention is causal by type."""
        batch = next(data_iterator)
        device = dist.device()
        tokens = batch["tokens"].to(device, non_blocking=True)
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        local = slice_for_context_parallel({
            "tokens": tokens,
            "labels": batch["labels"].to(device, non_blocking=True),
            "loss_mask": batch["loss_mask"].to(device, non_blocking=True),
            "position_ids": position_ids,
        })
        return local["tokens"], local["labels"], local["loss_mask"], None, local["position_ids"]

    @staticmethod
    def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
        loss_sum, num_tokens = masked_token_loss(output_tensor, loss_mask)
        report = torch.stack([loss_sum.detach(), num_tokens.float()])
        return loss_sum, num_tokens, {"lm loss": report}

    def forward_step(self, data_iterator, model):
        tokens, labels, loss_mask, attention_mask, position_ids = self.get_batch(data_iterator)
        output = model(tokens, position_ids, attention_mask, labels=labels)
        return output, functools.partial(self.loss_func, loss_mask)
