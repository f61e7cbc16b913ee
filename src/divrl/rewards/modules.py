"""The DivRL rewards: score one group against its reference with nSSM / VSM and combine them into a reward.

Each module wraps a :class:`~divrl.rewards.base.GroupScorer` (local features or the MTG server) and decides how
the components become a reward. They are :class:`~divrl.rewards.base.Reward` s with plain init arguments, so a
LightningCLI YAML names them by ``class_path``::

    reward:
      class_path: divrl.rewards.GatedReward          # DivRL stage 2 (R2)
      init_args:
        threshold: 0.5
        weight: 5.0
        scorer:
          class_path: divrl.rewards.FeatureScorer
          init_args:
            backbone: {class_path: divrl.rewards.backbones.DINOv2Backbone}
            pool: 2

They score a condition's single reference; a condition with several references (multi-subject data) is refused
with an error rather than scored against its first subject alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from divrl.rewards import functional as RF
from divrl.rewards.base import Components, Group, GroupScorer, NonFiniteReward, Reward, RewardOutput, check_setting

__all__ = ["RewardOutput", "GroupReward", "NSSMReward", "VSMReward", "GatedReward", "LinearReward"]


class GroupReward(Reward):
    """Base class of the DivRL rewards: the group's reference and images → nSSM / VSM components → a reward.

    Subclasses set which components they need and implement :meth:`combine`. Non-finite components raise
    :class:`~divrl.rewards.base.NonFiniteReward` (a failed score never becomes a reward).

    Args:
        scorer: computes nSSM / VSM for a group (:class:`~divrl.rewards.FeatureScorer` or
            :class:`~divrl.rewards.backbones.MTGServerScorer`).
        track_vsm: also compute VSM when the reward does not need it, for logging and image grids (costs one
            more similarity pass, or one more server request per group).
    """

    needs_nssm: bool = True
    needs_vsm: bool = False
    track_nssm: bool = False  # compute nSSM although the reward does not need it (VSMReward's setting)

    def __init__(self, scorer: GroupScorer, track_vsm: bool = True):
        super().__init__()
        if not isinstance(scorer, GroupScorer):
            raise TypeError(
                f"{type(self).__name__}: scorer must be a GroupScorer (FeatureScorer, MTGServerScorer...), got "
                f"{type(scorer).__name__}; wrap a backbone as FeatureScorer(backbone)"
            )
        self.scorer = scorer
        self.track_vsm = track_vsm

    @property
    def concurrency(self) -> int:
        return getattr(self.scorer, "concurrency", 1)  # a served scorer (MTG with several urls) scores groups at once

    def forward(self, group: Group) -> RewardOutput:
        if len(group.references) != 1:
            raise ValueError(
                f"{type(self).__name__} scores a condition against one reference; {group.sample.id!r} has "
                f"{len(group.references)}. Use single-reference data, or a reward written for several subjects"
            )
        components = self.scorer.score_group(
            group.reference,
            group.images,
            group.mask,
            group.gen_masks,
            need_nssm=self.needs_nssm or self.track_nssm,
            need_vsm=self.needs_vsm or self.track_vsm,
        )
        _check_finite(components, type(self.scorer).__name__)
        reward, gated = self.combine(components)
        named = {name: value for name, value in components._asdict().items() if value is not None}
        return RewardOutput(reward.float(), named, gated)

    def combine(self, components: Components) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Return ``(reward, gated)`` from the components (``gated``: the samples whose gate fired)."""
        raise NotImplementedError


class NSSMReward(GroupReward):
    """DivRL stage 1 (R1, *Explore*): reward = nSSM, the structural diversity w.r.t. the reference."""

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return c.nssm, torch.zeros_like(c.nssm, dtype=torch.bool)


class VSMReward(GroupReward):
    """Identity consistency alone: reward = VSM (useful as a metric or for ablations).

    Args:
        scorer: see :class:`GroupReward`.
        track_nssm: also compute nSSM, for logging and image grids (``val/nssm``, the held-out curves of the
            ablations), although the reward does not use it: one more similarity pass per group, or one more request
            to an MTG server. ``False`` scores VSM alone.
    """

    needs_nssm = False
    needs_vsm = True

    def __init__(self, scorer: GroupScorer, track_nssm: bool = True):
        super().__init__(scorer, track_vsm=True)
        self.track_nssm = track_nssm

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return c.vsm, torch.zeros_like(c.vsm, dtype=torch.bool)


class GatedReward(GroupReward):
    """DivRL stage 2 (R2, *Suppress*): nSSM, minus ``weight·(threshold − VSM)²`` when ``VSM < threshold``.

    Args:
        scorer: see :class:`GroupReward`.
        threshold: the identity gate ``s`` (paper and code: 0.5).
        weight: the penalty weight ``λ`` (paper and code: 5).
    """

    needs_vsm = True

    def __init__(self, scorer: GroupScorer, threshold: float = 0.5, weight: float = 5.0):
        super().__init__(scorer, track_vsm=True)
        # a gate below 0 never fires, a negative weight turns the penalty into a bonus, NaN poisons every reward
        self.threshold = check_setting(
            "GatedReward", "threshold", threshold, 0.0, 1.0, what="the identity gate s on VSM; paper: 0.5"
        )
        self.weight = check_setting("GatedReward", "weight", weight, 0.0, what="the penalty weight lambda; paper: 5")

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return RF.gated_reward(c.nssm, c.vsm, self.threshold, self.weight), c.vsm < self.threshold


class LinearReward(GroupReward):
    """The paper's linear baseline (Figure 6): ``weight·VSM + (1 − weight)·nSSM``.

    Args:
        scorer: see :class:`GroupReward`.
        weight: the VSM weight ``w`` in [0, 1].
    """

    needs_vsm = True

    def __init__(self, scorer: GroupScorer, weight: float = 0.5):
        super().__init__(scorer, track_vsm=True)
        self.weight = check_setting("LinearReward", "weight", weight, 0.0, 1.0, what="the VSM weight w")

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return RF.linear_reward(c.nssm, c.vsm, self.weight), torch.zeros_like(c.vsm, dtype=torch.bool)


def _check_finite(components: Components, who: str) -> None:
    for name, value in components._asdict().items():
        if value is not None and not torch.isfinite(value).all():
            raise NonFiniteReward(
                f"{who} returned non-finite {name} scores {value.tolist()}; refusing to turn them into rewards"
            )
