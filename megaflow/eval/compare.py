"""Comparing answers: a reward model's accuracy on preference pairs, the win rate of one model's answers
over another's judged by a reward model, and the KL of a policy to its reference. Pure functions;
megaflow/algorithms/evaluate.py and the rm stage gather their inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluation of a reward model on [b] rewards of chosen and rejected responses (0-d, detached):

        accuracy = mean 1[r_c > r_r]   (a tie counts as wrong, as in TRL)
        margin   = mean (r_c - r_r)
        reward/{chosen,rejected}_mean, reward/{mean,std,min,max} over all 2b rewards (the distribution)
    """
    r_c, r_r = r_chosen.detach().float(), r_rejected.detach().float()
    every = torch.cat([r_c, r_r])
    return {
        "accuracy": (r_c > r_r).float().mean(),
        "margin": (r_c - r_r).mean(),
        "reward/chosen_mean": r_c.mean(),
        "reward/rejected_mean": r_r.mean(),
        "reward/mean": every.mean(),
        "reward/std": every.std(correction=0),
        "reward/min": every.min(),
        "reward/max": every.max(),
    }


def win_rate(rewards: Sequence[float], reference_rewards: Sequence[float], z: float = 1.96) -> dict:
    """The share of prompts where a model's answer out-scores the reference's, ties counting half:

        w = (1/n) sum_i (1[r_i > r_ref,i] + 0.5 * 1[r_i = r_ref,i])

    with a Wilson score interval at `z` (1.96: 95%), which stays inside [0, 1] and is honest for small n
    and rates near 0 or 1 (the normal interval is not)."""
    if len(rewards) != len(reference_rewards) or not rewards:
        raise ValueError(f"win rate needs the same non-zero number of rewards ({len(rewards)} vs {len(reference_rewards)})")
    n = len(rewards)
    w = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, reference_rewards)) / n
    centre = (w + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(w * (1 - w) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"win_rate": w, "win_rate_low": max(0.0, centre - half), "win_rate_high": min(1.0, centre + half), "n": n}


def kl_k1(policy_logps: Sequence[Sequence[float]], reference_logps: Sequence[Sequence[float]]) -> float:
    """KL(pi || pi_ref) per response, estimated on responses sampled from pi (the k1 estimator):

        KL ~ (1/n) sum_i sum_t [log pi(y_i,t | ...) - log pi_ref(y_i,t | ...)]

    unbiased for samples at temperature 1 without top-k/top-p truncation."""
    if len(policy_logps) != len(reference_logps) or not policy_logps:
        raise ValueError("kl needs the same non-zero number of responses under both models")
    total = 0.0
    for lp, ref in zip(policy_logps, reference_logps):
        if len(lp) != len(ref):
            raise ValueError(f"a response has {len(lp)} policy log-probs but {len(ref)} reference log-probs")
        total += sum(a - b for a, b in zip(lp, ref))
    return total / len(policy_logps)
