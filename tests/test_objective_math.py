"""The flow-matching objectives' math (divrl.objectives.flow) against hand-worked values and direct formulas, and
the direction of their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from divrl.objectives.flow import (
    TimestepSampling,
    dpo_loss,
    flow_error,
    group_dpo_loss,
    group_weights,
    nft_loss,
    noised,
    optimality,
    shift_sigmas,
)


def test_forward_process_and_flow_error_by_hand():
    x0, eps = torch.tensor([[1.0, 3.0]]), torch.tensor([[-1.0, 1.0]])
    assert torch.equal(noised(x0, eps, torch.tensor([0.25])), torch.tensor([[0.5, 2.5]]))  # 0.75·x0 + 0.25·ε
    # target u = ε − x0 = (−2, −2); v = (0, −1): errors 4 and 1, mean 2.5
    assert flow_error(torch.tensor([[0.0, -1.0]]), x0, eps).item() == 2.5


def test_two_sample_dpo_worked_by_hand():
    # winner: e_θ 0.30, e_ref 0.50 (the policy fits it better than the reference); loser: e_θ 0.60, e_ref 0.40.
    # z = −β/2·[(0.30 − 0.50) − (0.60 − 0.40)] = −1·(−0.2 − 0.2) = 0.4 for β = 2
    loss, z = dpo_loss(torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.60]), torch.tensor([0.40]), beta=2.0)
    assert z.item() == pytest.approx(0.4)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.4)))  # −log σ(0.4) = 0.5130
    # a margin of 0.4 (ODPO) asks for more: −log σ(0) = log 2
    loss, _ = dpo_loss(torch.tensor([0.30]), torch.tensor([0.50]), torch.tensor([0.60]), torch.tensor([0.40]), 2.0, 0.4)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_gradient_raises_the_winners_likelihood_and_lowers_the_losers():
    e = torch.tensor([0.5, 0.5], requires_grad=True)  # the policy's errors of winner, loser (= the reference's)
    loss, _ = dpo_loss(e[0:1], torch.tensor([0.5]), e[1:2], torch.tensor([0.5]), beta=10.0)
    loss.sum().backward()
    # descending the loss lowers the winner's error (its likelihood rises) and raises the loser's
    assert e.grad[0] > 0 and e.grad[1] < 0
    assert e.grad[0].item() == pytest.approx(10.0 / 2 * 0.5)  # β/2 · σ(−z) with z = 0


def test_group_weights_sum_to_one_per_side_and_follow_the_advantages():
    adv = torch.tensor([[2.0, 1.0, -1.0, -3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    w_pos, w_neg = group_weights(adv)
    assert torch.allclose(w_pos[0], torch.tensor([2 / 3, 1 / 3, 0, 0, 0]))
    assert torch.allclose(w_neg[0], torch.tensor([0, 0, 1 / 4, 3 / 4, 0]))
    assert w_pos[0].sum().item() == pytest.approx(1) and w_neg[0].sum().item() == pytest.approx(1)
    assert w_neg[1].sum() == 0  # no negative side


def test_group_dpo_loss_equals_the_direct_sum():
    err = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    ref = torch.tensor([[0.3, 0.3, 0.5, 0.5]])
    adv = torch.tensor([[1.5, 0.5, -0.5, -1.5]])
    beta = 4.0
    s = [-beta / 2 * (e - r) for e, r in zip(err[0].tolist(), ref[0].tolist())]  # 0.2, −0.2, −0.2, −0.6
    r_pos = 0.75 * s[0] + 0.25 * s[1]
    r_neg = 0.25 * s[2] + 0.75 * s[3]
    loss, delta = group_dpo_loss(err, ref, adv, beta, margin=torch.tensor([0.1]))
    assert delta.item() == pytest.approx(r_pos - r_neg)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-(r_pos - r_neg - 0.1))))
    # a group whose samples all tie has no sides: no loss, no gradient
    flat, _ = group_dpo_loss(err, ref, torch.zeros(1, 4), beta)
    assert flat.item() == 0


def test_group_dpo_gradient_favours_the_positives():
    err = torch.full((1, 4), 0.5, requires_grad=True)
    loss, _ = group_dpo_loss(err, torch.full((1, 4), 0.5), torch.tensor([[1.0, 0.2, -0.2, -1.0]]), beta=10.0)
    loss.sum().backward()
    assert (err.grad[0, :2] > 0).all() and (err.grad[0, 2:] < 0).all()  # positives' errors fall, negatives' rise
    assert err.grad[0, 0] > err.grad[0, 1]  # weighted by |advantage|


def test_optimality_probability():
    assert torch.allclose(optimality(torch.tensor([-10.0, -2.5, 0.0, 5.0]), 5.0), torch.tensor([0.0, 0.25, 0.5, 1.0]))


def toy_gaussian_flow(n: int = 4096, seed: int = 0):
    """1-D Gaussian data x0 ~ N(2, 0.5²) noised to x_σ; the exact velocity of the flow at x_σ is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    x0 = 2 + 0.5 * torch.randn(n, 1, generator=g)
    eps = torch.randn(n, 1, generator=g)
    return x0, eps


def test_nft_loss_on_a_toy_gaussian_flow_equals_the_direct_formula():
    x0, eps = toy_gaussian_flow(8)
    sigma = torch.linspace(0.1, 0.9, 8)
    v_old = 0.3 * torch.ones(8, 1)
    v = -0.7 * torch.ones(8, 1)
    r = torch.linspace(0, 1, 8)
    beta = 0.5
    xt = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    direct = []
    for i in range(8):  # DiffusionNFT's x0-prediction form, written out
        v_pos = beta * v[i] + (1 - beta) * v_old[i]
        v_neg = (1 + beta) * v_old[i] - beta * v[i]
        l_pos = ((xt[i] - sigma[i] * v_pos - x0[i]) ** 2).mean()
        l_neg = ((xt[i] - sigma[i] * v_neg - x0[i]) ** 2).mean()
        direct.append((r[i] * l_pos + (1 - r[i]) * l_neg) / beta)
    got = nft_loss(v, v_old, x0, eps, sigma, r, beta, adaptive=False)
    assert torch.allclose(got, torch.stack(direct), rtol=1e-5, atol=1e-7)
    # adaptive weighting divides each side by its detached mean |x0 error|
    adaptive = nft_loss(v, v_old, x0, eps, sigma, r, beta, adaptive=True)
    i = 3
    e_pos = (sigma[i] * (beta * v[i] + (1 - beta) * v_old[i] - (eps[i] - x0[i]))).abs().mean()
    e_neg = (sigma[i] * ((1 + beta) * v_old[i] - beta * v[i] - (eps[i] - x0[i]))).abs().mean()
    expected = (r[i] * e_pos**2 / e_pos + (1 - r[i]) * e_neg**2 / e_neg) / beta
    assert adaptive[i].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("r", [1.0, 0.75, 0.5, 0.0])
def test_nft_minimiser_is_the_implicit_policy_improvement(r):
    """Minimising the (non-adaptive) NFT loss over a free velocity gives v_old + (2r − 1)(u − v_old)/β."""
    x0, eps = toy_gaussian_flow(64, seed=1)
    sigma = torch.full((64,), 0.5)
    v_old = torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
    beta = 0.8
    v = v_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nft_loss(v, v_old, x0, eps, sigma, torch.full((64,), r), beta, adaptive=False).sum()
        loss.backward()
        return loss

    opt.step(closure)
    u = eps - x0
    assert torch.allclose(v.detach(), v_old + (2 * r - 1) * (u - v_old) / beta, atol=1e-4)


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = TimestepSampling("uniform").sample(20000, g)
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.01
    logit = TimestepSampling("logit_normal", mean=0.0, std=1.0).sample(20000, g)
    assert abs(torch.logit(logit).mean().item()) < 0.03 and abs(torch.logit(logit).std().item() - 1) < 0.03
    # shifted: the uniform time pushed towards the noise; shift 3 maps t = 0.5 to 0.75
    assert shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    shifted = TimestepSampling("shifted", shift=3.0).sample(20000, g)
    assert abs((shifted < 0.75).float().mean().item() - 0.5) < 0.02  # the median moved from 0.5 to 0.75
    ranged = TimestepSampling("uniform", low=0.2, high=0.8).sample(1000, g, high=0.5)
    assert 0.2 <= ranged.min() and ranged.max() <= 0.5
    with pytest.raises(ValueError, match="low < high"):
        TimestepSampling(low=0.9, high=0.1)
    with pytest.raises(ValueError, match="needs timesteps.shift"):
        TimestepSampling("shifted").sample(2, g)
