"""The Flow-GRPO SDE sampling step and its log-probability (``DESIGN.md`` "The math").

With ``σ`` the current sigma, ``σ'`` the next one, ``Δ = σ' − σ < 0``, ``v`` the predicted velocity and ``a`` the
noise level::

    std_t = a · sqrt(σ / (1 − σ̃))          σ̃ = σ, except σ̃ = sigma_max (the schedule's second sigma) when σ = 1
    mean  = x · (1 + std_t² · Δ / (2σ)) + v · (1 + std_t² · (1 − σ) / (2σ)) · Δ
    x'    = mean + std_t · sqrt(−Δ) · ε,    ε ~ N(0, I)

and ``log p(x')`` is the Gaussian log-density of ``x'`` under ``N(mean, (std_t·sqrt(−Δ))²)``, **averaged** (not
summed) over all non-batch elements. ``a = 0`` is the deterministic Euler (ODE) step ``x' = x + v·Δ``.

The rollout (sampling, no grad) and the training update (``prev_sample=`` the recorded sample, with grad) both
call :func:`sde_step`, so the first on-policy ratio ``exp(logp − logp_old)`` is exactly 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SDEStepOutput", "sde_step"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

Sigma = float | Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


class SDEStepOutput(NamedTuple):
    """The result of one :func:`sde_step`.

    Attributes:
        prev_sample: ``x'``, the sample at ``σ'``, in the input ``sample``'s dtype (the ``prev_sample`` argument
            itself when one was given).
        log_prob: ``(B,)`` float32, the Gaussian log-density of ``prev_sample`` averaged over its non-batch
            elements; zeros for the deterministic step (``noise_level == 0``).
        mean: float32, the mean of the transition, shaped like the sample (carries the gradient of ``velocity``).
        std: float32, ``std_t·sqrt(−Δ)``, the standard deviation of the transition, shaped ``(B or 1, 1, ..., 1)``
            so that it broadcasts against the sample; zeros for the deterministic step.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def _per_sample(value: Sigma, batch: int, ndim: int, device: torch.device, name: str) -> Tensor:
    """A Python float or a ``(B,)``/0-d tensor as a float32 tensor shaped ``(B or 1, 1, ..., 1)`` on ``device``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        return t.reshape((1,) * ndim)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.reshape((batch,) + (1,) * (ndim - 1))


def _randn(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    """Float32 standard normal noise of ``shape``, drawn like diffusers' ``randn_tensor``: on the generator's
    device (then moved to ``device``), and per sample from ``generator[i]`` when a list of generators is given."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} samples")
    one = (1,) + tuple(shape[1:])
    noise = [torch.randn(one, generator=g, device=g.device, dtype=torch.float32).to(device) for g in generators]
    return torch.cat(noise, dim=0)


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    sigma_max: Sigma | None = None,
    prev_sample: Tensor | None = None,
    generator: Generators = None,
) -> SDEStepOutput:
    """One Flow-GRPO step from ``σ`` to ``σ'``: sample ``x'`` (or take the given one) and its log-probability.

    All arithmetic runs in float32 whatever the input dtype; ``prev_sample`` comes back in ``sample``'s dtype.
    The log-probability is always evaluated on that *returned* (dtype-cast) sample with the sample detached, so
    sampling once and then calling ``sde_step`` again on the same inputs with ``prev_sample=`` the returned sample
    gives a **bitwise identical** ``log_prob`` (the rollout and the training path share this function; the
    first on-policy PPO ratio is exactly 1). Gradients flow from ``log_prob`` and ``mean`` into ``velocity``.

    ``noise_level == 0`` is the deterministic Euler (ODE) step ``x' = x + Δ·v``, computed in float32 and cast
    back to ``sample``'s dtype. In float32 this is bitwise what diffusers' ``FlowMatchEulerDiscreteScheduler.step``
    returns. (For bf16 latents diffusers rounds ``Δ·v`` to bf16 before adding it to the float32 sample, so a bf16
    result can differ from it by one bf16 ulp.) The ODE step has no density: ``log_prob`` is zeros and ``std`` is 0,
    so such a step cannot be trained.

    The noise ``ε`` is drawn in float32 (Flow-GRPO's code draws it in the latents' dtype).

    Args:
        velocity: the model's velocity prediction ``v``, same shape as ``sample``.
        sample: the current latents ``x`` at ``σ``, ``(B, ...)`` of any rank: packed FLUX latents are
            ``(B, tokens, channels)``, unpacked latents ``(B, C, H, W)``.
        sigma: the current sigma ``σ``: a Python float shared by the batch, or a ``(B,)`` tensor (one sigma per
            sample, broadcast over all non-batch dims).
        sigma_next: the next sigma ``σ'`` (float or ``(B,)`` tensor); for ``noise_level > 0``,
            ``0 ≤ σ' < σ ≤ 1`` is required.
        noise_level: the Flow-GRPO noise level ``a ≥ 0`` (0: the deterministic Euler step).
        sigma_max: the schedule's second sigma (``sigmas[1]``), used in place of ``σ`` in the denominator
            ``1 − σ`` when ``σ = 1`` (which would divide by zero). Required when any ``σ`` equals 1 and
            ``noise_level > 0``; float or ``(B,)`` tensor in ``(0, 1)``.
        prev_sample: if given, nothing is sampled: the log-probability of this ``x'`` is computed (the training
            path). Same shape as ``sample``.
        generator: a ``torch.Generator`` for the whole batch, or a list of ``B`` generators, one per sample (as
            diffusers' ``randn_tensor``: sample ``i`` then equals a batch-of-one call with ``generator[i]``);
            ``None`` uses the global RNG. Ignored when ``prev_sample`` is given or ``noise_level == 0``.

    Returns:
        :class:`SDEStepOutput` ``(prev_sample, log_prob, mean, std)``: ``log_prob`` is ``(B,)`` float32, ``mean``
        float32 shaped like the sample, ``std`` float32 shaped ``(B or 1, 1, ..., 1)``.

    Raises:
        ValueError: on mismatched shapes, a negative noise level, sigmas outside ``0 ≤ σ' < σ ≤ 1`` for a
            stochastic step, or ``σ = 1`` without ``sigma_max``.
    """
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} shapes differ")
    if sample.ndim < 2:
        raise ValueError(f"sample must be batched, (B, ...) with at least 2 dims, got shape {tuple(sample.shape)}")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} shapes differ")
    noise_level = float(noise_level)
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")

    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    s = _per_sample(sigma, batch, ndim, device, "sigma")
    s_next = _per_sample(sigma_next, batch, ndim, device, "sigma_next")
    dt = s_next - s  # float32 subtraction of the float32 sigmas, as the diffusers scheduler does
    x = sample.float()
    v = velocity.float()

    if noise_level == 0:
        mean = x + dt * v
        std = torch.zeros_like(dt)
        log_prob = torch.zeros(batch, dtype=torch.float32, device=device)
        out = mean.to(sample.dtype) if prev_sample is None else prev_sample
        return SDEStepOutput(out, log_prob, mean, std)

    if bool(((s > 1) | (s_next < 0) | (s_next >= s)).any()):
        raise ValueError(
            f"a stochastic step needs 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}"
        )
    at_one = s == 1
    if sigma_max is None:
        if bool(at_one.any()):
            raise ValueError(
                "sigma == 1 makes std_t = a*sqrt(sigma/(1 - sigma)) divide by zero: pass sigma_max (the schedule's "
                "second sigma, sigmas[1]) to use in the denominator at sigma = 1, as Flow-GRPO does"
            )
        denom_sigma = s
    else:
        s_max = _per_sample(sigma_max, batch, ndim, device, "sigma_max")
        if bool(((s_max <= 0) | (s_max >= 1)).any()):
            raise ValueError(f"sigma_max must lie in (0, 1), got {sigma_max}")
        denom_sigma = torch.where(at_one, s_max, s)

    std_t = noise_level * torch.sqrt(s / (1 - denom_sigma))
    var_t = std_t * std_t
    mean = x * (1 + var_t * dt / (2 * s)) + v * (1 + var_t * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)

    if prev_sample is None:
        noise = _randn(sample.shape, generator, device)
        prev_sample = (mean + std * noise).to(sample.dtype)

    # Evaluated on the returned sample (after the dtype cast), detached: identical in the rollout and training.
    diff = prev_sample.detach().float() - mean
    mean_sq = diff.square().mean(dim=tuple(range(1, ndim)))
    std_flat = std.reshape(-1)
    log_prob = -mean_sq / (2 * std_flat.square()) - torch.log(std_flat) - _HALF_LOG_2PI
    return SDEStepOutput(prev_sample, log_prob, mean, std)
