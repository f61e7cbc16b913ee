"""Which denoising steps are stochastic (SDE) and which are trained.

Two modes:

- **fraction** (Flow-GRPO): every step is sampled with the SDE and the first ``int(N · fraction)`` steps are
  trained. The official FLUX setting ``timestep_fraction=0.99`` with 6 steps trains steps 0..4: the last step
  (σ ≈ 0.273 → 0) is sampled but never trained.
- **window** (Flow-GRPO-Fast / MixGRPO style): ``window=(start, size)`` makes steps ``start .. start+size−1``
  stochastic (``noise_level > 0``) and trains exactly those; every other step is the deterministic ODE step.
  :func:`random_window` draws the start uniformly.

Steps are indexed ``0 .. N−1``; step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``.
"""

from __future__ import annotations

import torch

__all__ = ["select_train_steps", "sde_mask", "random_window"]


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def _check_window(num_steps: int, window: tuple[int, int]) -> tuple[int, int]:
    try:
        start, size = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (start, size) pair, got {window!r}") from None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, size)):
        raise ValueError(f"window start and size must be ints, got {window!r}")
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if start < 0 or start + size > num_steps:
        raise ValueError(
            f"window (start={start}, size={size}) must lie inside the {num_steps} steps: 0 <= start and "
            f"start + size <= {num_steps}"
        )
    return start, size


def select_train_steps(
    num_steps: int,
    *,
    fraction: float | None = None,
    window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
) -> list[int]:
    """The indices of the denoising steps to train on.

    Args:
        num_steps: number of denoising steps ``N``.
        fraction: fraction mode: train the first ``int(N · fraction)`` steps, exactly as the official code's
            ``int(num_steps * timestep_fraction)`` (so ``0.99 × 6 → 5`` steps: ``[0, 1, 2, 3, 4]``; ``1.0`` → all).
            Being a plain ``int()`` of a float product it inherits float rounding (``0.29 × 100`` gives 28).
            Must lie in ``(0, 1]`` and select at least one step.
        window: window mode: ``(start, size)``, train steps ``start .. start+size−1`` (the stochastic ones, see
            :func:`sde_mask`). Exclusive with ``fraction``. Neither given: all steps.
        generator: the RNG for ``shuffle``.
        shuffle: return the steps in a random order (drawn with ``generator``) instead of ascending.

    Returns:
        The step indices, ascending unless ``shuffle``.

    Raises:
        ValueError: for ``num_steps < 1``, both ``fraction`` and ``window``, ``fraction`` outside ``(0, 1]`` or
            selecting no step, or a window outside ``0 .. N−1``.
    """
    _check_num_steps(num_steps)
    if fraction is not None and window is not None:
        raise ValueError("pass either fraction or window, not both")
    if window is not None:
        start, size = _check_window(num_steps, window)
        steps = list(range(start, start + size))
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        count = int(num_steps * fraction)
        if count < 1:
            raise ValueError(f"fraction {fraction} of {num_steps} steps selects no step (int({num_steps * fraction}))")
        steps = list(range(count))
    else:
        steps = list(range(num_steps))
    if shuffle:
        order = torch.randperm(len(steps), generator=generator).tolist()
        steps = [steps[i] for i in order]
    return steps


def sde_mask(num_steps: int, window: tuple[int, int] | None = None) -> list[bool]:
    """Which steps are stochastic: sample them with the SDE (``noise_level > 0``), the rest with the ODE.

    Args:
        num_steps: number of denoising steps ``N``.
        window: ``(start, size)``: only steps ``start .. start+size−1`` are stochastic. ``None`` (fraction mode,
            plain Flow-GRPO): every step is stochastic.

    Returns:
        A list of ``N`` bools, ``True`` for an SDE step.

    Raises:
        ValueError: for ``num_steps < 1`` or a window outside ``0 .. N−1``.
    """
    _check_num_steps(num_steps)
    if window is None:
        return [True] * num_steps
    start, size = _check_window(num_steps, window)
    return [start <= i < start + size for i in range(num_steps)]


def random_window(
    num_steps: int,
    size: int,
    generator: torch.Generator | None = None,
    *,
    max_start: int | None = None,
) -> tuple[int, int]:
    """A ``(start, size)`` window with ``start`` drawn uniformly (MixGRPO / Flow-GRPO-Fast style).

    Args:
        num_steps: number of denoising steps ``N``.
        size: window size, ``1 ≤ size ≤ N``.
        generator: the RNG (``None``: torch's global RNG).
        max_start: the largest allowed start (default and upper bound ``N − size``), e.g. to keep the window in
            the early, high-noise steps.

    Returns:
        ``(start, size)`` with ``0 ≤ start ≤ max_start``.

    Raises:
        ValueError: for ``num_steps < 1``, ``size`` outside ``1 .. N`` or ``max_start`` outside ``0 .. N − size``.
    """
    _check_num_steps(num_steps)
    if not isinstance(size, int) or not 1 <= size <= num_steps:
        raise ValueError(f"size must be an int in 1..{num_steps}, got {size!r}")
    last = num_steps - size
    if max_start is None:
        max_start = last
    elif not isinstance(max_start, int) or not 0 <= max_start <= last:
        raise ValueError(f"max_start must be an int in 0..{last}, got {max_start!r}")
    start = int(torch.randint(0, max_start + 1, (1,), generator=generator).item())
    return start, size
