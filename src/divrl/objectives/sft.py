"""``SFTObjective``: supervised flow matching on (references, prompt, target image) triples, with IdGlow's linear-decay
timestep schedule.

One batch of conditions:

1. **collect**: each condition's target image (``target_<p>.png`` in the shards) is encoded to clean latents ``x₀``;
   for each, ``timesteps_per_sample`` noise levels ``σ`` (:class:`~divrl.objectives.flow.TimestepSampling`) and noises
   ``ε`` are drawn (seeded per batch: a resumed run draws the same);
2. **updates**: ``epochs`` shuffles, each cut into ``updates_per_epoch`` optimizer steps of micro-batches × draws;
3. **loss**: ``w·mean ‖v_θ(x_σ, σ) − (ε − x₀)‖²``.

IdGlow's *temporal gating* is a policy option (``policy.reference_window``): outside the window the network is called
without the reference tokens, here and when sampling. Its *linear-decay schedule* is not public; divrl offers two
readings (``decay``): the upper end of the sampled ``σ`` range, or the loss weight of high ``σ``, decays linearly over
``decay_steps`` updates to ``decay_to`` (the high-noise steps decide composition: relaxing the reconstruction there
"progressively relaxes the constraint for natural group composition", ``docs/reference.md``).

A condition without a target is kept with weight 0 (the same work on every rank) and counted in ``train/targets``
(the fraction that had one).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from divrl.objectives.base import Environment, Objective, positive, shuffled_updates
from divrl.objectives.flow import FlowBatch, TimestepSampling, as_timesteps, draw, flow_error, noised

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.policy.base import Conditioning, Policy

__all__ = ["SFTObjective", "SFTBatch", "target_latents", "flow_matching_loss"]

NO_TARGET = (
    "no condition with a target image (target_<p>.png): write the shards with `divrl data dreambooth|syncd|"
    "synthetic --targets`"
)


@dataclass
class SFTBatch(FlowBatch):
    """Targets with their noise draws, ready for SFT updates (a condition without a target holds its first
    reference's latents in ``x0``).

    Attributes:
        weights: ``(n, K)`` float32 loss weights (0 for a condition without target; the decay schedule's weight).
    """

    weights: Tensor | None = None


def target_latents(
    policy: Policy, samples: Sequence[ConditionSample], size: int, fallback_reference: bool = True
) -> tuple[Tensor, Tensor]:
    """Clean latents ``(n, ...)`` of the samples' targets at ``size``, and a bool ``(n,)`` of which samples had one
    (the others get their first reference's latents, to be weighted 0)."""
    has = torch.tensor([s.target is not None for s in samples])
    images = [s.target if s.target is not None else s.references[0] for s in samples]
    keys = [f"target/{s.id}/{s.prompt_index}" if s.target is not None else f"reference/{s.id}" for s in samples]
    return policy.encode_images(images, size, size, keys), has


def flow_matching_loss(
    policy: Policy,
    cond: Conditioning,
    x0: Tensor,
    sigmas: Tensor,
    generator: torch.Generator,
    micro_batch_size: int = 8,
) -> Tensor:
    """The mean flow-matching error of ``x0`` under ``cond`` at each of ``sigmas`` (one noise per row and level drawn
    from ``generator``), without gradients: the held-out loss SFT lowers. Returns ``(len(sigmas),)``."""
    out = []
    with torch.no_grad():
        for sigma in sigmas.tolist():
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            errors = [
                flow_error(
                    policy.velocity(noised(x0[i], noise[i], torch.full((len(i),), sigma)), sigma, cond.select(i)),
                    x0[i],
                    noise[i],
                )
                for i in torch.arange(len(x0)).split(micro_batch_size)
            ]
            out.append(torch.cat(errors).mean())
    return torch.stack(out)


@dataclass
class SFTObjective(Objective):
    """Flow-matching supervised fine-tuning on target images (IdGlow's stage 1; PSR's warm-up before RL).

    Attributes:
        timesteps: how the training noise levels are drawn (default logit-normal(0, 1), as FLUX / SD3 training).
        timesteps_per_sample: noise draws per target per batch (each one work item of its micro-batch).
        micro_batch_size: targets per forward/backward.
        epochs: passes over each batch of targets.
        updates_per_epoch: optimizer steps per pass (the batch is shuffled and split into this many parts).
        decay: IdGlow's linear-decay schedule (a documented interpretation, the module docstring): ``none``;
            ``range``: the largest sampled ``σ`` falls linearly from ``timesteps.high`` to ``decay_to`` over
            ``decay_steps``; ``weight``: the loss weight ``1 − p·(1 − decay_to)·σ`` at training progress
            ``p = min(step / decay_steps, 1)`` (high-noise steps end weighted ``decay_to``).
        decay_steps: optimizer updates over which the schedule decays, counted from the run's start (``global_step``;
            then it stays at its end).
        decay_to: where the decay ends (``range``: the top ``σ``; ``weight``: the weight at ``σ = 1``).
    """

    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    timesteps_per_sample: int = 1
    micro_batch_size: int = 4
    epochs: int = 1
    updates_per_epoch: int = 1
    decay: Literal["none", "range", "weight"] = "none"
    decay_steps: int = 1000
    decay_to: float = 0.6

    def __post_init__(self) -> None:
        positive(
            self, "objective", "timesteps_per_sample", "micro_batch_size", "epochs", "updates_per_epoch", "decay_steps"
        )
        self.timesteps = as_timesteps(self.timesteps, "logit_normal")
        if self.decay not in ("none", "range", "weight"):
            raise ValueError(f"objective.decay must be none, range or weight, got {self.decay!r}")
        if not 0.0 < self.decay_to <= 1.0:
            raise ValueError(f"objective.decay_to must be in (0, 1], got {self.decay_to}")
        if self.decay == "range" and not self.timesteps.low < self.decay_to:
            raise ValueError(
                f"objective.decay_to {self.decay_to} must lie above timesteps.low {self.timesteps.low}: "
                f"decay 'range' lowers the top of the sampled range to it"
            )

    def progress(self, step: int) -> float:
        """Training progress ``p ∈ [0, 1]`` of the decay schedule at optimizer step ``step``."""
        return 0.0 if self.decay == "none" else min(step / self.decay_steps, 1.0)

    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> SFTBatch:
        size, k = env.sampling.resolution, self.timesteps_per_sample
        condition = policy.encode(samples, size, size, group_size=1)
        x0, has = target_latents(policy, samples, size)
        if not has.all():  # once per run (a constant message); train/targets logs the fraction with one
            warnings.warn(
                "SFT: some conditions have no target image (target_<p>.png) and are weighted 0; "
                "train/targets logs the fraction that have one",
                stacklevel=2,
            )
        p = self.progress(env.step)
        high = self.timesteps.high - p * (self.timesteps.high - self.decay_to) if self.decay == "range" else None
        noise, sigmas = draw(
            self.timesteps, len(samples), k, x0, generator, policy=policy, condition=condition, high=high
        )
        weights = has.to(sigmas.device)[:, None].float().expand(-1, k).clone()
        if self.decay == "weight":
            weights *= 1 - p * (1 - self.decay_to) * sigmas
        return SFTBatch(
            samples,
            1,
            None,
            None,
            condition,
            rollout_calls=0,
            update_calls=2 * k * self.epochs,
            usable=int(has.sum()),
            missing=NO_TARGET,
            x0=x0,
            noise=noise,
            sigmas=sigmas,
            weights=weights,
        )

    def updates(self, batch: SFTBatch, generator: torch.Generator) -> Iterator[list[tuple[Tensor, int]]]:
        yield from shuffled_updates(
            len(batch.x0),
            self.epochs,
            self.updates_per_epoch,
            self.micro_batch_size,
            range(self.timesteps_per_sample),
            generator,
            batch.x0.device,
        )

    def loss(self, policy: Policy, batch: SFTBatch, item: tuple[Tensor, int]) -> tuple[Tensor, dict[str, Tensor]]:
        velocity, x0, noise, sigma = batch.predict(policy, item)
        error = flow_error(velocity, x0, noise)
        weights = batch.weights[item[0], item[1]]
        loss = (weights * error).mean()
        return loss, {"fm_loss": error.detach().mean(), "sigma": sigma.mean(), "targets": (weights > 0).float().mean()}
