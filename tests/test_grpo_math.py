"""The Flow-GRPO math in divrl.grpo (and FLUX's sigma schedule), checked against diffusers, float64 brute force and
hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from divrl.grpo import (
    SDEStepOutput,
    group_advantages,
    grpo_loss,
    kl_divergence,
    random_window,
    sde_mask,
    sde_step,
    select_train_steps,
)
from divrl.policy.kontext.schedule import calculate_shift, flux_sigmas

FLUX_SCHEDULER = dict(
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    shift=3.0,
    time_shift_type="exponential",
)


def diffusers_sigmas(num_steps: int, image_seq_len: int, **extra) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER, **extra)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(image_seq_len))
    return scheduler.sigmas


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps", [1, 2, 6, 28])
@pytest.mark.parametrize("image_seq_len", [16, 64, 1024, 4096])
def test_flux_sigmas_bit_exact_with_diffusers(num_steps, image_seq_len):
    ours = flux_sigmas(num_steps, image_seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    assert torch.equal(ours, diffusers_sigmas(num_steps, image_seq_len))
    assert ours[0] == 1 and ours[-1] == 0 and bool((ours[1:] < ours[:-1]).all())


def test_flux_sigmas_reference_values_and_shift_terminal():
    expected = torch.tensor([1.0, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0])
    assert torch.allclose(flux_sigmas(6, 1024), expected, atol=1e-4)
    stretched = flux_sigmas(6, 1024, shift_terminal=0.02)
    assert torch.equal(stretched, diffusers_sigmas(6, 1024, shift_terminal=0.02))
    assert stretched[-2].item() == pytest.approx(0.02, abs=1e-6)


def test_calculate_shift_line():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)  # 0.63


def test_flux_sigmas_errors():
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(0, 1024)
    with pytest.raises(ValueError, match="shift_terminal"):
        flux_sigmas(1, 1024, shift_terminal=0.1)
    with pytest.raises(ValueError, match="shift_terminal"):
        flux_sigmas(6, 1024, shift_terminal=1.0)


# --------------------------------------------------------------------------------------------- sde_step

SIGMAS = flux_sigmas(6, 1024)
S = [float(s) for s in SIGMAS]  # exact float32 values as Python floats
SHAPES = [(3, 16, 8), (3, 4, 6, 6)]  # packed FLUX latents (B, tokens, channels) and unpacked (B, C, H, W)


def reference_step(x, v, sigma, sigma_next, a, sigma_max, x_prev):
    """The DESIGN.md formulas in float64 with torch.distributions, per sample (sigma may be a list)."""
    x, v, x_prev = x.double(), v.double(), x_prev.double()
    b = x.shape[0]
    sig = torch.tensor(sigma if isinstance(sigma, list) else [sigma] * b, dtype=torch.float64)
    nxt = torch.tensor(sigma_next if isinstance(sigma_next, list) else [sigma_next] * b, dtype=torch.float64)
    sig, nxt = (t.view(b, *([1] * (x.ndim - 1))) for t in (sig, nxt))
    dt = nxt - sig
    denom = torch.where(sig == 1, torch.full_like(sig, sigma_max if sigma_max is not None else 0.0), sig)
    std_t = a * torch.sqrt(sig / (1 - denom))
    mean = x * (1 + std_t**2 * dt / (2 * sig)) + v * (1 + std_t**2 * (1 - sig) / (2 * sig)) * dt
    std = std_t * torch.sqrt(-dt)
    logp = Normal(mean, std.expand_as(mean)).log_prob(x_prev).mean(dim=tuple(range(1, x.ndim)))
    return mean, std, logp


@pytest.mark.parametrize("shape", SHAPES)
def test_noise_level_zero_is_the_euler_step(shape):
    x, v = torch.randn(shape, generator=gen(0)), torch.randn(shape, generator=gen(1))
    for i in range(6):
        out = sde_step(v, x, S[i], S[i + 1], 0.0)
        assert isinstance(out, SDEStepOutput)
        assert torch.equal(out.prev_sample, x + v * (SIGMAS[i + 1] - SIGMAS[i]))
        assert torch.equal(out.log_prob, torch.zeros(shape[0])) and bool((out.std == 0).all())
    # bf16: computed in float32, cast back once
    xb, vb = x.bfloat16(), v.bfloat16()
    out = sde_step(vb, xb, S[2], S[3], 0.0)
    assert out.prev_sample.dtype == torch.bfloat16
    assert torch.equal(out.prev_sample, (xb.float() + (SIGMAS[3] - SIGMAS[2]) * vb.float()).bfloat16())


def test_euler_loop_matches_diffusers_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(64))
    sigmas = flux_sigmas(6, 64)
    ours = theirs = torch.randn(2, 64, 16, generator=gen(2))
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 64, 16, generator=gen(100 + i))
        theirs = scheduler.step(v, t, theirs, return_dict=False)[0]
        ours = sde_step(v, ours, sigmas[i], sigmas[i + 1], 0.0).prev_sample
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("step", [0, 1, 3, 5])
def test_log_prob_matches_float64_brute_force(shape, step):
    x, v = torch.randn(shape, generator=gen(3)), torch.randn(shape, generator=gen(4))
    out = sde_step(v, x, S[step], S[step + 1], 0.7, sigma_max=S[1], generator=gen(5))
    mean, std, logp = reference_step(x, v, S[step], S[step + 1], 0.7, S[1], out.prev_sample)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (shape[0],)
    assert torch.allclose(out.log_prob.double(), logp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.mean.double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out.std.double(), std, rtol=1e-6)
    # a sample away from the mean (a large quadratic term) too
    other = out.mean + 3 * out.std * torch.randn(shape, generator=gen(6))
    _, _, logp2 = reference_step(x, v, S[step], S[step + 1], 0.7, S[1], other)
    out2 = sde_step(v, x, S[step], S[step + 1], 0.7, sigma_max=S[1], prev_sample=other)
    assert torch.allclose(out2.log_prob.double(), logp2, rtol=1e-5, atol=1e-5)
    assert out2.prev_sample is other


def test_sigma_one_uses_sigma_max_in_the_denominator_only():
    x, v = torch.randn(2, 8, 4, generator=gen(7)), torch.randn(2, 8, 4, generator=gen(8))
    a, s1 = 0.7, S[1]
    out = sde_step(v, x, 1.0, s1, a, sigma_max=s1, generator=gen(9))
    std_t = a * math.sqrt(1.0 / (1 - s1))
    dt = s1 - 1.0
    assert out.std.item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)
    # with sigma = 1 the velocity coefficient's (1 - sigma) term vanishes: mean = x(1 + std_t² Δ / 2) + v Δ
    expected = x.double() * (1 + std_t**2 * dt / 2) + v.double() * dt
    assert torch.allclose(out.mean.double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(v, x, 1.0, s1, a)
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(v, x, torch.tensor([S[2], 1.0]), torch.tensor([S[3], s1]), a)
    # sigma_max is irrelevant below sigma = 1
    lo = sde_step(v, x, S[2], S[3], a, prev_sample=out.prev_sample)
    lo_max = sde_step(v, x, S[2], S[3], a, sigma_max=s1, prev_sample=out.prev_sample)
    assert torch.equal(lo.log_prob, lo_max.log_prob)


@pytest.mark.parametrize("shape", SHAPES)
def test_per_sample_sigmas_equal_separate_calls(shape):
    x, v = torch.randn(shape, generator=gen(10)), torch.randn(shape, generator=gen(11))
    steps = [0, 2, 5]
    sig, nxt = torch.tensor([S[i] for i in steps]), torch.tensor([S[i + 1] for i in steps])
    batched = sde_step(v, x, sig, nxt, 0.8, sigma_max=S[1], generator=[gen(20 + i) for i in range(3)])
    mean, std, logp = reference_step(
        x, v, [S[i] for i in steps], [S[i + 1] for i in steps], 0.8, S[1], batched.prev_sample
    )
    assert torch.allclose(batched.log_prob.double(), logp, rtol=1e-5, atol=1e-5)
    assert batched.std.shape == (3,) + (1,) * (len(shape) - 1)
    for b, i in enumerate(steps):
        single = sde_step(v[b : b + 1], x[b : b + 1], S[i], S[i + 1], 0.8, sigma_max=S[1], generator=gen(20 + b))
        assert torch.equal(single.prev_sample[0], batched.prev_sample[b])
        assert torch.equal(single.mean[0], batched.mean[b])
        assert torch.equal(single.std.flatten(), batched.std[b].flatten())
        assert torch.equal(single.log_prob[0], batched.log_prob[b])
    # an Euler step with per-sample sigmas too
    euler = sde_step(v, x, sig, nxt, 0.0)
    for b in range(3):
        assert torch.equal(euler.prev_sample[b], x[b] + v[b] * (nxt[b] - sig[b]))


def test_seeded_sampling_is_reproducible_and_generator_lists_are_per_sample():
    x, v = torch.randn(2, 16, 8, generator=gen(12)), torch.randn(2, 16, 8, generator=gen(13))
    first = sde_step(v, x, S[1], S[2], 0.7, generator=gen(0))
    again = sde_step(v, x, S[1], S[2], 0.7, generator=gen(0))
    other = sde_step(v, x, S[1], S[2], 0.7, generator=gen(1))
    assert torch.equal(first.prev_sample, again.prev_sample) and torch.equal(first.log_prob, again.log_prob)
    assert not torch.equal(first.prev_sample, other.prev_sample)
    # one generator for the batch = the noise of torch.randn(shape) on that generator
    noise = torch.randn(2, 16, 8, generator=gen(0))
    assert torch.allclose(first.prev_sample, first.mean + first.std * noise, atol=0, rtol=0)
    listed = sde_step(v, x, S[1], S[2], 0.7, generator=[gen(5), gen(6)])
    for b, seed in enumerate([5, 6]):
        alone = sde_step(v[b : b + 1], x[b : b + 1], S[1], S[2], 0.7, generator=gen(seed))
        assert torch.equal(alone.prev_sample[0], listed.prev_sample[b])
    with pytest.raises(ValueError, match="generators"):
        sde_step(v, x, S[1], S[2], 0.7, generator=[gen(5)])


def test_empirical_moments_match_mean_and_std():
    n = 20000
    x = torch.randn(1, 4, 3, generator=gen(14)).expand(n, 4, 3)
    v = torch.randn(1, 4, 3, generator=gen(15)).expand(n, 4, 3)
    out = sde_step(v, x, S[1], S[2], 0.7, generator=gen(16))
    std = out.std.item()
    emp_mean, emp_std = out.prev_sample.mean(0), out.prev_sample.std(0)
    # 5-sigma sampling bounds: mean error std/sqrt(n), relative std error 1/sqrt(2n)
    assert (emp_mean - out.mean[0]).abs().max().item() < 5 * std / math.sqrt(n)
    assert (emp_std / std - 1).abs().max().item() < 5 / math.sqrt(2 * n)
    # E[log p] = -1/2 - log(std) - log(2π)/2 (the averaged quadratic term has mean 1/2)
    expected = -0.5 - math.log(std) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.mean().item() == pytest.approx(expected, abs=5 * math.sqrt(2 / 12) / 2 / math.sqrt(n) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sample_then_evaluate_is_bitwise(dtype, shape):
    x = torch.randn(shape, generator=gen(17)).to(dtype)
    v = torch.randn(shape, generator=gen(18)).to(dtype)
    sig = torch.tensor([S[0], S[3], S[4]])
    nxt = torch.tensor([S[1], S[4], S[5]])
    for sigma, sigma_next in [(S[0], S[1]), (S[4], S[5]), (sig, nxt)]:
        rollout = sde_step(v, x, sigma, sigma_next, 0.7, sigma_max=S[1], generator=gen(19))
        assert rollout.prev_sample.dtype == dtype
        train = sde_step(v, x, sigma, sigma_next, 0.7, sigma_max=S[1], prev_sample=rollout.prev_sample)
        assert torch.equal(rollout.log_prob, train.log_prob)
        assert torch.equal(torch.exp(train.log_prob - rollout.log_prob), torch.ones(shape[0]))


def test_bf16_log_prob_is_float32_and_equals_upcast_computation():
    x = torch.randn(3, 16, 8, generator=gen(21)).bfloat16()
    v = torch.randn(3, 16, 8, generator=gen(22)).bfloat16()
    out = sde_step(v, x, S[2], S[3], 0.7, generator=gen(23))
    assert out.log_prob.dtype == torch.float32 and out.mean.dtype == torch.float32
    up = sde_step(v.float(), x.float(), S[2], S[3], 0.7, prev_sample=out.prev_sample.float())
    assert torch.equal(out.log_prob, up.log_prob) and torch.equal(out.mean, up.mean)


def test_log_prob_gradient_wrt_velocity():
    x = torch.randn(2, 8, 4, generator=gen(24))
    v = torch.randn(2, 8, 4, generator=gen(25))
    a, s, sn = 0.7, S[2], S[3]
    sampled = sde_step(v, x, s, sn, a, generator=gen(26)).prev_sample
    v = v.clone().requires_grad_(True)
    out = sde_step(v, x, s, sn, a, prev_sample=sampled)
    out.log_prob.sum().backward()
    # d/dv of -mean((x' - m)²)/(2 std²) with dm/dv = c·Δ, c = 1 + std_t²(1 - σ)/(2σ)
    std_t2 = a * a * s / (1 - s)
    c, dt = 1 + std_t2 * (1 - s) / (2 * s), sn - s
    expected = (sampled - out.mean.detach()) / out.std.detach() ** 2 * c * dt / sampled[0].numel()
    assert torch.allclose(v.grad, expected, rtol=1e-4, atol=1e-7)


def test_sde_step_errors():
    x = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, x, S[2], S[2], 0.7)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, x, S[3], S[2], 0.7)
    with pytest.raises(ValueError, match="shapes differ"):
        sde_step(x, x[:1], S[2], S[3], 0.7)
    with pytest.raises(ValueError, match="sigma"):
        sde_step(x, x, torch.tensor([S[2], S[3], S[4]]), S[5], 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, x, S[2], S[3], -0.1)


# --------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_worked():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = torch.tensor([[-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4)], [0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert adv[0, 2].item() == pytest.approx(1.224595, abs=1e-5)  # 1 / 0.816597
    assert torch.equal(adv[1], torch.zeros(3))
    # a constant group whose float mean is not exactly representable is still exactly zero
    assert torch.equal(group_advantages(torch.full((2, 4), 0.1)), torch.zeros(2, 4))


def test_batch_scope_hand_worked():
    adv = group_advantages(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), scope="batch")
    std = math.sqrt(1.25)  # mean 2.5, deviations ±0.5, ±1.5
    expected = torch.tensor([[-1.5, -0.5], [0.5, 1.5]]) / (std + 1e-4)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.equal(group_advantages(torch.ones(2, 3), scope="batch"), torch.zeros(2, 3))


def test_advantage_clipping_with_an_outlier():
    rewards = torch.zeros(1, 30)
    rewards[0, 7] = 1.0  # one success in 30: z = sqrt(29) ≈ 5.385
    std = math.sqrt(29) / 30
    raw = group_advantages(rewards, clip=None)
    assert raw[0, 7].item() == pytest.approx((29 / 30) / (std + 1e-4), rel=1e-5)
    assert raw[0, 7].item() > 5
    clipped = group_advantages(rewards)
    assert clipped[0, 7].item() == 5.0
    assert clipped[0, 0].item() == pytest.approx((-1 / 30) / (std + 1e-4), rel=1e-5)
    assert group_advantages(rewards, clip=2.0)[0, 7].item() == 2.0


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"group\(s\) \[1\]"):
        group_advantages(torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="scope"):
        group_advantages(torch.ones(2, 2), scope="global")
    with pytest.raises(ValueError, match="n_groups"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="clip"):
        group_advantages(torch.ones(2, 2), clip=0)


# --------------------------------------------------------------------------------------------- loss


def test_grpo_loss_on_policy():
    logp = torch.randn(8, generator=gen(30)).requires_grad_(True)
    adv = torch.randn(8, generator=gen(31))
    loss, stats = grpo_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-7)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 8, atol=1e-8)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max_dev"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert all(not s.requires_grad for s in stats.values())


def test_grpo_loss_off_policy_clipping_binds():
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 1.0])
    # per element max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clip binds)   A=-1 r=0.5: max(0.5, 0.8) = 0.8 (clip binds)
    #   A=+2 r=0.5: max(-1.0, -1.6) = -1.0                A=-2 r=1.5: max(3.0, 2.4) = 3.0
    #   A=+1 r=1.1: -1.1 (inside the range)
    logp = torch.log(ratios).requires_grad_(True)
    loss, stats = grpo_loss(logp, torch.zeros(5), adv, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.0 + 3.0 - 1.1) / 5, abs=1e-6)  # 0.1
    loss.backward()
    # clipped branches carry no gradient; elsewhere d/dlogp = -A r / n
    assert torch.allclose(logp.grad, torch.tensor([0.0, 0.0, -2 * 0.5, 2 * 1.5, -1.1]) / 5, atol=1e-6)
    assert stats["ratio_mean"].item() == pytest.approx(5.1 / 5, abs=1e-6)
    assert stats["ratio_max_dev"].item() == pytest.approx(0.5, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.8)
    kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 5
    assert stats["approx_kl"].item() == pytest.approx(kl, rel=1e-5)


def test_grpo_loss_errors():
    with pytest.raises(ValueError, match="same shape"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.2)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)


def test_kl_divergence():
    mean = torch.randn(2, 3, 4, generator=gen(32))
    assert torch.equal(kl_divergence(mean, mean.clone(), torch.full((2, 1, 1), 0.3)), torch.zeros(2))
    m = torch.stack([torch.ones(2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])])  # (2, 2, 2)
    kl = kl_divergence(m, torch.zeros(2, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1))
    assert torch.allclose(kl, torch.tensor([1 / 2, (1 + 4 + 9 + 16) / 4 / (2 * 4)]))  # [0.5, 0.9375]
    # with sde_step outputs: policy and reference differ only in the velocity
    x, v = torch.randn(2, 8, 4, generator=gen(33)), torch.randn(2, 8, 4, generator=gen(34))
    a, s, sn = 0.7, S[2], S[3]
    pol = sde_step(v, x, s, sn, a, generator=gen(35))
    ref = sde_step(v + 0.1, x, s, sn, a, prev_sample=pol.prev_sample)
    c = 1 + a * a * s / (1 - s) * (1 - s) / (2 * s)
    expected = (c * 0.1 * (sn - s)) ** 2 / (2 * pol.std.item() ** 2)
    assert torch.allclose(kl_divergence(pol.mean, ref.mean, pol.std), torch.full((2,), expected), rtol=1e-4)
    with pytest.raises(ValueError, match="deterministic"):
        kl_divergence(mean, mean, torch.zeros(1, 1, 1))
    euler = sde_step(v, x, s, sn, 0.0)
    with pytest.raises(ValueError, match="deterministic"):
        kl_divergence(euler.mean, euler.mean, euler.std)


# --------------------------------------------------------------------------------------------- timesteps


def test_fraction_mode_matches_official_code():
    assert select_train_steps(6, fraction=0.99) == [0, 1, 2, 3, 4]
    assert select_train_steps(6, fraction=1.0) == [0, 1, 2, 3, 4, 5]
    assert select_train_steps(6) == [0, 1, 2, 3, 4, 5]
    assert select_train_steps(10, fraction=0.5) == [0, 1, 2, 3, 4]
    assert sde_mask(6) == [True] * 6  # fraction mode samples every step with the SDE


def test_window_mode():
    assert select_train_steps(6, window=(2, 3)) == [2, 3, 4]
    assert sde_mask(6, (2, 3)) == [False, False, True, True, True, False]
    assert sde_mask(6, (0, 6)) == [True] * 6
    shuffled = select_train_steps(10, window=(1, 8), shuffle=True, generator=gen(40))
    assert sorted(shuffled) == list(range(1, 9)) and shuffled != list(range(1, 9))
    assert shuffled == select_train_steps(10, window=(1, 8), shuffle=True, generator=gen(40))
    g = gen(41)
    starts = [random_window(6, 2, g) for _ in range(300)]
    assert {w[1] for w in starts} == {2} and {w[0] for w in starts} == {0, 1, 2, 3, 4}
    assert {random_window(6, 2, g, max_start=1)[0] for _ in range(100)} == {0, 1}
    assert random_window(6, 6) == (0, 6)


def test_timestep_errors():
    with pytest.raises(ValueError, match="num_steps"):
        select_train_steps(0)
    with pytest.raises(ValueError, match="fraction"):
        select_train_steps(6, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        select_train_steps(6, fraction=1.5)
    with pytest.raises(ValueError, match="selects no step"):
        select_train_steps(6, fraction=0.1)
    with pytest.raises(ValueError, match="either"):
        select_train_steps(6, fraction=0.5, window=(0, 2))
    with pytest.raises(ValueError, match="inside"):
        select_train_steps(6, window=(4, 3))
    with pytest.raises(ValueError, match="inside"):
        sde_mask(6, (-1, 2))
    with pytest.raises(ValueError, match="size"):
        sde_mask(6, (0, 0))
    with pytest.raises(ValueError, match="size"):
        random_window(6, 7)
    with pytest.raises(ValueError, match="max_start"):
        random_window(6, 2, max_start=5)


def test_pooled_advantages_take_statistics_from_the_whole_pool():
    from divrl.grpo import pooled_advantages

    rewards = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.2, 0.8]])
    assert torch.allclose(pooled_advantages(rewards, rewards), group_advantages(rewards, "batch"), atol=1e-7)
    other_rank = torch.tensor([[2.0, 3.0, 4.0]])
    pool = torch.cat([rewards.flatten(), other_rank.flatten()])
    mean, std = pool.mean(), pool.std(unbiased=False)  # hand computation over both "ranks"
    assert torch.allclose(pooled_advantages(rewards, pool, clip=None), (rewards - mean) / (std + 1e-4))
    assert torch.equal(pooled_advantages(rewards, torch.full((5,), 0.3)), torch.zeros_like(rewards))
