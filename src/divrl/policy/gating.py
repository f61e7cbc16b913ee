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
        raise ValueError(f"policy.reference_window must be [low, high] with 0 <= low <= high <= 1 (IdGlow: [0.3, 0.6]), "
                         f"got {list(window)}")
    return low, high


def gated_velocity(call: Callable[[Tensor, Tensor, object, bool], Tensor], latents: Tensor, sigma: Tensor, cond,
                   window: tuple[float, float] | None) -> Tensor:
    """``call(latents, sigma, cond, references)`` with ``references`` true exactly for the rows whose ``σ`` lies in
    ``window`` (every row when ``window`` is ``None``): one call when all rows agree, else one call per side, the rows
    put back in order. ``sigma`` is ``(B,)``; ``cond`` selects rows with ``cond.select``."""
    if window is None:
        return call(latents, sigma, cond, True)
    inside = (sigma >= window[0]) & (sigma <= window[1])
    if bool(inside.all()) or not bool(inside.any()):
        return call(latents, sigma, cond, bool(inside[0]))
    rows = [inside.nonzero().flatten(), (~inside).nonzero().flatten()]
    parts = [call(latents[r], sigma[r], cond.select(r), see) for r, see in zip(rows, (True, False))]
    out = torch.empty((latents.shape[0], *parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
    return out.index_put((rows[0],), parts[0]).index_put((rows[1],), parts[1])
