"""Diffusion-DPO for flow matching: pairwise (``DPOObjective``) and group-level (``GroupDPOObjective``, DGPO-style),
with a reward-gap margin per reward component. Formulas: :mod:`divrl.objectives.flow`; sources:
``docs/reference.md``, "Preference objectives".

Both compare clean images through the forward process: winner and loser (or a whole group) are noised with the **same**
``ε`` and ``σ``, their flow-matching errors ``e_θ`` are compared with the reference policy's ``e_ref`` (the adapter
switched off; with full fine-tuning a frozen copy of the initial network), and ``β`` scales the implicit reward.

Where the images come from:

- **online** (the default): ``G`` rollouts per condition, scored by the stage's reward. Any sampler works, since no
  log-probability is needed: ``noise_level: 0`` (the default) rolls out with the deterministic sampler; the final
  latents are the clean ``x₀``;
- **shards** (``DPOObjective`` with ``pairs: shards``): human preference pairs, ``target_<p>.png`` (chosen) and
  ``rejected_<p>.png`` (rejected) per prompt; no rollout, no reward.

Every rank does the same work whatever its data: each group yields exactly ``pairs_per_group`` pairs, those below the
gap (or of a skipped group, or a condition without a shard pair) weighted 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from divrl.grpo import group_advantages
from divrl.objectives.base import Batch, Environment, Objective, positive, rollout_and_score, shuffled_updates
from divrl.objectives.flow import (
    TimestepSampling,
    _check_beta,
    _check_finite,
    as_timesteps,
    dpo_loss,
    draw,
    flow_error,
    group_dpo_loss,
    group_weights,
    noised,
)
from divrl.objectives.sft import target_latents

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.objectives.base import Scores
    from divrl.policy.base import Policy

__all__ = ["DPOObjective", "GroupDPOObjective", "PreferenceBatch", "component_values"]


@dataclass
class PreferenceBatch(Batch):
    """Clean latents with what the DPO losses compare.

    Attributes:
        x0: ``(N, ...)`` clean latents (rollout ends, or shard targets then rejected images).
        pairs: ``(P, 2)`` rows of ``x0`` (winner, loser), or ``(n, G)`` a group's rows for group DPO.
        cond_rows: ``(P, 2)`` / ``(n, G)`` the conditioning rows of the same images.
        weights: ``(P,)`` / ``(n,)`` float32 weight of each pair or group (0: trains nothing).
        margins: ``(P,)`` / ``(n,)`` float32 margins ``m``.
        advantages: ``(n, G)`` group DPO's advantages (``None`` for pairs).
        noise: ``(P or n, K, ...)`` the noise shared by a pair's (a group's) images, per draw.
        sigmas: ``(P or n, K)`` their shared noise levels.
    """

    x0: Tensor | None = None
    pairs: Tensor | None = None
    cond_rows: Tensor | None = None
    weights: Tensor | None = None
    margins: Tensor | None = None
    advantages: Tensor | None = None
    noise: Tensor | None = None
    sigmas: Tensor | None = None


def component_values(scores: Scores, group_size: int, names: Sequence[str]) -> Tensor:
    """``(n, G, len(names))`` float32: each named reward component of every sample (``reward``: the reward itself);
    0 for the rows of skipped groups. Raises naming the components there are when a name is unknown."""
    rows = []
    for out in scores.outputs:
        if out is None or not names:
            rows.append(torch.zeros(group_size, len(names)))
            continue
        values = {"reward": out.reward, **out.components}
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(
                f"objective.margin names {missing}, which the reward does not return; its components: {sorted(values)}"
            )
        rows.append(torch.stack([values[n].detach().float().cpu() for n in names], dim=-1))
    return torch.stack(rows).to(scores.rewards.device)


@dataclass
class _Preference(Objective):
    """What pairwise and group DPO share: β, the margin, the rollout, the timestep draws, the loss's forward passes."""

    beta: float = 100.0
    margin: dict[str, float] = field(default_factory=dict)
    rpo_alpha: float = 0.0
    noise_level: float = 0.0
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    timesteps_per_sample: int = 1
    epochs: int = 1
    updates_per_epoch: int = 1

    def __post_init__(self) -> None:
        _check_beta(self.beta)
        positive(self, "objective", "timesteps_per_sample", "epochs", "updates_per_epoch")
        if not self.rpo_alpha >= 0:
            raise ValueError(f"objective.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        self.timesteps = as_timesteps(self.timesteps, "uniform")
        if not self.noise_level >= 0:
            raise ValueError(f"objective.noise_level must be >= 0 (0: deterministic rollouts), got {self.noise_level}")
        _check_finite(self, "rpo_alpha", "noise_level")
        if not isinstance(self.margin, dict):
            raise ValueError(
                f"objective.margin must map reward components to weights, e.g. {{vsm: 2.0}}, got {self.margin!r}"
            )
        bad = {
            name: gamma
            for name, gamma in self.margin.items()
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma)
        }
        if bad:
            raise ValueError(
                f"objective.margin {self.margin} gives {sorted(bad)} a weight that is not a finite "
                f"number: give each component a finite weight, or margin: {{}} for none"
            )

    @property
    def needs_reference(self) -> bool:
        return True

    def _rollout(self, samples, env: Environment, generator):
        condition, trajectory, scores = rollout_and_score(
            env, samples, env.sampling.group_size, generator, noise_level=self.noise_level
        )
        return condition, trajectory.latents[:, -1], trajectory.images, scores

    def _draws(
        self, count: int, like: Tensor, generator: torch.Generator, policy: Policy, condition
    ) -> tuple[Tensor, Tensor]:
        """One ``(ε, σ)`` per pair (group) and draw, shared by its images."""
        return draw(
            self.timesteps, count, self.timesteps_per_sample, like, generator, policy=policy, condition=condition
        )

    def _errors(
        self, policy: Policy, batch: PreferenceBatch, rows: Tensor, cond_rows: Tensor, noise: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Flow-matching errors of ``x0[rows]`` (shape of ``rows``) under the policy (with gradients) and the
        reference policy, each row noised with its ``noise`` / ``sigma`` (broadcast over the row's last dim)."""
        flat, width = rows.flatten(), rows.shape[-1]
        eps = noise.repeat_interleave(width, dim=0)
        s = sigma.repeat_interleave(width)
        x0 = batch.x0[flat]
        latents, cond = noised(x0, eps, s), batch.condition.select(cond_rows.flatten())
        err = flow_error(policy.velocity(latents, s, cond), x0, eps).view(rows.shape)
        with torch.no_grad(), policy.reference_policy():
            ref = flow_error(policy.velocity(latents, s, cond), x0, eps).view(rows.shape)
        return err, ref

    def _margins(self, values: Tensor, winner: Tensor, loser: Tensor) -> Tensor:
        """``Σ_c γ_c·(winner_c − loser_c)`` over the named components (``values`` last dim), ``(…,)`` float32."""
        gamma = torch.tensor(list(self.margin.values()), dtype=torch.float32, device=values.device)
        return (
            ((winner - loser) * gamma).sum(-1) if len(gamma) else torch.zeros(winner.shape[:-1], device=values.device)
        )


@dataclass
class DPOObjective(_Preference):
    """Pairwise Diffusion-DPO for flow matching.

    Attributes:
        beta: ``β``, the implicit reward's scale (flow_grpo: 100; Flow-Factory 2000; the SDXL original 5000).
        pairs: ``online``: pairs from each scored group of ``G`` rollouts; ``shards``: the shards' preference pairs
            (``target_<p>.png`` chosen, ``rejected_<p>.png`` rejected), no rollout.
        pairs_per_group: online pairs per group, the largest reward gaps first: 1 is best vs worst (Flow-Factory);
            ``G·(G − 1)/2`` is every pair.
        min_gap: pairs whose reward gap is not above this are weighted 0.
        margin: ODPO-style margin, weight per reward component (``reward`` is the reward itself), e.g.
            ``{vsm: 2.0, nssm: 1.0}``: ``m = Σ_c γ_c·(r_c(w) − r_c(l))``, subtracted inside the sigmoid, so a pair
            with a larger gap must be preferred by more. Empty: plain DPO.
        rpo_alpha: ``λ`` of an added flow-matching loss on the winners, ``λ·e_θ(w)`` (RPO; trl's name): DPO alone can raise
            the margin by making both images unlikely, the loser more so, and drift off the data; this keeps the
            preferred image likely. 0: plain DPO.
        noise_level: SDE noise level of the online rollouts (0: the deterministic sampler).
        timesteps: how the shared ``σ`` of each pair is drawn (default uniform, as Diffusion-DPO).
        timesteps_per_sample: ``(σ, ε)`` draws per pair per batch.
        micro_batch_size: pairs per forward/backward (two images each, plus the reference's forward).
        epochs: passes over the batch's pairs.
        updates_per_epoch: optimizer steps per pass.
    """

    pairs: Literal["online", "shards"] = "online"
    pairs_per_group: int = 1
    min_gap: float = 0.0
    micro_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "objective", "pairs_per_group", "micro_batch_size")
        _check_finite(self, "min_gap")  # NaN: no gap is above it and nothing trains
        if self.pairs not in ("online", "shards"):
            raise ValueError(f"objective.pairs must be online or shards, got {self.pairs!r}")
        if self.pairs == "shards" and self.margin:
            raise ValueError(
                f"objective.margin {self.margin} needs rewards, and pairs: shards has none (its pairs are "
                f"the shards' images): set margin: {{}} (a margin may be carried over from the config's "
                f"previous objective entry), or use pairs: online"
            )

    def check(self, sampling) -> None:
        g = sampling.group_size
        if self.pairs == "online" and g < 2:
            raise ValueError(
                f"sampling.group_size {g}: DPO with pairs: online needs groups of at least 2 to make a "
                f"pair; raise sampling.group_size"
            )
        if self.pairs == "online" and self.pairs_per_group > g * (g - 1) // 2:
            raise ValueError(
                f"objective.pairs_per_group {self.pairs_per_group} with sampling.group_size {g}: a group "
                f"has {g * (g - 1) // 2} pairs; set objective.pairs_per_group <= {g * (g - 1) // 2}, "
                f"or raise sampling.group_size"
            )

    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> PreferenceBatch:
        if self.pairs == "shards":
            return self._shard_pairs(policy, samples, env, generator)
        g = env.sampling.group_size
        condition, x0, images, scores = self._rollout(samples, env, generator)
        values = component_values(scores, g, list(self.margin))
        pairs, weights, margins = [], [], []
        for i in range(len(samples)):
            ranked = self._ranked_pairs(scores.rewards[i]) if scores.keep[i] else []
            for a, b in (ranked + [(0, 0)] * self.pairs_per_group)[: self.pairs_per_group]:
                gap = float(scores.rewards[i, a] - scores.rewards[i, b]) if scores.keep[i] else 0.0
                pairs.append((i * g + a, i * g + b))
                weights.append(float(gap > self.min_gap and a != b))
                margins.append(self._margins(values, values[i, a], values[i, b]))
        pairs_t = torch.tensor(pairs, device=x0.device)
        noise, sigmas = self._draws(len(pairs), x0, generator, policy, condition)
        return PreferenceBatch(
            samples,
            g,
            scores,
            images,
            condition,
            rollout_calls=env.sampling.num_steps,
            update_calls=self._update_calls(len(pairs), len(samples) * g),
            usable=sum(w > 0 for w in weights),
            missing=f"no pair whose reward gap is above objective.min_gap {self.min_gap:g} (lower it, "
            f"or raise sampling.group_size or objective.noise_level for more varied "
            f"groups)",
            x0=x0,
            pairs=pairs_t,
            cond_rows=pairs_t,
            weights=torch.tensor(weights, device=x0.device),
            margins=torch.stack(margins).to(x0.device),
            noise=noise,
            sigmas=sigmas,
        )

    def _ranked_pairs(self, rewards: Tensor) -> list[tuple[int, int]]:
        """Every (better, worse) pair of a group, the largest reward gap first (ties: lower indices first)."""
        g = len(rewards)
        pairs = [(a, b) if rewards[a] >= rewards[b] else (b, a) for a in range(g) for b in range(a + 1, g)]
        return sorted(pairs, key=lambda p: -float(rewards[p[0]] - rewards[p[1]]))

    def _shard_pairs(self, policy: Policy, samples, env: Environment, generator) -> PreferenceBatch:
        size, n = env.sampling.resolution, len(samples)
        condition = policy.encode(samples, size, size, group_size=1)
        chosen, has = target_latents(policy, samples, size)
        paired = has & torch.tensor([s.rejected is not None for s in samples])
        images = [s.rejected if s.rejected is not None else s.references[0] for s in samples]
        keys = [f"rejected/{s.id}/{s.prompt_index}" if s.rejected is not None else f"reference/{s.id}" for s in samples]
        x0 = torch.cat([chosen, policy.encode_images(images, size, size, keys)])
        rows = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], dim=1).to(x0.device)
        noise, sigmas = self._draws(n, x0, generator, policy, condition)
        return PreferenceBatch(
            samples,
            1,
            None,
            None,
            condition,
            update_calls=self._update_calls(n, n),
            usable=int(paired.sum()),
            missing="no condition with a preference pair (target_<p>.png and rejected_<p>.png)",
            x0=x0,
            pairs=rows,
            cond_rows=rows % n,
            weights=paired.float().to(x0.device),
            margins=torch.zeros(n, device=x0.device),
            noise=noise,
            sigmas=sigmas,
        )

    def _update_calls(self, pairs: int, images: int) -> int:
        """Forward-pass equivalents per image: two images per pair, forward + backward + the reference's forward."""
        return round(2 * pairs * 3 * self.timesteps_per_sample * self.epochs / images)

    def updates(self, batch: PreferenceBatch, generator: torch.Generator) -> Iterator[list[tuple[Tensor, int]]]:
        yield from shuffled_updates(
            len(batch.pairs),
            self.epochs,
            self.updates_per_epoch,
            self.micro_batch_size,
            range(self.timesteps_per_sample),
            generator,
            batch.pairs.device,
        )

    def loss(
        self, policy: Policy, batch: PreferenceBatch, item: tuple[Tensor, int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        index, k = item
        err, ref = self._errors(
            policy, batch, batch.pairs[index], batch.cond_rows[index], batch.noise[index, k], batch.sigmas[index, k]
        )
        losses, z = dpo_loss(err[:, 0], ref[:, 0], err[:, 1], ref[:, 1], self.beta, batch.margins[index])
        weights = batch.weights[index]
        used = weights.sum().clamp(min=1)
        return (weights * (losses + self.rpo_alpha * err[:, 0])).mean(), {
            "dpo_loss": (weights * losses).sum() / used,
            "implicit_acc": (weights * (z > 0)).sum() / used,
            "implicit_margin": (weights * z).sum() / used,
            "pairs_used": (weights > 0).float().mean(),
            "fm_loss": err.detach().mean(),
        }


@dataclass
class GroupDPOObjective(_Preference):
    """Group-level DPO (DGPO, ICLR 2026): each group of ``G`` rollouts is split by advantage into positives and
    negatives; the loss ``−log σ(R₊ − R₋ − m)`` compares the sides' implicit rewards, each a sum of per-sample terms
    weighted by ``|advantage|`` and normalised per side (:func:`~divrl.objectives.flow.group_dpo_loss`). IdGlow's
    stage 2 ("group-level DPO with a weighted margin").

    One forward/backward per group and draw (the group's ``G`` images in one batch, with one shared ``ε`` and ``σ``):
    activation memory grows with ``G``; use gradient checkpointing for large groups.

    Attributes:
        beta: ``β`` (DGPO: 100).
        adv_clip: advantages (group-standardised rewards) are clipped to ``±adv_clip``.
        margin: weight per reward component (``reward``: the reward itself) of the margin
            ``m = Σ_c γ_c·(Σ w₊·r_c − Σ w₋·r_c)``, the ``|advantage|``-weighted gap between the sides. Empty: none.
        rpo_alpha: ``λ`` of an added flow-matching loss on the positives, ``λ·Σ w₊·e_θ`` (RPO-style; keeps the
            preferred samples likely while the negatives are pushed away). 0: plain group DPO.
        noise_level: SDE noise level of the rollouts (0: the deterministic sampler; DGPO works with ODE rollouts).
        timesteps: how each group's shared ``σ`` is drawn.
        timesteps_per_sample: ``(σ, ε)`` draws per group per batch.
        epochs: passes over the batch's groups.
        updates_per_epoch: optimizer steps per pass.
    """

    adv_clip: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adv_clip > 0:
            raise ValueError(f"objective.adv_clip must be > 0, got {self.adv_clip}")
        _check_finite(self, "adv_clip", infinite=True)  # .inf: no clipping

    def check(self, sampling) -> None:
        if sampling.group_size < 2:
            raise ValueError(f"sampling.group_size {sampling.group_size}: group DPO needs groups of at least 2")

    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> PreferenceBatch:
        g, n = env.sampling.group_size, len(samples)
        condition, x0, images, scores = self._rollout(samples, env, generator)
        adv = torch.zeros_like(scores.rewards)
        if scores.keep.any():
            adv[scores.keep] = group_advantages(scores.rewards[scores.keep], "group", clip=self.adv_clip)
        values = component_values(scores, g, list(self.margin))
        w_pos, w_neg = group_weights(adv)
        margins = self._margins(values, (w_pos[..., None] * values).sum(1), (w_neg[..., None] * values).sum(1))
        rows = torch.arange(n * g, device=x0.device).view(n, g)
        both = (adv > 0).any(-1) & (adv < 0).any(-1)
        noise, sigmas = self._draws(n, x0, generator, policy, condition)
        return PreferenceBatch(
            samples,
            g,
            scores,
            images,
            condition,
            rollout_calls=env.sampling.num_steps,
            update_calls=3 * self.timesteps_per_sample * self.epochs,
            usable=int(both.sum()),
            missing="no group with rewards both above and below its mean "
            "(every group's samples scored alike: raise sampling.group_size or "
            "objective.noise_level)",
            x0=x0,
            pairs=rows,
            cond_rows=rows,
            weights=both.float(),
            margins=margins,
            advantages=adv,
            noise=noise,
            sigmas=sigmas,
        )

    def updates(self, batch: PreferenceBatch, generator: torch.Generator) -> Iterator[list[tuple[Tensor, int]]]:
        yield from shuffled_updates(
            len(batch.pairs),
            self.epochs,
            self.updates_per_epoch,
            1,
            range(self.timesteps_per_sample),
            generator,
            batch.pairs.device,
        )

    def loss(
        self, policy: Policy, batch: PreferenceBatch, item: tuple[Tensor, int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        index, k = item
        err, ref = self._errors(
            policy, batch, batch.pairs[index], batch.cond_rows[index], batch.noise[index, k], batch.sigmas[index, k]
        )
        losses, delta = group_dpo_loss(err, ref, batch.advantages[index], self.beta, batch.margins[index])
        used = batch.weights[index].sum().clamp(min=1)
        positives = (group_weights(batch.advantages[index])[0] * err).sum(-1)
        weights = batch.weights[index]
        return (losses + self.rpo_alpha * positives).mean(), {
            "dpo_loss": losses.sum() / used,
            "implicit_acc": ((delta > 0).float() * weights).sum() / used,
            "implicit_margin": (delta * weights).sum() / used,
            "groups_used": (weights > 0).float().mean(),
            "fm_loss": err.detach().mean(),
        }
