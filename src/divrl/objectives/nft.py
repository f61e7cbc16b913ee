"""``NFTObjective``: DiffusionNFT (arXiv 2509.16117), online RL on the forward process.

One batch of conditions:

1. **collect**: ``G`` rollouts per condition with any sampler (``noise_level: 0``, the deterministic one, by default:
   no log-probability is needed), scored by the stage's reward; group advantages become optimality probabilities
   ``r = clip(A, ±c)/(2c) + 1/2``; each clean sample ``x₀`` is noised at ``timesteps_per_sample`` levels ``σ`` and the
   **old policy's** velocity there is recorded under no-grad (the policy as it rolled out);
2. **updates**: ``epochs`` shuffles of the samples, each cut into ``updates_per_epoch`` optimizer steps;
3. **loss**: :func:`~divrl.objectives.flow.nft_loss`: the implicit positive policy ``β·v_θ + (1 − β)·v_old`` fits the
   sample's flow with weight ``r``, the implicit negative policy ``(1 + β)·v_old − β·v_θ`` with ``1 − r``.

Samples of skipped groups get ``r = 1/2``: the loss then pulls ``v_θ`` to ``v_old`` (no policy change), and every
rank runs the same backward calls. DiffusionNFT samples with an EMA of the policy (soft update of the old policy);
divrl's old policy is the policy at rollout time (``docs/reference.md``, "Preference objectives").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from divrl.grpo import group_advantages
from divrl.objectives.base import Environment, Objective, positive, rollout_and_score, shuffled_updates
from divrl.objectives.flow import (
    FlowBatch,
    TimestepSampling,
    _check_beta,
    _check_finite,
    as_timesteps,
    draw,
    flow_error,
    nft_loss,
    noised,
    optimality,
)

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.policy.base import Policy

__all__ = ["NFTObjective", "NFTBatch"]


@dataclass
class NFTBatch(FlowBatch):
    """Scored clean samples (the rollouts' ends in ``x0``) with their noise draws and the old policy's velocities.

    Attributes:
        r: ``(N,)`` float32 optimality probabilities (1/2 for skipped groups).
        old_velocity: ``(N, K, ...)`` the old policy's velocities at the noised samples.
    """

    r: Tensor | None = None
    old_velocity: Tensor | None = None


@dataclass
class NFTObjective(Objective):
    """DiffusionNFT: negative-aware fine-tuning on the forward process.

    Attributes:
        beta: ``β``, how far the implicit policies reach from the old one (DiffusionNFT / Flow-Factory: 1).
        adv_clip: advantages (group-standardised rewards) are clipped to ``±adv_clip`` before becoming ``r``.
        adaptive_weight: divide each side's loss by its detached mean absolute ``x₀`` error (DiffusionNFT's
            adaptive weighting).
        noise_level: SDE noise level of the rollouts (0: the deterministic sampler).
        timesteps: how the training noise levels are drawn (default uniform).
        timesteps_per_sample: noise levels per sample per batch (each a work item of its micro-batch).
        micro_batch_size: samples per forward/backward.
        epochs: passes over the batch.
        updates_per_epoch: optimizer steps per pass.
    """

    beta: float = 1.0
    adv_clip: float = 5.0
    adaptive_weight: bool = True
    noise_level: float = 0.0
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    timesteps_per_sample: int = 1
    micro_batch_size: int = 4
    epochs: int = 1
    updates_per_epoch: int = 1

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        positive(self, "objective", "timesteps_per_sample", "micro_batch_size", "epochs", "updates_per_epoch")
        self.timesteps = as_timesteps(self.timesteps, "uniform")
        if not self.adv_clip > 0 or not self.noise_level >= 0:
            raise ValueError(
                f"objective: adv_clip must be > 0 and noise_level >= 0, got {self.adv_clip}, {self.noise_level}"
            )
        _check_finite(self, "adv_clip", "noise_level")  # adv_clip inf: every r is 1/2 and nothing trains

    def check(self, sampling) -> None:
        if sampling.group_size < 2:
            raise ValueError(
                f"sampling.group_size {sampling.group_size}: DiffusionNFT's advantages need groups of >= 2"
            )

    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> NFTBatch:
        g, k = env.sampling.group_size, self.timesteps_per_sample
        condition, trajectory, scores = rollout_and_score(env, samples, g, generator, noise_level=self.noise_level)
        adv = torch.zeros_like(scores.rewards)
        if scores.keep.any():
            adv[scores.keep] = group_advantages(scores.rewards[scores.keep], "group", clip=self.adv_clip)
        x0 = trajectory.latents[:, -1]
        noise, sigmas = draw(self.timesteps, len(x0), k, x0, generator, policy=policy, condition=condition)
        old = torch.empty_like(noise)
        with torch.no_grad():
            for j in range(k):
                for index in torch.arange(len(x0), device=x0.device).split(self.micro_batch_size):
                    s = sigmas[index, j]
                    old[index, j] = policy.velocity(noised(x0[index], noise[index, j], s), s, condition.select(index))
        # rollout_calls: the sampler's (the old-velocity pass, k calls per sample, runs outside the timed phases)
        return NFTBatch(
            samples,
            g,
            scores,
            trajectory.images,
            condition,
            rollout_calls=env.sampling.num_steps,
            update_calls=2 * k * self.epochs,
            x0=x0,
            r=optimality(adv, self.adv_clip).flatten(),
            noise=noise,
            sigmas=sigmas,
            old_velocity=old,
        )

    def updates(self, batch: NFTBatch, generator: torch.Generator) -> Iterator[list[tuple[Tensor, int]]]:
        yield from shuffled_updates(
            len(batch.x0),
            self.epochs,
            self.updates_per_epoch,
            self.micro_batch_size,
            range(self.timesteps_per_sample),
            generator,
            batch.x0.device,
        )

    def loss(self, policy: Policy, batch: NFTBatch, item: tuple[Tensor, int]) -> tuple[Tensor, dict[str, Tensor]]:
        index, k = item
        velocity, x0, noise, sigma = batch.predict(policy, item)
        old = batch.old_velocity[index, k]
        losses = nft_loss(velocity, old, x0, noise, sigma, batch.r[index], self.beta, self.adaptive_weight)
        drift = (velocity.detach().float() - old.float()).pow(2).flatten(1).mean(1)
        return losses.mean(), {
            "nft_loss": losses.detach().mean(),
            "fm_loss": flow_error(velocity.detach(), x0, noise).mean(),
            "old_drift": drift.mean(),
        }
