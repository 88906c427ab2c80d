"""Reward-model and DPO-family losses against their closed forms, computed here by hand with `math` on
small hand-made log-prob tensors; gradient signs; metrics."""

from __future__ import annotations

import math

import pytest
import torch

from megaflow.algorithms import losses

# Four pairs: policy and reference summed response log-probs, and response lengths.
PI_C = [-10.0, -4.0, -7.5, -20.0]
PI_R = [-12.0, -3.0, -7.5, -18.0]
REF_C = [-11.0, -5.0, -7.0, -19.0]
REF_R = [-11.5, -2.0, -8.0, -19.0]
LEN_C = [5, 2, 3, 10]
LEN_R = [6, 1, 3, 9]


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64 if grad else torch.float32, requires_grad=grad)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def h(i: int) -> float:
    return (PI_C[i] - REF_C[i]) - (PI_R[i] - REF_R[i])


def close(tensor, expected, tol=1e-5):
    assert tensor.shape == (len(expected),), tensor.shape
    for got, want in zip(tensor.tolist(), expected):
        assert got == pytest.approx(want, rel=tol, abs=tol), (tensor.tolist(), expected)


def args():
    return t(PI_C), t(PI_R), t(REF_C), t(REF_R)


# --- sequence log-probs and NLL -----------------------------------------------------------------


def test_sequence_logps_sum_and_average_over_the_mask_only():
    per_token = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -9.0, -9.0], [-7.0, -7.0, -7.0, -7.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    close(losses.sequence_logps(per_token, mask), [-5.0, -0.75, 0.0])
    close(losses.sequence_logps(per_token, mask, average=True), [-2.5, -0.375, 0.0])
    close(losses.sequence_logps(per_token, mask.bool()), [-5.0, -0.75, 0.0])
    # NLL: the token mean over the whole batch (3 + 4 + 0.5 + 0.25 over 4 tokens), not a mean of row means
    assert losses.nll_loss(per_token, mask).item() == pytest.approx((2 + 3 + 0.5 + 0.25) / 4)


# --- reward model -------------------------------------------------------------------------------


def test_bradley_terry_equals_its_closed_form_with_margin_and_centering():
    r_c, r_r, margin = [1.5, -0.5, 0.0, 2.0], [0.5, 0.5, 0.0, -1.0], [0.25, 0.0, 1.0, 4.0]
    plain, _ = losses.bradley_terry_loss(t(r_c), t(r_r))
    close(plain, [-log_sigmoid(c - r) for c, r in zip(r_c, r_r)])
    with_margin, _ = losses.bradley_terry_loss(t(r_c), t(r_r), margin=t(margin))
    close(with_margin, [-log_sigmoid(c - r - m) for c, r, m in zip(r_c, r_r, margin)])
    scalar_margin, _ = losses.bradley_terry_loss(t(r_c), t(r_r), margin=0.5)
    close(scalar_margin, [-log_sigmoid(c - r - 0.5) for c, r in zip(r_c, r_r)])
    centred, _ = losses.bradley_terry_loss(t(r_c), t(r_r), margin=t(margin), center_coef=0.01)
    close(centred, [-log_sigmoid(c - r - m) + 0.01 * (c + r) ** 2 for c, r, m in zip(r_c, r_r, margin)])
    # the batch mean is TRL's: mean(-logsigmoid(r_c - r_r - m)) + coef * mean((r_c + r_r)^2)
    trl = sum(-log_sigmoid(c - r - m) for c, r, m in zip(r_c, r_r, margin)) / 4 + \
        0.01 * sum((c + r) ** 2 for c, r in zip(r_c, r_r)) / 4
    assert centred.mean().item() == pytest.approx(trl, rel=1e-6)


def test_reward_metrics_accuracy_margin_and_distribution():
    r_c, r_r = [1.0, 0.0, 3.0, -1.0], [0.0, 0.0, 1.0, 1.0]  # right, tie (counts wrong), right, wrong
    _, m = losses.bradley_terry_loss(t(r_c), t(r_r))
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == pytest.approx((1 + 0 + 2 - 2) / 4)
    assert m["reward/chosen_mean"].item() == pytest.approx(0.75)
    assert m["reward/rejected_mean"].item() == pytest.approx(0.5)
    every = r_c + r_r
    mean = sum(every) / 8
    assert m["reward/mean"].item() == pytest.approx(mean)
    assert m["reward/std"].item() == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in every) / 8))
    assert (m["reward/min"].item(), m["reward/max"].item()) == (-1.0, 3.0)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


# --- DPO family ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_dpo_equals_its_closed_form(beta):
    out, _ = losses.dpo_loss(*args(), beta=beta)
    close(out, [-log_sigmoid(beta * h(i)) for i in range(4)])
    # written out without the log-ratio shortcut: -log sigmoid(beta*[(pi_c - pi_r) - (ref_c - ref_r)])
    i = 0
    direct = -math.log(1 / (1 + math.exp(-beta * ((PI_C[i] - PI_R[i]) - (REF_C[i] - REF_R[i])))))
    assert out[0].item() == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_conservative_dpo_mixes_the_two_label_directions(eps):
    beta = 0.2
    out, _ = losses.dpo_loss(*args(), beta=beta, label_smoothing=eps)
    close(out, [-(1 - eps) * log_sigmoid(beta * h(i)) - eps * log_sigmoid(-beta * h(i)) for i in range(4)])
    # the same thing as the cross-entropy against a label "chosen is better" of probability 1 - eps
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        beta * torch.tensor([h(i) for i in range(4)]), torch.full((4,), 1 - eps), reduction="none")
    close(out, bce.tolist())
    plain, _ = losses.dpo_loss(*args(), beta=beta, label_smoothing=0.0)
    close(plain, [-log_sigmoid(beta * h(i)) for i in range(4)])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_uses_length_normalised_log_ratios(beta):
    out, _ = losses.dpo_loss(*args(), beta=beta, loss_type="ipo", chosen_lengths=t(LEN_C), rejected_lengths=t(LEN_R))
    expected = [((PI_C[i] - REF_C[i]) / LEN_C[i] - (PI_R[i] - REF_R[i]) / LEN_R[i] - 1 / (2 * beta)) ** 2
                for i in range(4)]
    close(out, expected)
    # with unit lengths it is the unnormalised (h - 1/(2 beta))^2
    ones = torch.ones(4)
    out1, _ = losses.dpo_loss(*args(), beta=beta, loss_type="ipo", chosen_lengths=ones, rejected_lengths=ones)
    close(out1, [(h(i) - 1 / (2 * beta)) ** 2 for i in range(4)])
    # lengths as plain lists and integer tensors give the same; a 0 length counts as 1
    out2, _ = losses.dpo_loss(*args(), beta=beta, loss_type="ipo", chosen_lengths=torch.tensor(LEN_C),
                              rejected_lengths=LEN_R)
    close(out2, expected)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        losses.dpo_loss(*args(), beta=beta, loss_type="ipo")
    with pytest.raises(ValueError, match="sigmoid loss only"):
        losses.dpo_loss(*args(), beta=beta, loss_type="ipo", label_smoothing=0.1, chosen_lengths=ones,
                        rejected_lengths=ones)


def test_rpo_adds_alpha_times_the_token_mean_chosen_nll():
    beta, alpha = 0.1, 0.7
    chosen_tokens = torch.tensor([[-0.5, -1.5, 0.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-0.1, -0.2, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]])
    nll = losses.nll_loss(chosen_tokens, mask)
    by_hand = (0.5 + 1.5 + 2.0 + 3.0 + 0.2 + 0.3) / 8
    assert nll.item() == pytest.approx(by_hand)
    out, metrics = losses.rpo_loss(*args(), beta=beta, alpha=alpha, chosen_nll=nll)
    close(out, [-log_sigmoid(beta * h(i)) + alpha * by_hand for i in range(4)])
    assert metrics["nll_loss"].item() == pytest.approx(by_hand)
    smoothed, _ = losses.rpo_loss(*args(), beta=beta, alpha=alpha, chosen_nll=nll, label_smoothing=0.1)
    close(smoothed, [-0.9 * log_sigmoid(beta * h(i)) - 0.1 * log_sigmoid(-beta * h(i)) + alpha * by_hand
                     for i in range(4)])
    zero, _ = losses.rpo_loss(*args(), beta=beta, alpha=0.0, chosen_nll=nll)
    close(zero, losses.dpo_loss(*args(), beta=beta)[0].tolist())


def test_dpo_metrics_implicit_rewards_margins_accuracy_logps_and_kl():
    beta = 0.5
    _, m = losses.dpo_loss(*args(), beta=beta, chosen_lengths=t(LEN_C), rejected_lengths=t(LEN_R))
    r_c = [beta * (PI_C[i] - REF_C[i]) for i in range(4)]  # 0.5, 0.5, -0.25, -0.5
    r_r = [beta * (PI_R[i] - REF_R[i]) for i in range(4)]  # -0.25, -0.5, 0.25, 0.5
    assert m["rewards/chosen"].item() == pytest.approx(sum(r_c) / 4)
    assert m["rewards/rejected"].item() == pytest.approx(sum(r_r) / 4)
    assert m["rewards/margins"].item() == pytest.approx(sum(c - r for c, r in zip(r_c, r_r)) / 4)
    assert m["rewards/accuracies"].item() == 0.5  # pairs 3 and 4 wrong
    assert m["logps/chosen"].item() == pytest.approx(sum(PI_C) / 4)
    assert m["logps/rejected"].item() == pytest.approx(sum(PI_R) / 4)
    # the mean per-token log-ratio on the chosen responses
    assert m["kl/chosen"].item() == pytest.approx(sum(PI_C[i] - REF_C[i] for i in range(4)) / sum(LEN_C))
    _, no_lengths = losses.dpo_loss(*args(), beta=beta)
    assert "kl/chosen" not in no_lengths
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())
    # IPO reports the same implicit rewards (summed log-ratios) as sigmoid
    _, ipo = losses.dpo_loss(*args(), beta=beta, loss_type="ipo", chosen_lengths=t(LEN_C), rejected_lengths=t(LEN_R))
    assert ipo["rewards/margins"].item() == pytest.approx(m["rewards/margins"].item())


# --- gradients and argument checks --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sigmoid", "cdpo", "ipo", "rpo"])
def test_raising_the_chosen_log_prob_lowers_the_loss(kind):
    pi_c, pi_r = t(PI_C, grad=True), t(PI_R, grad=True)
    ref_c, ref_r = t(REF_C), t(REF_R)
    if kind == "sigmoid":
        out, _ = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    elif kind == "cdpo":
        out, _ = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.2)  # sigmoid(beta h) < 0.8 here
    elif kind == "ipo":  # beta = 0.1: target 5 per token lies above every pair's h_bar
        out, _ = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="ipo", chosen_lengths=t(LEN_C),
                                 rejected_lengths=t(LEN_R))
    else:
        out, _ = losses.rpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, alpha=1.0, chosen_nll=-pi_c / t(LEN_C))
    out.sum().backward()
    assert (pi_c.grad < 0).all(), pi_c.grad
    assert (pi_r.grad > 0).all(), pi_r.grad
    # the closed-form gradient of sigmoid DPO: dl/dpi_c = -beta * sigmoid(-beta h)
    if kind == "sigmoid":
        close(pi_c.grad, [-0.1 / (1 + math.exp(0.1 * h(i))) for i in range(4)])


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    r_c, r_r = t([1.0, -2.0, 0.0], grad=True), t([0.0, 1.0, 0.0], grad=True)
    out, _ = losses.bradley_terry_loss(r_c, r_r, margin=t([0.5, 0.0, 0.0]))
    out.sum().backward()
    assert (r_c.grad < 0).all() and (r_r.grad > 0).all()
    close(r_c.grad, [-1 / (1 + math.exp(0.5)), -1 / (1 + math.exp(-3.0)), -0.5])


def test_dpo_argument_checks():
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(*args(), beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(*args(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(*args(), beta=0.1, label_smoothing=0.7)


def test_masked_token_loss_is_unchanged():
    from megaflow.training.lm import masked_token_loss

    loss_sum, n = masked_token_loss(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1, 0], [1, 1]]))
    assert loss_sum.item() == 8.0 and n.item() == 3
