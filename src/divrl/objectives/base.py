"""The objective seam: what a training objective does with a batch of conditions, and what it may ask of the run.

An :class:`Objective` turns a batch of conditions into optimizer updates in three steps, which the LightningModule
drives without knowing the objective:

1. :meth:`Objective.collect`: roll out, score and prepare what the loss needs (advantages, pairs, old velocities...)
   through an :class:`Environment`, the run's services (sampling, skip-and-count scoring, cross-rank gathering);
2. :meth:`Objective.updates`: one list of work items per optimizer step;
3. :meth:`Objective.loss`: the loss of one work item (the module backpropagates ``loss / len(items)`` for each item
   and applies the accumulated gradient, with the same collectives on every rank).

Plain torch: no Lightning import. :class:`~divrl.objectives.GRPOObjective` (Flow-GRPO) is the reference
implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.grpo.sampler import Trajectory
    from divrl.policy.base import Conditioning, Policy
    from divrl.rewards.base import RewardOutput

__all__ = ["SamplingConfig", "Scores", "Batch", "Environment", "Objective"]


@dataclass
class SamplingConfig:
    """How rollouts are drawn (``model.sampling``); shared by the objectives, validation and ``divrl sample``.

    Defaults are the published DivRL run (``docs/reference.md``, "The published run").

    Attributes:
        group_size: samples per (identity, prompt) condition, ``G`` (paper: 21).
        num_steps: denoising steps of a training rollout (paper: 6); validation uses as many, deterministically.
        noise_level: SDE noise level ``a`` of training rollouts (paper: 0.9); 0 is the deterministic (ODE) sampler.
        resolution: generated (and reference) image side in pixels (paper: 512).
        seed: seeds the rollout noise (combined with the rank and the rollout index, so a resumed run draws the same
            noise as an uninterrupted one).
        val_group_size: samples per validation condition (deterministic sampler, fixed seeds).
    """

    group_size: int = 21
    num_steps: int = 6
    noise_level: float = 0.9
    resolution: int = 512
    seed: int = 42
    val_group_size: int = 4

    def __post_init__(self) -> None:
        positive(self, "sampling", "group_size", "num_steps", "resolution", "val_group_size")
        if not 0 <= self.noise_level < float("inf"):
            raise ValueError(f"sampling.noise_level must be a finite number >= 0 (paper: 0.9), got {self.noise_level}")


@dataclass
class Scores:
    """The scores of a batch of groups, as :meth:`Environment.score` returns them.

    Attributes:
        rewards: ``(n, G)`` float32 rewards on the training device; rows of skipped groups are 0 (and not kept).
        keep: ``(n,)`` bool, the groups that were scored (a group whose reward is not finite is skipped).
        outputs: one :class:`~divrl.rewards.RewardOutput` per group, ``None`` for a skipped group.
    """

    rewards: Tensor
    keep: Tensor
    outputs: list[RewardOutput | None]

    @property
    def kept(self) -> int:
        return int(self.keep.sum())


@dataclass
class Batch:
    """What :meth:`Objective.collect` returns: the part every objective shares (the module logs it), extended by each
    objective with what its loss needs.

    Attributes:
        samples: the batch's conditions.
        group_size: images per condition in ``images``.
        scores: the groups' scores (kept groups, outputs), or ``None`` for an objective that scores nothing.
        images: the generated images ``(n·G, 3, H, W)`` (rollout grids), or ``None``.
        condition: the policy's conditioning of the rollout (for its FLOP count), or ``None``.
        rollout_calls: network calls per generated image during collect (FLOP accounting).
        update_calls: forward-pass equivalents per generated image of all this batch's updates (a forward and its
            backward count 2, a reference forward 1).
        usable: how many conditions, pairs or groups can train (those with a target image, pairs whose reward gap is
            large enough...); ``None``: all of them (of the kept groups, when scored). A batch with none on any rank
            (or no kept group) is not applied and counted, as a rollout without a kept group.
        missing: what the batch lacks when ``usable`` is 0, with the fix (named in the warning and in the error that
            stops a run after ``system.max_empty_rollouts`` such batches in a row).
    """

    samples: Sequence[ConditionSample]
    group_size: int
    scores: Scores | None = None
    images: Tensor | None = None
    condition: Conditioning | None = None
    rollout_calls: int = 0
    update_calls: int = 0
    usable: int | None = None
    missing: str = ""


class Environment(Protocol):
    """The run's services an objective uses in :meth:`Objective.collect` (implemented by the training module)."""

    sampling: SamplingConfig

    def rollout(
        self,
        samples: Sequence[ConditionSample],
        group_size: int,
        generator: torch.Generator,
        *,
        num_steps: int | None = None,
        noise_level: float | None = None,
        sde_steps: Sequence[bool] | None = None,
    ) -> tuple[Conditioning, Trajectory]:
        """``group_size`` trajectories per condition with decoded images (defaults: :attr:`sampling`'s)."""

    def score(self, samples: Sequence[ConditionSample], images: Tensor, group_size: int) -> Scores:
        """Each group's reward under the current stage's reward; non-finite groups are skipped and counted, any
        other reward error stops the run on every rank."""

    def rollout_and_score(
        self,
        samples: Sequence[ConditionSample],
        group_size: int,
        generator: torch.Generator,
        *,
        noise_level: float | None = None,
        sde_steps: Sequence[bool] | None = None,
    ) -> tuple[Conditioning, Trajectory, Scores]:
        """:meth:`rollout` then :meth:`score` of its images; with ``system.overlap_rewards`` the groups are scored while
        the rest of the batch rolls out (the same scores, bit for bit), and this returns once all are scored."""

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` stacked along a new first dim (the tensor itself, unstacked, in one process)."""

    @property
    def step(self) -> int:
        """Optimizer updates done so far in the run (``global_step``; schedules over training read it)."""


class Objective(ABC):
    """Base class of training objectives (GRPO, DPO, SFT...). Subclasses are small dataclasses of their settings
    (``model.objective`` in YAML) with the three methods below; they keep no state between batches.

    Under DDP and FSDP every backward pass and every ``env`` call is a collective, so an objective must do the same
    amount of work on every rank whatever its data: the same ``env.rollout`` / ``env.score`` calls in ``collect``, the
    same number of updates and of items per update (weight an item by 0 rather than dropping it, as GRPO keeps the
    samples of skipped groups with advantage 0).

    Attributes:
        max_stats: names of loss statistics reduced by their maximum over an update (the others by their mean).
    """

    max_stats: ClassVar[frozenset[str]] = frozenset()

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`loss` runs the reference policy (full fine-tuning then keeps a frozen copy)."""
        return False

    def check(self, sampling: SamplingConfig) -> None:  # noqa: B027 - optional hook; the default accepts all
        """Refuse, at start-up, sampling settings this objective cannot train with (with the fix)."""

    @abstractmethod
    def collect(
        self, policy: Policy, samples: Sequence[ConditionSample], env: Environment, generator: torch.Generator
    ) -> Batch:
        """Roll out, score and prepare what the loss needs for ``samples`` (no gradients)."""

    @abstractmethod
    def updates(self, batch: Batch, generator: torch.Generator) -> Iterator[list[Any]]:
        """The work items of each optimizer step, one list per step (``generator`` shuffles, seeded per rollout)."""

    @abstractmethod
    def loss(self, policy: Policy, batch: Batch, item: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one work item (with gradients) and detached scalar statistics (logged as ``train/<name>``)."""


def shuffled_updates(
    num: int,
    epochs: int,
    updates_per_epoch: int,
    micro_batch_size: int,
    inner: Sequence,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Iterator[list[tuple[Tensor, Any]]]:
    """The work items of minibatch updates over ``num`` samples: ``epochs`` shuffles (``generator``), each cut into
    ``updates_per_epoch`` parts (one optimizer step each); a part's items are its (micro-batch of sample indices,
    ``x``) pairs for every ``x`` in ``inner`` (GRPO: the trained steps; SFT: the timestep draws)."""
    samples = torch.arange(num, device=device)
    for _ in range(epochs):
        order = samples[torch.randperm(num, generator=generator).to(samples.device)]
        for part in order.tensor_split(min(updates_per_epoch, num)):
            yield [(index, x) for index in part.split(micro_batch_size) for x in inner]


def rollout_and_score(
    env: Environment, samples: Sequence[ConditionSample], group_size: int, generator: torch.Generator, **kwargs
) -> tuple[Conditioning, Trajectory, Scores]:
    """``env.rollout_and_score`` (pipelined scoring in a training run), or ``env.rollout`` then ``env.score`` for an
    environment that predates it (a test's, a user's own)."""
    if hasattr(env, "rollout_and_score"):
        return env.rollout_and_score(samples, group_size, generator, **kwargs)
    condition, trajectory = env.rollout(samples, group_size, generator, **kwargs)
    return condition, trajectory, env.score(samples, trajectory.images, group_size)


def positive(obj: object, prefix: str, *names: str) -> None:
    """Refuse settings below 1, naming them (``objective.ppo_epochs must be >= 1``)."""
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{prefix}.{name} must be >= 1, got {getattr(obj, name)}")
