"""``GRPOObjective``: Flow-GRPO (``DESIGN.md`` "The math"), the objective of DivRL.

One batch of conditions:

1. **collect**: ``G`` SDE trajectories per condition, log-probs recorded (the *old policy*); each group scored by the
   stage's reward (a non-finite group is skipped and counted, never rewarded 0); advantages per group, or over the
   rollout batch of every rank (``adv_scope``);
2. **updates**: ``ppo_epochs`` passes; each pass shuffles the samples into ``updates_per_epoch`` parts, and each part
   is one optimizer step accumulated over micro-batches × trained timesteps;
3. **loss**: the PPO-clipped ratio of the recorded transition under the current policy, plus ``kl_beta`` times the
   exact KL to the reference policy (adapter off; ``kl_beta = 0`` skips the reference forward).

Samples of skipped groups stay in the batch with advantage 0 (they contribute no policy gradient), so every rank runs
the same backward calls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from divrl.grpo import (
    group_advantages,
    grpo_loss,
    kl_divergence,
    pooled_advantages,
    sde_mask,
    select_train_steps,
    transition_log_prob,
)
from divrl.objectives.base import (
    Batch,
    Environment,
    Objective,
    SamplingConfig,
    positive,
    rollout_and_score,
    shuffled_updates,
)
from divrl.objectives.flow import _check_finite

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.grpo.sampler import Trajectory
    from divrl.policy.base import Policy

__all__ = ["GRPOObjective", "GRPOBatch", "GRPOConfig"]


@dataclass
class GRPOBatch(Batch):
    """A scored rollout batch, ready for GRPO updates.

    Attributes:
        trajectory: the rollouts (latents and old log-probs of every step).
        advantages: ``(n·G,)`` float32 advantages, 0 for the samples of skipped groups.
        train_steps: the denoising steps trained.
    """

    trajectory: Trajectory | None = None
    advantages: Tensor | None = None
    train_steps: Sequence[int] = ()


@dataclass
class GRPOObjective(Objective):
    """Flow-GRPO: PPO-clipped updates on SDE rollouts with group-standardised advantages.

    Defaults are the published DivRL run (``docs/reference.md``, "The published run"); ``docs/configuration.md`` maps
    each name to trl's and flow_grpo's.

    Attributes:
        clip_range: PPO clip ``ε`` on the ratio (Flow-GRPO for FLUX: 1e-4).
        adv_clip: advantages are clipped to ``±adv_clip`` (paper: 5).
        adv_scope: ``"group"`` standardises rewards within each condition's ``G`` samples (the GRPO definition and
            our default); ``"batch"`` over the whole rollout batch of all ranks (the official code's choice).
        kl_beta: weight ``β`` of the KL to the reference policy (the adapter switched off; with full fine-tuning, a
            frozen copy of the initial transformer). divrl's KL is the exact KL of the two Gaussian steps, so for the
            same number this term is ``1/(−Δσ)`` times flow_grpo's (4.7–10.4× on the 6-step 512² schedule,
            ``docs/configuration.md``). The official code uses 0 (the paper text says 0.1); 0 skips the reference
            forward entirely.
        ppo_epochs: passes over each rollout batch (paper: 1).
        updates_per_epoch: optimizer steps per pass: the rollout batch is shuffled and split into this many parts,
            each part one accumulated update (the official run: 2 per epoch). ``global_step`` counts these updates.
        micro_batch_size: samples per forward/backward in the update; gradients are accumulated over micro-batches and
            trained timesteps (paper: 3).
        timestep_fraction: train the first ``int(num_steps · fraction)`` steps (paper: 0.99 → steps 0..4 of 6).
            Exclusive with ``sde_window``.
        sde_window: ``[start, size]``: only these steps are stochastic and trained, the others use the ODE
            (Flow-GRPO-Fast / MixGRPO style); ``None``: every step is stochastic.
    """

    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_scope: str = "group"
    kl_beta: float = 0.0
    ppo_epochs: int = 1
    updates_per_epoch: int = 1
    micro_batch_size: int = 3
    timestep_fraction: float | None = 0.99
    sde_window: tuple[int, int] | None = None

    max_stats: ClassVar[frozenset[str]] = frozenset({"ratio_max_dev"})

    def __post_init__(self) -> None:
        positive(self, "objective", "ppo_epochs", "updates_per_epoch", "micro_batch_size")
        if not self.clip_range > 0:
            raise ValueError(f"objective.clip_range must be > 0, got {self.clip_range}")
        if self.kl_beta < 0:
            raise ValueError(f"objective.kl_beta must be >= 0, got {self.kl_beta}")
        _check_finite(self, "kl_beta")  # NaN: non-finite losses minutes later
        _check_finite(self, "clip_range", "adv_clip", infinite=True)  # inf (adv_clip: null too): no clipping
        if self.adv_clip is not None and not self.adv_clip > 0:  # else refused at the first rollout
            raise ValueError(
                f"objective.adv_clip must be > 0 (paper: 5; null or .inf: no clipping), got {self.adv_clip}"
            )
        if self.adv_scope not in ("group", "batch"):
            raise ValueError(f"objective.adv_scope must be 'group' or 'batch', got {self.adv_scope!r}")
        if self.timestep_fraction is not None and not 0 < self.timestep_fraction <= 1:
            raise ValueError(
                f"objective.timestep_fraction must lie in (0, 1] (paper: 0.99), got {self.timestep_fraction}"
            )
        if self.sde_window is not None:
            self.sde_window = tuple(self.sde_window)
            if self.timestep_fraction is not None:
                raise ValueError("objective: set either timestep_fraction or sde_window (and timestep_fraction: null)")

    @property
    def needs_reference(self) -> bool:
        return self.kl_beta > 0

    def check(self, sampling: SamplingConfig) -> None:
        if not sampling.noise_level > 0:
            raise ValueError(
                f"sampling.noise_level must be > 0 to train with GRPO (got {sampling.noise_level}); 0 is "
                f"the deterministic sampler, whose steps have no log-probability"
            )
        if sampling.group_size < 2 and self.adv_scope == "group":
            raise ValueError(
                f"sampling.group_size {sampling.group_size} with objective.adv_scope 'group': a group of "
                f"one sample has advantage 0 and GRPO would train nothing; use group_size >= 2 (DivRL: 21), "
                f"or adv_scope 'batch'"
            )
        try:
            select_train_steps(sampling.num_steps, fraction=self.timestep_fraction, window=self.sde_window)
        except ValueError as err:
            raise ValueError(
                f"objective.{'sde_window' if self.sde_window is not None else 'timestep_fraction'} with "
                f"sampling.num_steps {sampling.num_steps}: {err}"
            ) from None

    # ------------------------------------------------------------------------------------------------ the seam

    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> GRPOBatch:
        sampling = env.sampling
        sde = sde_mask(sampling.num_steps, self.sde_window)
        condition, trajectory, scores = rollout_and_score(env, samples, sampling.group_size, generator, sde_steps=sde)
        train_steps = select_train_steps(sampling.num_steps, fraction=self.timestep_fraction, window=self.sde_window)
        return GRPOBatch(
            samples,
            sampling.group_size,
            scores,
            trajectory.images,
            condition,
            rollout_calls=sampling.num_steps,
            # forward + activation backward (~2x forward; frozen weights get no gradient), plus the reference forward
            update_calls=len(train_steps) * self.ppo_epochs * (2 + (self.kl_beta > 0)),
            trajectory=trajectory,
            advantages=self.advantages(scores.rewards, scores.keep, env).flatten(),
            train_steps=train_steps,
        )

    def advantages(self, rewards: Tensor, keep: Tensor, env: Environment) -> Tensor:
        """``(n, G)`` advantages of the kept groups' rewards, 0 for the skipped groups. Batch scope: statistics over
        the kept groups of every rank (skipped groups travel as NaN)."""
        if self.adv_scope == "group":
            adv = torch.zeros_like(rewards)
            if keep.any():
                adv[keep] = group_advantages(rewards[keep], "group", clip=self.adv_clip)
            return adv
        masked = torch.where(keep[:, None], rewards, torch.full_like(rewards, float("nan")))
        pool = env.all_gather(masked)
        adv = pooled_advantages(rewards, pool[~torch.isnan(pool)], clip=self.adv_clip)
        return adv * keep[:, None]

    def updates(self, batch: GRPOBatch, generator: torch.Generator) -> Iterator[list[tuple[Tensor, int]]]:
        """``ppo_epochs`` shuffles of the samples, each cut into ``updates_per_epoch`` parts; an update's items are
        its (micro-batch, trained step) pairs."""
        yield from shuffled_updates(
            batch.advantages.numel(),
            self.ppo_epochs,
            self.updates_per_epoch,
            self.micro_batch_size,
            batch.train_steps,
            generator,
            batch.advantages.device,
        )

    def loss(self, policy: Policy, batch: GRPOBatch, item: tuple[Tensor, int]) -> tuple[Tensor, dict[str, Tensor]]:
        index, step = item
        trajectory, condition = batch.trajectory, batch.condition
        out = transition_log_prob(policy, trajectory, step, condition, index)
        loss, stats = grpo_loss(
            out.log_prob, trajectory.log_probs[index, step], batch.advantages[index], self.clip_range
        )
        stats = {"policy_loss": loss.detach(), **stats}
        if self.kl_beta > 0:
            with torch.no_grad(), policy.reference_policy():
                ref = transition_log_prob(policy, trajectory, step, condition, index)
            kl = kl_divergence(out.mean, ref.mean, out.std).mean()
            loss = loss + self.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats


GRPOConfig = GRPOObjective
"""The former name of Flow-GRPO's settings: the objective is its settings (``model.objective`` in YAML)."""
