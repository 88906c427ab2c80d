"""The RL stages' math (megaflow/algorithms/rl_losses.py) against explicit loops, definitions and closed forms."""

import math

import pytest
import torch

from megaflow.algorithms import rl_losses as L


def _responses(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        mask[i, 2:2 + n] = 1  # a response after a 2-token prompt, padding after it
    return mask, torch.randn(len(lengths), width, generator=g), torch.randn(len(lengths), width, generator=g)


def test_gae_equals_an_explicit_loop():
    mask, rewards, values = _responses([5, 1, 7, 3], 10)
    gamma, lam = 0.97, 0.9
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[i, t]]
        r, v = [float(rewards[i, t]) for t in idx], [float(values[i, t]) for t in idx]
        want, running = [0.0] * len(idx), 0.0
        for k in reversed(range(len(idx))):
            next_v = v[k + 1] if k + 1 < len(idx) else 0.0
            running = r[k] + gamma * next_v - v[k] + gamma * lam * running
            want[k] = running
        got = [float(adv[i, t]) for t in idx]
        assert got == pytest.approx(want, abs=1e-5)
        assert [float(ret[i, t]) for t in idx] == pytest.approx([a + b for a, b in zip(want, v)], abs=1e-5)
    assert float((adv * (1 - mask)).abs().sum()) == 0.0


def test_discounted_returns_are_reward_to_go():
    mask, rewards, _ = _responses([4], 8)
    got = L.discounted_returns(rewards, mask, gamma=0.5)
    r = rewards[0, 2:6].tolist()
    want = [sum(r[s] * 0.5 ** (s - t) for s in range(t, 4)) for t in range(4)]
    assert got[0, 2:6].tolist() == pytest.approx(want, abs=1e-6)


def test_kl_estimators_are_their_definitions():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_r = ref - logp
    assert L.kl_estimate(logp, ref, "k1").tolist() == pytest.approx((-log_r).tolist())
    assert L.kl_estimate(logp, ref, "k2").tolist() == pytest.approx((0.5 * log_r**2).tolist())
    assert L.kl_estimate(logp, ref, "k3").tolist() == pytest.approx((torch.exp(log_r) - 1 - log_r).tolist())
    with pytest.raises(ValueError):
        L.kl_estimate(logp, ref, "k4")


def test_k1_and_k3_means_match_the_kl_of_a_toy_categorical():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = L.kl_estimate(logp, logq, "k1"), L.kl_estimate(logp, logq, "k3")
    print(f"KL exact {exact:.5f}, k1 mean {k1.mean():.5f} (var {k1.var():.4f}), k3 mean {k3.mean():.5f} (var {k3.var():.4f})")
    assert float(k1.mean()) == pytest.approx(exact, abs=3e-3)
    assert float(k3.mean()) == pytest.approx(exact, abs=3e-3)
    assert float(k3.var()) < float(k1.var())  # why k3: unbiased and lower variance
    assert float(k3.min()) >= 0.0


def test_clipped_surrogate_closed_forms():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = L.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # A > 0, rho 1.5: -min(1.5, 1.28) = -1.28 (clipped);  A < 0, rho 1.5: max(1.5, 1.28) = 1.5 (not clipped)
    # A > 0, rho 0.5: -min(0.5, 0.8) = -0.5 (not clipped); A < 0, rho 0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.28, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_dual_clip_bounds_negative_advantages():
    logp = torch.log(torch.tensor([5.0, 5.0, 2.0]))
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, clipped = L.policy_loss(logp, torch.zeros(3), adv, 0.2, 0.2, dual_clip=3.0)
    # A < 0, rho 5: max(5, 1.2) = 5 capped at -c A = 3;  A > 0: unchanged -1.2;  A < 0, rho 2: 2 < 3 stays
    assert loss.tolist() == pytest.approx([3.0, -1.2, 2.0])
    assert clipped.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        L.policy_loss(logp, torch.zeros(3), adv, dual_clip=0.5)


def test_value_clipping_closed_form():
    values = torch.tensor([1.0, 0.0, 0.5])
    old = torch.tensor([0.0, 0.0, 0.4])
    returns = torch.tensor([0.0, 1.0, 0.45])
    loss, clipped = L.value_loss(values, old, returns, clip=0.2)
    # v=1 (old 0) clips to 0.2: max((1-0)^2, (0.2-0)^2)/2 = 0.5;  v=0: both terms 1 -> 0.5;
    # v=0.5 (old 0.4) within the clip: max(0.05^2, 0.05^2)/2
    assert loss.tolist() == pytest.approx([0.5, 0.5, 0.5 * 0.05**2])
    unclipped, _ = L.value_loss(values, old, returns, clip=None)
    assert unclipped.tolist() == pytest.approx([0.5, 0.5, 0.5 * 0.05**2])
    far = L.value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3.0]), 0.2)[0]
    assert float(far) == pytest.approx(0.5 * (0.2 - 3.0) ** 2)  # the clipped value is further: it wins


def test_group_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    grpo = L.group_advantages(scores, 4, "grpo", std_normalize=True)
    g = scores[:4]
    assert grpo[:4].tolist() == pytest.approx(((g - g.mean()) / (g.std() + 1e-6)).tolist(), abs=1e-5)
    assert grpo[4:].tolist() == [0.0] * 4  # a tied group contributes nothing to the surrogate
    dr = L.group_advantages(scores, 4, "grpo", std_normalize=False)
    assert dr[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    rloo = L.group_advantages(scores, 4, "rloo")
    assert float(rloo[0]) == pytest.approx(1.0 - 1.0 / 3)  # s_0 - mean of the other three
    with pytest.raises(ValueError):
        L.group_advantages(scores[:7], 4)


def test_token_rewards_put_the_score_on_the_last_token():
    mask, _, _ = _responses([3, 1], 6)
    kl = torch.ones(2, 6)
    r = L.token_rewards(torch.tensor([2.0, -1.0]), mask, kl, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([0, 0, -0.1, -0.1, 1.9, 0])
    assert r[1].tolist() == pytest.approx([0, 0, -1.1, 0, 0, 0])


def test_whiten():
    mask, x, _ = _responses([4, 5], 9)
    w = L.whiten(x, mask)
    picked = w[mask.bool()]
    assert float(picked.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(picked.std()) == pytest.approx(1.0, abs=1e-4)
    assert float((w * (1 - mask)).abs().sum()) == 0.0


@pytest.mark.parametrize("mode", L.LOSS_AGGREGATIONS)
def test_aggregation_does_not_depend_on_the_split(mode):
    """The engine divides the sum of every part's sum by the sum of their counts: any split of the batch
    (micro-batches, data-parallel ranks) gives the whole batch's loss and gradient."""
    mask, _, _ = _responses([3, 6, 1, 4, 2, 5, 6, 2], 9)
    x = torch.randn(8, 9, requires_grad=True)
    loss = x**2

    def total(parts):
        sums, counts = zip(*(L.aggregate(loss[p], mask[p], mode, norm_length=6) for p in parts))
        return sum(sums) / sum(counts)

    whole = total([slice(0, 8)])
    (g_whole,) = torch.autograd.grad(whole, x, retain_graph=True)
    for parts in ([slice(0, 4), slice(4, 8)], [slice(i, i + 2) for i in range(0, 8, 2)]):
        split = total(parts)
        (g_split,) = torch.autograd.grad(split, x, retain_graph=True)
        assert float(split) == pytest.approx(float(whole), rel=1e-6)
        assert torch.allclose(g_split, g_whole, atol=1e-7)
    s, c = L.aggregate(loss, mask, mode, norm_length=6)
    per_token = (loss * mask).sum(1)
    want = {"token-mean": per_token.sum() / mask.sum(), "seq-mean-token-sum": per_token.sum() / 8,
            "seq-mean-token-mean": (per_token / mask.sum(1)).sum() / 8,
            "seq-mean-token-sum-norm": per_token.sum() / (8 * 6)}[mode]
    assert float(s / c) == pytest.approx(float(want), rel=1e-6)


def test_truncated_importance_weights():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, math.log(3.0), 0.0]])
    mu = torch.zeros(1, 3)
    assert L.truncated_is_weights(old, mu, mask, "token", cap=2.0).tolist() == [[1.0, 2.0, 0.0]]
    seq = L.truncated_is_weights(old, mu, mask, "sequence", cap=5.0)
    assert seq[0].tolist() == pytest.approx([3.0, 3.0, 0.0])
    assert L.truncated_is_weights(old, mu, mask, "none").tolist() == [[1.0, 1.0, 1.0]]


def test_entropy_from_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert float(L.entropy_from_logits(logits)) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_adaptive_kl_controller():
    fixed = L.KLController(0.1)
    fixed.update(10.0, 100)
    assert fixed.value == 0.1
    c = L.KLController(0.1, target=1.0, horizon=100)
    c.update(10.0, 10)  # error clipped at +0.2: beta * (1 + 0.2 * 10 / 100)
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(0.5, 10)  # error -0.5 clipped at -0.2
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98)
