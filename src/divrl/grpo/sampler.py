"""Group rollouts with log-prob bookkeeping, and the matching training-path log-prob.

:func:`rollout` samples trajectories for a batch of conditions (``G`` samples each) with the Flow-GRPO SDE sampler
(:func:`~divrl.grpo.sde.sde_step`) and records every latent and per-step log-prob. :func:`transition_log_prob`
recomputes one step's log-prob *with gradients* in the training path, through the same policy call and the same
``sde_step``, so the first update's ratio is exactly 1 on-policy.

The sampler sees the model only through the :class:`~divrl.policy.Policy` seam (``sigmas``, ``initial_noise``,
``velocity``, ``decode``). With ``noise_level=0`` every step is the deterministic Euler step: for FLUX.1 Kontext the
rollout reproduces the diffusers pipeline's output for the same components, prompt, reference, seed and steps
(``tests/test_policy.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from divrl.grpo.sde import SDEStepOutput, sde_step

__all__ = ["Trajectory", "rollout", "rollout_chunks", "transition_log_prob"]


@dataclass
class Trajectory:
    """What a rollout recorded, for ``B`` samples and ``T`` steps.

    Attributes:
        latents: packed latents ``(B, T + 1, tokens, channels)``: the initial noise, then the sample after each step
            (in the policy's dtype, exactly as the next step consumed them).
        log_probs: ``(B, T)`` float32 log-probs of each transition under the sampling policy (the *old policy* of
            GRPO); 0 at deterministic (ODE) steps.
        sigmas: ``(T + 1,)`` float32 noise levels, ending with 0.
        sde: ``(T,)`` bool, which steps were stochastic (only those can be trained).
        noise_level: the SDE noise level ``a`` used at stochastic steps.
        images: decoded images ``(B, 3, H, W)`` in [0, 1], or ``None`` when not decoded.
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    sde: Tensor
    noise_level: float
    images: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def rollout(
    policy,
    condition,
    *,
    num_steps: int,
    noise_level: float,
    sde_steps: Sequence[bool] | Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    micro_batch_size: int | None = None,
    decode: bool = True,
) -> Trajectory:
    """Sample ``condition.batch_size`` trajectories (one per row of the conditioning).

    Args:
        policy: a :class:`~divrl.policy.Policy`.
        condition: the batch's conditioning, e.g. ``policy.encode(samples, H, W, group_size=G)``.
        num_steps: denoising steps (DivRL trains with 6, evaluates with 28).
        noise_level: SDE noise level ``a`` at stochastic steps (DivRL: 0.9); 0 gives the deterministic sampler.
        sde_steps: which steps are stochastic (bool per step); ``None`` = all. ODE steps elsewhere
            (Flow-GRPO-Fast / MixGRPO windows, see :mod:`divrl.grpo.timesteps`).
        generator: seeds the initial noise and the SDE noise (a generator, or one per sample).
        micro_batch_size: run the transformer on at most this many samples at a time (bounds activation memory;
            results do not depend on it beyond floating-point reassociation).
        decode: decode the final latents to images.

    Returns:
        A :class:`Trajectory`.
    """
    sigmas = policy.sigmas(num_steps, condition).to(policy.device)
    sde = _sde_mask(sde_steps, num_steps, policy.device)
    values = sigmas.tolist()  # host copies: no device sync inside the loop
    stochastic = sde.tolist()
    sigma_max = values[1] if num_steps > 1 else None

    x = policy.initial_noise(condition, generator)
    latents = [x]
    log_probs = []
    for step in range(num_steps):
        velocity = _chunked_velocity(policy, x, sigmas[step], condition, micro_batch_size)
        out = sde_step(
            velocity,
            x,
            values[step],
            values[step + 1],
            noise_level if stochastic[step] else 0.0,
            sigma_max=sigma_max,
            generator=generator,
        )
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob)
    images = policy.decode(x, condition) if decode else None
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1).float(),
        sigmas=sigmas.float(),
        sde=sde,
        noise_level=float(noise_level),
        images=images,
    )


@torch.no_grad()
def rollout_chunks(
    policy,
    condition,
    chunk_size: int,
    *,
    on_chunk: Callable[[slice, Tensor], None] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    **kwargs,
) -> Trajectory:
    """:func:`rollout` of ``chunk_size`` rows at a time: each chunk is sampled from its first step to its decoded
    images before the next starts, and ``on_chunk(rows, images)`` gets them at once (pipelined scoring hands them to
    the reward while the next chunk rolls out). The chunks draw from ``generator`` one after the other, so the result
    depends on ``chunk_size`` (a different random stream than one whole-batch rollout) but not on what ``on_chunk``
    does. ``kwargs`` are :func:`rollout`'s (``decode`` must stay on).

    Returns:
        The whole batch's :class:`Trajectory`, the chunks' concatenated.
    """
    if kwargs.get("decode") is False:
        raise ValueError("rollout_chunks decodes every chunk (on_chunk gets its images); call rollout for latents only")
    batch = condition.batch_size
    parts = []
    for start in range(0, batch, chunk_size):
        rows = slice(start, min(start + chunk_size, batch))
        sub = condition if rows == slice(0, batch) else condition.select(rows)
        part = rollout(policy, sub, generator=generator[rows] if isinstance(generator, list) else generator, **kwargs)
        if on_chunk is not None:
            on_chunk(rows, part.images)
        parts.append(part)
    if len(parts) == 1:  # one chunk is the plain rollout, without copies
        return parts[0]
    first = parts[0]
    return Trajectory(
        latents=torch.cat([p.latents for p in parts]),
        log_probs=torch.cat([p.log_probs for p in parts]),
        sigmas=first.sigmas,
        sde=first.sde,
        noise_level=first.noise_level,
        images=torch.cat([p.images for p in parts]),
    )


def transition_log_prob(
    policy, trajectory: Trajectory, step: int, condition, index: Tensor | Sequence[int] | slice | None = None
) -> SDEStepOutput:
    """Log-prob of the recorded transition ``step → step + 1`` under the *current* policy (with gradients).

    Uses the same ``policy.velocity`` call and ``sde_step`` as :func:`rollout` with ``prev_sample`` set to the
    recorded latent, so on-policy the result equals ``trajectory.log_probs[index, step]`` exactly.

    Args:
        policy: the policy (adapter on for the trained policy; inside ``policy.adapter_disabled()`` for the
            reference policy of the KL term).
        trajectory: a rollout's record.
        step: the transition to score; it must be a stochastic step.
        condition: the conditions of the *whole* rollout batch (rows are selected with ``index``).
        index: which samples (a micro-batch); ``None`` = all.

    Returns:
        The :class:`~divrl.grpo.sde.SDEStepOutput` (``log_prob`` ``(b,)``, ``mean``, ``std``) for the selected samples.
    """
    if not bool(trajectory.sde[step]):
        raise ValueError(f"transition_log_prob: step {step} was deterministic (ODE); only SDE steps have a log-prob")
    index = slice(None) if index is None else index
    sub = condition if isinstance(index, slice) and index == slice(None) else condition.select(index)
    rows = trajectory.latents[index]
    sigmas = trajectory.sigmas
    sigma_max = sigmas[1].item() if trajectory.num_steps > 1 else None
    velocity = policy.velocity(rows[:, step], sigmas[step], sub)
    return sde_step(
        velocity,
        rows[:, step],
        sigmas[step].item(),
        sigmas[step + 1].item(),
        trajectory.noise_level,
        sigma_max=sigma_max,
        prev_sample=rows[:, step + 1],
    )


def _chunked_velocity(policy, x: Tensor, sigma: Tensor, condition, micro_batch_size: int | None) -> Tensor:
    batch = x.shape[0]
    if micro_batch_size is None or micro_batch_size >= batch:
        return policy.velocity(x, sigma, condition)
    parts = []
    for start in range(0, batch, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        parts.append(policy.velocity(x[rows], sigma, condition.select(rows)))
    return torch.cat(parts)


def _sde_mask(sde_steps, num_steps: int, device) -> Tensor:
    if sde_steps is None:
        return torch.ones(num_steps, dtype=torch.bool, device=device)
    mask = torch.as_tensor(list(sde_steps) if not isinstance(sde_steps, Tensor) else sde_steps, dtype=torch.bool)
    if mask.shape != (num_steps,):
        raise ValueError(f"sde_steps must have one entry per step ({num_steps}), got {tuple(mask.shape)}")
    return mask.to(device)
