"""The clipped GRPO policy loss and the per-step KL to the reference policy (``DESIGN.md`` "The math")."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grpo_loss", "kl_divergence"]


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO-clipped GRPO objective for one micro-batch of (sample, timestep) transitions.

    ``r = exp(logp − logp_old)``, ``loss = mean(max(−A·r, −A·clip(r, 1 − ε, 1 + ε)))``. ``old_log_prob`` (recorded
    during the rollout) and ``advantages`` are treated as constants. On policy (``logp == logp_old``) the loss is
    ``−mean(A)`` and its gradient w.r.t. ``log_prob`` is ``−A / n``. Computed in float32.

    Args:
        log_prob: ``(n,)`` log-probabilities under the current policy (with grad), from
            :func:`~divrl.grpo.sde.sde_step` with ``prev_sample=`` the recorded sample.
        old_log_prob: ``(n,)`` log-probabilities recorded during the rollout.
        advantages: ``(n,)`` advantages of the samples the transitions belong to (already clipped, see
            :func:`~divrl.grpo.advantages.group_advantages`).
        clip_range: PPO's ``ε`` (Flow-GRPO uses 1e-4 for FLUX), ``> 0``.

    Returns:
        ``(loss, stats)``: the scalar loss and detached float32 scalar statistics ``ratio_mean``,
        ``ratio_max_dev`` (``max |r − 1|``), ``clip_fraction`` (fraction of ``|r − 1| > ε``) and ``approx_kl``
        (``mean(0.5·(logp − logp_old)²)``).

    Raises:
        ValueError: on shape mismatches, an empty batch or ``clip_range <= 0``.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    if log_prob.numel() == 0:
        raise ValueError("grpo_loss got an empty batch")
    logp = log_prob.float()
    diff = logp - old_log_prob.detach().float()
    adv = advantages.detach().float()
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()

    with torch.no_grad():
        dev = (ratio - 1).abs()
        stats = {
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": dev.max(),
            "clip_fraction": (dev > clip_range).float().mean(),
            "approx_kl": (0.5 * diff.square()).mean(),
        }
    return loss, stats


def kl_divergence(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between the policy's and the reference's Gaussian transitions of one SDE step.

    Both transitions share the std ``std_t·sqrt(−Δ)`` and differ only in the mean, so per element
    ``KL = (mean − ref_mean)² / (2·std²)``; this returns its average over all non-batch elements (the same
    averaging as the log-probability). Computed in float32; gradients flow into both means.

    Args:
        mean: ``(B, ...)`` transition mean under the policy (``SDEStepOutput.mean``), any rank (packed 3-D FLUX
            latents included).
        ref_mean: same shape, the transition mean under the reference policy (adapter disabled).
        std: the transition std (``SDEStepOutput.std``), broadcastable to ``mean``.

    Returns:
        ``(B,)`` float32 KL per sample.

    Raises:
        ValueError: on mismatched shapes (``std`` must broadcast to ``mean``'s shape), or if ``std`` is 0
            anywhere: the deterministic (ODE) step has no density, so its KL is undefined — train only SDE steps.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} shapes differ")
    if mean.ndim < 1:
        raise ValueError("mean must be batched, (B, ...)")
    std = torch.as_tensor(std, device=mean.device).detach().float()
    try:
        fits = torch.broadcast_shapes(std.shape, mean.shape) == mean.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"std {tuple(std.shape)} does not broadcast to mean {tuple(mean.shape)}")
    if bool((std == 0).any()):
        raise ValueError(
            "std is 0: the KL of a deterministic (ODE, noise_level=0) step is undefined; train only SDE steps"
        )
    sq = (mean.float() - ref_mean.float()).square() / (2 * std.square())
    return sq.mean(dim=tuple(range(1, mean.ndim))) if mean.ndim > 1 else sq
