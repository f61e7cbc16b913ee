"""GRPO advantages: rewards standardised within each group (or over the whole rollout batch), then clipped."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages", "pooled_advantages"]

_SCOPES = ("group", "batch")


def group_advantages(
    rewards: Tensor,
    scope: str = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Tensor:
    """Standardised advantages ``A = (R − mean) / (std + eps)``, clipped to ``±clip``.

    The statistics are over each row (``scope="group"``: the ``G`` samples of one (identity, prompt) condition,
    the DivRL default) or over the whole tensor (``scope="batch"``: the published Flow-GRPO code's choice). The
    std is the **population** std (``unbiased=False``, numpy's default, as the official code uses). A set of
    identical rewards (a zero-variance group, or a constant batch) gives exactly 0 everywhere, never NaN or
    rounding noise divided by ``eps``. Computed in float32 (float64 input stays float64).

    Args:
        rewards: ``(n_groups, G)`` rewards, one row per condition.
        scope: ``"group"`` (statistics per row) or ``"batch"`` (statistics over all entries).
        eps: added to the std in the denominator.
        clip: advantages are clamped to ``[-clip, clip]`` (the paper: 5); ``None`` disables clipping.

    Returns:
        ``(n_groups, G)`` advantages.

    Raises:
        ValueError: for a tensor that is not 2-D, a bad ``scope``, ``eps < 0``, ``clip <= 0``, or a non-finite
            reward (the message names the group index).
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (n_groups, G), got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive or None, got {clip}")
    r = rewards.detach()
    r = r if r.dtype == torch.float64 else r.float()
    bad = (~torch.isfinite(r)).any(dim=1)
    if bool(bad.any()):
        groups = bad.nonzero().flatten().tolist()
        raise ValueError(f"non-finite (NaN/inf) reward in group(s) {groups}: {r[groups[0]].tolist()}")

    dims = (1,) if scope == "group" else (0, 1)
    mean = r.mean(dim=dims, keepdim=True)
    std = r.std(dim=dims, unbiased=False, keepdim=True)
    constant = r.amax(dim=dims, keepdim=True) == r.amin(dim=dims, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(r), (r - mean) / (std + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def pooled_advantages(rewards: Tensor, pool: Tensor, eps: float = 1e-4, clip: float | None = 5.0) -> Tensor:
    """``(rewards − mean(pool)) / (std(pool) + eps)``, clipped: the ``"batch"`` scope when the batch is larger than
    ``rewards`` (the rewards of every rank, gathered). A constant pool gives exactly 0 (no signal, never noise / eps).

    Args:
        rewards: this rank's rewards, any shape.
        pool: every reward the statistics are taken over (population std), any shape; must be finite.
        eps, clip: as in :func:`group_advantages`.
    """
    pool = pool.detach().float().flatten()
    if pool.numel() == 0 or bool(pool.max() == pool.min()):
        return torch.zeros_like(rewards, dtype=torch.float32)
    adv = (rewards.detach().float() - pool.mean()) / (pool.std(unbiased=False) + eps)
    return adv.clamp(-clip, clip) if clip is not None else adv
