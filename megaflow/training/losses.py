"""Pure loss math shared by the stages. Each function documents its formula; none knows about megatron."""

from __future__ import annotations

import torch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the per-token losses where `loss_mask` is 1:

        loss_sum = sum_t mask_t * l_t,   num_tokens = sum_t mask_t

    The engine divides the sum by the token count of the whole global batch (over micro-batches and
    data-parallel ranks), so every token weighs the same however the batch is split.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    return loss_sum, mask.sum().to(torch.int)
