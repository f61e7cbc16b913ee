"""The FLUX sigma schedule, bit-for-bit as diffusers builds it for FLUX.1 (Kontext), from a scheduler configuration.

``FluxKontextPipeline`` starts from ``np.linspace(1, 1/N, N)`` (float64), computes the shift ``μ`` from the
number of image tokens (:func:`calculate_shift`) and hands both to ``FlowMatchEulerDiscreteScheduler.set_timesteps``
with FLUX's scheduler config (``use_dynamic_shifting=True``, ``time_shift_type="exponential"``). The scheduler then

1. casts the float64 sigmas to **float32** (so the shift is evaluated in float32, not float64),
2. applies ``exp(μ) / (exp(μ) + (1/σ − 1))`` with numpy float32 arithmetic (``exp(μ)`` is a Python float,
   which numpy rounds to float32 before the operation),
3. optionally stretches the schedule so that it ends at ``shift_terminal``,
4. converts to a float32 torch tensor and appends a terminal 0.

:func:`flux_sigmas` repeats those operations in the same dtypes and order, so the result is ``torch.equal`` to
``scheduler.sigmas``. (Rewriting step 2 in torch would *not* be bit-exact: ``python_float / tensor`` in torch is
computed as ``tensor.reciprocal() * python_float``, two roundings instead of one.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["calculate_shift", "flux_sigmas", "scheduler_sigmas", "scheduler_shift"]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift ``μ`` of the FLUX schedule: a line through ``(base_seq_len, base_shift)``
    and ``(max_seq_len, max_shift)`` evaluated at ``image_seq_len`` (not clamped: longer sequences extrapolate).

    The arithmetic is in the same order as diffusers' FLUX pipelines, so ``μ`` is the identical Python float.

    Args:
        image_seq_len: number of (packed) noisy image tokens, i.e. ``latents.shape[1]`` of the packed FLUX latents
            (``(H/16)·(W/16)`` for an ``H×W`` image); the Kontext reference tokens do not count.
        base_seq_len: token count at which ``μ = base_shift`` (FLUX: 256, i.e. 256×256 pixels).
        max_seq_len: token count at which ``μ = max_shift`` (FLUX: 4096, i.e. 1024×1024 pixels).
        base_shift: ``μ`` at ``base_seq_len``.
        max_shift: ``μ`` at ``max_seq_len``.

    Returns:
        ``μ`` as a Python float.
    """
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len and base_seq_len must differ, both are {base_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    shift_terminal: float | None = None,
) -> torch.Tensor:
    """The FLUX sampling sigmas for ``num_steps`` steps, with the terminal 0 appended.

    ``σ_i = exp(μ) / (exp(μ) + (1/s_i − 1))`` for ``s = linspace(1, 1/N, N)``, ``μ = calculate_shift(...)``,
    computed exactly as ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=s, mu=μ)`` does with FLUX's
    config (see the module docstring), so it equals that scheduler's ``sigmas`` bit for bit. ``σ_0`` is exactly
    1; step ``i`` of the sampler goes from ``σ_i`` to ``σ_{i+1}``. The transformer's timestep input is ``σ_i``
    (diffusers passes ``1000·σ_i`` and the FLUX transformer divides by 1000 again).

    Args:
        num_steps: number of denoising steps ``N`` (≥ 1).
        image_seq_len: number of packed noisy image tokens (``latents.shape[1]``), which sets ``μ``.
        base_shift: ``μ`` at ``base_seq_len`` tokens (scheduler config ``base_shift``).
        max_shift: ``μ`` at ``max_seq_len`` tokens (scheduler config ``max_shift``).
        base_seq_len: scheduler config ``base_image_seq_len``.
        max_seq_len: scheduler config ``max_image_seq_len``.
        shift_terminal: if set (and non-zero, as diffusers treats 0 as unset), stretch the shifted schedule so
            that its last non-zero sigma equals this value (scheduler config ``shift_terminal``; FLUX: unset).

    Returns:
        A float32 CPU tensor of shape ``(num_steps + 1,)``, decreasing from 1 to 0.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len}")
    if shift_terminal is not None and not 0 <= shift_terminal < 1:
        raise ValueError(f"shift_terminal must lie in [0, 1), got {shift_terminal}")
    if shift_terminal and num_steps == 1:
        # The one-sigma schedule is [1]: stretching it is 0/0 (diffusers returns NaN here).
        raise ValueError("shift_terminal needs num_steps >= 2 (a one-step schedule cannot be stretched)")
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)

    # The pipeline's float64 linspace, cast to float32 by the scheduler before any shifting.
    s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    one = np.float32(1.0)
    exp_mu = np.float32(math.exp(mu))
    sigmas = exp_mu / (exp_mu + (one / s - one))
    if shift_terminal:
        one_minus = one - sigmas
        scale = one_minus[-1] / np.float32(1 - shift_terminal)
        sigmas = one - one_minus / scale
    sigmas = torch.from_numpy(np.ascontiguousarray(sigmas, dtype=np.float32))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


_FIXED = {
    "time_shift_type": "exponential",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}
"""Scheduler options :func:`scheduler_sigmas` reproduces only at these values (FLUX's)."""


def scheduler_sigmas(config: dict, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The sigmas ``FluxKontextPipeline`` samples with for a ``FlowMatchEulerDiscreteScheduler`` configuration
    ``config`` (the model's ``scheduler/scheduler_config.json``): :func:`flux_sigmas` with the configuration's
    ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len`` and ``shift_terminal``.

    Raises:
        ValueError: for a configuration this function does not reproduce (no dynamic shifting, Karras, exponential
            or beta sigmas, a linear time shift, inverted or stochastic sampling), naming the option.
    """
    if not config.get("use_dynamic_shifting", False):
        raise ValueError(
            "scheduler config: use_dynamic_shifting is false; divrl's FLUX schedule shifts by the image "
            "size (use_dynamic_shifting: true, as FLUX.1 Kontext's scheduler_config.json)"
        )
    unsupported = {k: config[k] for k, v in _FIXED.items() if config.get(k, v) not in (v, None)}
    if unsupported:
        wanted = {k: _FIXED[k] for k in unsupported}
        raise ValueError(
            f"scheduler config: {unsupported} is not supported by divrl's FLUX schedule; it reproduces "
            f"{wanted} (FLUX.1 Kontext's scheduler_config.json)"
        )
    return flux_sigmas(
        num_steps,
        image_seq_len,
        base_shift=config["base_shift"],
        max_shift=config["max_shift"],
        base_seq_len=config["base_image_seq_len"],
        max_seq_len=config["max_image_seq_len"],
        shift_terminal=config.get("shift_terminal"),
    )


def scheduler_shift(config: dict, image_seq_len: int) -> float:
    """The time shift ``s = exp(μ)`` FLUX's schedule applies at ``image_seq_len`` tokens (``σ' = s·σ / (1 + (s − 1)·σ)``,
    the map :func:`flux_sigmas` applies to its uniform grid), for training timesteps drawn like the sampler's."""
    scheduler_sigmas(config, 1, image_seq_len)  # refuses the configurations divrl does not reproduce
    return math.exp(
        calculate_shift(
            image_seq_len,
            config["base_image_seq_len"],
            config["max_image_seq_len"],
            config["base_shift"],
            config["max_shift"],
        )
    )
