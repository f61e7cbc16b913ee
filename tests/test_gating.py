"""Identity gating (policy.reference_window, IdGlow's temporal gating): outside the window the velocity does not depend
on the reference at all, inside it does; mixed batches equal row-by-row calls; the sampler honours it."""

from __future__ import annotations

import pytest
import torch

from divrl.grpo import rollout
from divrl.policy import KontextConfig, KontextPolicy
from divrl.policy.gating import check_window


@pytest.fixture(scope="module")
def gated():
    policy = KontextPolicy.tiny(seed=3, reference_window=(0.3, 0.6))
    g = torch.Generator().manual_seed(0)
    refs = [torch.rand(3, 32, 32, generator=g) for _ in range(2)]
    conds = [policy.condition(ref, "a photo of the red star", 32, 32) for ref in refs]
    latents = policy.initial_noise(conds[0], torch.Generator().manual_seed(1))
    return policy, conds, latents


@pytest.mark.parametrize("sigma", [1.0, 0.8, 0.61, 0.29, 0.05])
def test_outside_the_window_the_velocity_is_independent_of_the_reference(gated, sigma):
    policy, conds, latents = gated
    with torch.no_grad():
        a, b = (policy.velocity(latents, sigma, c) for c in conds)
    assert torch.equal(a, b)
    # and equals the network called on the noisy tokens and the prompt alone
    with torch.no_grad():
        alone = policy._velocity(latents, torch.tensor([sigma]), conds[0], False)
    assert torch.equal(a, alone)


@pytest.mark.parametrize("sigma", [0.3, 0.45, 0.6])
def test_inside_the_window_the_reference_is_attended_to(gated, sigma):
    policy, conds, latents = gated
    with torch.no_grad():
        a, b = (policy.velocity(latents, sigma, c) for c in conds)
        ungated = policy._velocity(latents, torch.tensor([sigma]), conds[0], True)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, ungated)


def test_a_mixed_batch_equals_row_by_row_calls(gated):
    policy, conds, latents = gated
    cond = policy.condition(
        torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5)), ["a red star"] * 3, 32, 32
    )
    x = torch.cat([latents] * 3)
    sigma = torch.tensor([0.9, 0.45, 0.1])
    with torch.no_grad():
        batched = policy.velocity(x, sigma, cond)
        rows = torch.cat([policy.velocity(x[i : i + 1], sigma[i : i + 1], cond.select([i])) for i in range(3)])
    assert torch.allclose(batched, rows, atol=1e-6)


def test_the_number_of_network_calls_does_not_depend_on_the_draws(gated):
    """Under FSDP every call is a collective: two ranks drawing different σ must make the same calls. Rows sharing a σ
    make one call; rows with their own σ always make two (with and without the references), whatever the draws."""
    policy, conds, latents = gated
    cond = policy.condition(
        torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5)), ["a red star"] * 3, 32, 32
    )
    x = torch.cat([latents] * 3)
    calls = []
    hook = policy.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            for sigma in ([0.9, 0.45, 0.1], [0.4, 0.5, 0.55], [0.9, 0.8, 0.7], [0.2, 0.2, 0.2], [0.5, 0.5, 0.5]):
                calls.clear()
                policy.velocity(x, torch.tensor(sigma), cond)
                assert len(calls) == (1 if len(set(sigma)) == 1 else 2), sigma
    finally:
        hook.remove()


def test_the_sampler_honours_the_window(gated):
    """Sampling steps whose σ is outside the window cannot see the reference: with σ = 1 → 0.77 the first step's
    latents are identical for two references; later steps (one of them inside the window) differ."""
    policy, conds, _ = gated
    runs = [
        rollout(policy, c, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(7), decode=False)
        for c in conds
    ]
    sigmas = runs[0].sigmas
    assert sigmas[0] > 0.6 and sigmas[1] > 0.6  # the first step is outside the window
    assert torch.equal(runs[0].latents[:, 1], runs[1].latents[:, 1])
    assert not torch.equal(runs[0].latents[:, -1], runs[1].latents[:, -1])


def test_window_settings_are_validated():
    assert check_window([0.3, 0.6]) == (0.3, 0.6) and check_window(None) is None
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        KontextConfig(model="tiny", reference_window=(0.7, 0.2))
