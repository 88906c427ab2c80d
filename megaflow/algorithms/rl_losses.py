"""Pure math of the online RL stages (PPO, GRPO): advantages, KL estimators, the clipped surrogate, the
value loss, loss aggregation and the KL controller. Each function states its formula; none knows about
megatron. Tensors of responses are [b, L]: row i's response tokens left-aligned, `mask` 1 on real tokens.
"""

from __future__ import annotations

import math

import torch

ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# --- KL between the policy and the reference, per sampled token ------------------------------------


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020). With  log r = log pi_ref(y) - log pi(y):

        k1 = -log r                  unbiased, high variance, can be negative
        k2 = (log r)^2 / 2           biased, low variance, >= 0
        k3 = (r - 1) - log r         unbiased, low variance, >= 0

    E_pi[k1] = E_pi[k3] = KL(pi || pi_ref). Gradients flow through `logps` (a KL loss) unless detached."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")
    dtype = torch.float64 if torch.float64 in (logps.dtype, ref_logps.dtype) else torch.float32
    log_r = ref_logps.to(dtype) - logps.to(dtype)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    log_r = log_r.clamp(-20.0, 20.0)  # exp overflows past ~88; a token that far apart is clamped, as veRL does
    return torch.exp(log_r) - 1.0 - log_r


# --- advantages ----------------------------------------------------------------------------------


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response, right to left:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V past the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                             (the critic's regression target)

    rewards, values, mask: [b, L]. Returns (advantages, returns), 0 where mask is 0."""
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str = "grpo", std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """One advantage per sequence from its scalar score, against the other samples of its prompt.
    `scores` [n] holds n / G groups of G consecutive samples.

        grpo    A_i = (s_i - mean_g) / (std_g + eps)      std_g unbiased (torch.std); Dr. GRPO
                                                          (std_normalize=False): A_i = s_i - mean_g
        rloo    A_i = s_i - mean_{j != i} s_j = G / (G - 1) * (s_i - mean_g)

    A group whose scores all tie gets A = 0 for every sample: it adds nothing to the surrogate's gradient,
    though its tokens still count in the loss normaliser and its KL term still acts."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not form groups of {group_size}")
    s = scores.float().reshape(-1, group_size)
    centred = s - s.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        return (centred * group_size / (group_size - 1)).reshape(-1)
    if estimator != "grpo":
        raise ValueError(f"group advantage: expected grpo or rloo, got {estimator!r}")
    if std_normalize:
        std = s.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (all of them, across sequences): PPO's advantage
    whitening and REINFORCE++'s batch normalisation. std is the unbiased one; `shift_mean=False` only
    scales (the mean is added back)."""
    mask = mask.float()
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards [b, L]: the sequence's score on its last real token, minus the KL penalty on every
    token (Ziegler et al. 2019; InstructGPT):  r_t = -beta * kl_t + 1[t = last] * score."""
    mask = mask.float()
    rewards = torch.zeros_like(mask)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.float() * mask
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
    last = (mask * (positions + 1)).argmax(dim=1)  # the last masked position, wherever the response starts
    rewards[torch.arange(mask.shape[0]), last] += scores.float() * (mask.sum(dim=1) > 0)
    return rewards


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each response (REINFORCE's return): GAE with V = 0, lam = 1."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


# --- the policy and value losses, per token ----------------------------------------------------------


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), with separate low and high clip ranges
    (DAPO's clip-higher, Yu et al. 2025) and optional dual clip (Ye et al. 2020, c > 1):

        rho = exp(log pi - log pi_old)
        l   = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
        dual clip, where A < 0:  l = min(l, -c * A)

    Returns (per-token loss, per-token 1[a clip is active]: the clip fraction's numerator)."""
    ratio = torch.exp((logps.float() - old_logps.float()).clamp(-20.0, 20.0))
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    active = (clipped > unclipped).float()
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual clip constant must be > 1, got {dual_clip}")
        capped = torch.minimum(loss, -dual_clip * adv)
        active = torch.where((adv < 0) & (capped < loss), torch.ones_like(active), active)
        loss = torch.where(adv < 0, capped, loss)
    return loss, active


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's clipped regression loss per token (PPO2's value clipping):

        V_clip = V_old + clip(V - V_old, -clip, clip)
        l      = 1/2 * max((V - R)^2, (V_clip - R)^2)          (no clip: 1/2 (V - R)^2)

    Returns (per-token loss, per-token 1[the clipped term is the larger])."""
    v, r = values.float(), returns.float()
    unclipped = (v - r) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values.float() + (v - old_values.float()).clamp(-clip, clip)
    clipped = (v_clip - r) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def truncated_is_weights(old_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor,
                         level: str = "token", cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights (Ionides 2008; "Your efficient RL framework secretly brings you
    off-policy RL", Yao et al. 2025) for the gap between the training forward (pi_old) and the rollout's
    own log-probs (mu) of the same weights, detached:

        token:     w_t = min(exp(log pi_old_t - log mu_t), cap)
        sequence:  w_t = min(exp(sum_s (log pi_old_s - log mu_s)), cap)   for every t of the sequence

    `level="none"` gives ones. With fp32 on both sides the gap is rounding and w = 1 to 1e-6."""
    diff = (old_logps.float() - behaviour_logps.float()) * mask.float()
    if level == "none":
        return torch.ones_like(diff)
    if level == "token":
        w = torch.exp(diff.clamp(max=math.log(cap) + 1.0))
    elif level == "sequence":
        w = torch.exp(diff.sum(dim=1, keepdim=True).clamp(max=math.log(cap) + 1.0)).expand_as(diff)
    else:
        raise ValueError(f"truncated importance sampling level: expected none, token or sequence, got {level!r}")
    return w.clamp(max=cap).detach() * mask.float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v per row of logits [..., V] (the whole vocabulary)."""
    z = logits.float()
    log_z = torch.logsumexp(z, dim=-1)
    return log_z - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


# --- aggregation into the engine's (sum, count) ----------------------------------------------------


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of per-token losses [b, L] such that the engine's global sum / global count (both
    summed over micro-batches and data-parallel ranks) is the loss of the whole batch:

        token-mean                sum_i sum_t l_it m_it        / sum_i sum_t m_it     every token weighs the same (DAPO)
        seq-mean-token-sum        sum_i sum_t l_it m_it        / n_seq                (Dr. GRPO without its constant)
        seq-mean-token-mean       sum_i (sum_t l_it m_it / |y_i|) / n_seq             every sequence weighs the same (GRPO paper)
        seq-mean-token-sum-norm   sum_i sum_t l_it m_it        / (n_seq * L_norm)     Dr. GRPO: a constant normaliser,
                                                                                      L_norm = max new tokens

    Because only sums cross micro-batches and ranks, the split of the batch does not change the gradient."""
    mask = mask.float()
    token_sums = (loss.float() * mask).sum(dim=1)
    n_seq = torch.tensor(float(loss.shape[0]), device=loss.device)
    if mode == "token-mean":
        return token_sums.sum(), mask.sum()
    if mode == "seq-mean-token-sum":
        return token_sums.sum(), n_seq
    if mode == "seq-mean-token-mean":
        return (token_sums / mask.sum(dim=1).clamp(min=1.0)).sum(), n_seq
    if mode == "seq-mean-token-sum-norm":
        if not norm_length:
            raise ValueError("seq-mean-token-sum-norm needs norm_length (the maximum response length)")
        return token_sums.sum(), n_seq * float(norm_length)
    raise ValueError(f"loss aggregation: expected one of {LOSS_AGGREGATIONS}, got {mode!r}")


# --- the KL penalty's coefficient ----------------------------------------------------------------


class KLController:
    """The coefficient beta of the KL penalty in the reward: fixed, or adaptive (Ziegler et al. 2019):

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n / horizon)              n: sequences in the step

    Its state (beta) is part of the stage's checkpoint."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
