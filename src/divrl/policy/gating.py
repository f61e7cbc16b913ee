"""Identity gating (IdGlow's *temporal gating*): a family's reference tokens join the network call only at noise levels
inside a window, so that composition (high σ) and fine detail (low σ) are decided by the prompt alone.

Family-independent: a family's ``velocity`` hands :func:`gated_velocity` its own call with and without references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["check_window", "gated_velocity"]


def check_window(window: Sequence[float] | None) -> tuple[float, float] | None:
    """``reference_window`` as ``(low, high)`` with ``0 ≤ low ≤ high ≤ 1``, or ``None``; else a ValueError."""
    if window is None:
        return None
    low, high = (float(v) for v in window)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"policy.reference_window must be [low, high] with 0 <= low <= high <= 1 (IdGlow: [0.3, 0.6]), "
            f"got {list(window)}"
        )
    return low, high


def gated_velocity(
    call: Callable[[Tensor, Tensor, object, bool], Tensor],
    latents: Tensor,
    sigma: Tensor,
    cond,
    window: tuple[float, float] | None,
) -> Tensor:
    """``call(latents, sigma, cond, references)`` with ``references`` true exactly for the rows whose ``σ`` lies in
    ``window`` (every row when ``window`` is ``None``); ``sigma`` is ``(B,)``.

    The number of network calls never depends on the data, since under FSDP every call is a collective that every
    rank must make: rows sharing one ``σ`` (a sampler step; a group's shared noise level) make one call, with or
    without the references; rows with their own ``σ`` (the flow-matching objectives' draws) make both calls on every
    row and keep each row's own (twice the compute of an ungated call; the unused half gets no gradient).
    """
    if window is None:
        return call(latents, sigma, cond, True)
    inside = (sigma >= window[0]) & (sigma <= window[1])
    if bool((sigma == sigma[0]).all()):
        return call(latents, sigma, cond, bool(inside[0]))
    seen, unseen = call(latents, sigma, cond, True), call(latents, sigma, cond, False)
    return torch.where(inside.view(-1, *([1] * (seen.dim() - 1))), seen, unseen)
