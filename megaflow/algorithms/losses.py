"""Pure loss math of the preference stages (reward model, DPO family). Each function documents its
formula; none knows about megatron. The language-model loss is megaflow.training.lm.masked_token_loss."""

from __future__ import annotations

import torch

from megaflow.eval.compare import reward_metrics


# --- sequence log-probabilities -----------------------------------------------------------------


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of the masked (response) tokens, from [n, s] per-token log-probs:

        logp(y | x) = sum_t m_t * log pi(y_t | x, y_<t)                  (average=False)
        logp(y | x) = sum_t m_t * log pi(y_t | x, y_<t) / sum_t m_t      (average=True; IPO's
                                                                          length-normalised log-prob)

    Returns [n] float32. A row without masked tokens has sum 0 (and average 0: its count is clamped to 1).
    """
    mask = mask.float()
    total = (per_token_logps.float() * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def nll_loss(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per masked token over the whole batch (the SFT / RPO term):

        NLL = - sum_{i,t} m_it * log pi(y_it | ...) / sum_{i,t} m_it

    A 0-d tensor. As TRL's RPO term (cross-entropy over every chosen response token of the batch), so a
    long response weighs more than a short one."""
    mask = mask.float()
    return -(per_token_logps.float() * mask).sum() / mask.sum().clamp(min=1.0)


# --- reward model -------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss per pair, with TRL RewardTrainer's optional terms:

        l_i = -log sigmoid(r_c,i - r_r,i - margin_i) + center_coef * (r_c,i + r_r,i)^2

    P(chosen > rejected) = sigmoid(r_c - r_r) is the Bradley-Terry model; a margin (a per-pair tensor or
    a number; None = 0) asks for a reward gap of at least that much (Llama 2); the centering term
    (Eisenstein et al. 2023) pulls rewards towards mean zero. The batch loss is mean_i l_i, which equals
    TRL's mean(-logsigmoid(...)) + center_rewards_coefficient * mean((r_c + r_r)^2).
    Returns ([b] losses, reward_metrics).
    """
    r_c, r_r = r_chosen.float(), r_rejected.float()
    diff = r_c - r_r
    if margin is not None:
        diff = diff - (margin.float() if torch.is_tensor(margin) else margin)
    losses = -torch.nn.functional.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (r_c + r_r) ** 2
    return losses, reward_metrics(r_chosen, r_rejected)


# --- DPO family ---------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss per pair from [b] summed response log-probs of policy pi and reference pi_ref.

    With log-ratios  rho_c = log pi(y_c|x) - log pi_ref(y_c|x),  rho_r likewise, and  h = rho_c - rho_r:

      sigmoid (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO, cDPO):
          l = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        i.e. the cross-entropy against a label that says "chosen is better" with probability 1 - eps;
        eps = 0 is plain DPO.
      ipo (Azar et al. 2023, eq. 17, beta = tau), on length-normalised log-probs as in TRL:
          h_bar = rho_c / |y_c| - rho_r / |y_r|,    l = (h_bar - 1 / (2 * beta))^2
        |y| are the response token counts (`chosen_lengths`, `rejected_lengths`, required; clamped to >= 1).

    Metrics (0-d, detached), TRL's names; implicit rewards r = beta * rho (summed log-ratios, for both types):
        rewards/chosen, rewards/rejected   mean beta * rho_c, mean beta * rho_r
        rewards/margins                    mean (r_c - r_r)
        rewards/accuracies                 mean 1[r_c > r_r]
        logps/chosen, logps/rejected       mean policy log-probs
        kl/chosen (when chosen_lengths is given)   sum_i rho_c,i / sum_i |y_c,i|
    kl/chosen is the mean per-token log-ratio log pi/pi_ref over the chosen responses: the k1 (naive)
    Monte-Carlo estimator of KL(pi || pi_ref) per token, but on responses from the data rather than
    samples of pi, so it estimates E_data[log pi/pi_ref], not the KL itself, and can be negative; it
    measures how far the policy has moved from the reference on the preferred answers.
    Returns ([b] losses, metrics); the batch loss is the mean.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    rho_c = policy_chosen_logps.float() - ref_chosen_logps.float()
    rho_r = policy_rejected_logps.float() - ref_rejected_logps.float()
    logsigmoid = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        h = rho_c - rho_r
        losses = -(1.0 - label_smoothing) * logsigmoid(beta * h) - label_smoothing * logsigmoid(-beta * h)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo: chosen_lengths and rejected_lengths (response token counts) are required")
        if label_smoothing:
            raise ValueError("ipo: label_smoothing applies to the sigmoid loss only")
        h_bar = rho_c / _lengths(chosen_lengths) - rho_r / _lengths(rejected_lengths)
        losses = (h_bar - 1.0 / (2.0 * beta)) ** 2
    r_c, r_r = beta * rho_c.detach(), beta * rho_r.detach()
    metrics = {
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/margins": (r_c - r_r).mean(),
        "rewards/accuracies": (r_c > r_r).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
    if chosen_lengths is not None:
        metrics["kl/chosen"] = rho_c.detach().sum() / _lengths(chosen_lengths).sum()
    return losses, metrics


def _lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(lengths).float().clamp(min=1.0)


def rpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float, alpha: float,
             chosen_nll: torch.Tensor, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO plus a weighted NLL on
    the chosen responses, as TRL's `rpo_alpha`:

        l_i = l_i^DPO + alpha * NLL_chosen,    NLL_chosen = nll_loss(chosen per-token logps, response mask)

    `chosen_nll` is that token-mean NLL over the batch's chosen responses (a 0-d tensor, from `nll_loss`;
    a [b] per-pair tensor also works). Other arguments and the metrics are dpo_loss's, plus `nll_loss`.
    """
    losses, metrics = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               beta, loss_type, label_smoothing, chosen_lengths, rejected_lengths)
    metrics["nll_loss"] = chosen_nll.detach().float().mean()
    return losses + alpha * chosen_nll.float(), metrics
