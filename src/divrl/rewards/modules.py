"""Reward modules: score one group (a reference and its ``G`` samples) and return rewards plus components.

Each module wraps a :class:`~divrl.rewards.scorers.GroupScorer` (local features or the MTG server) and decides
how the components become a reward. They are ``nn.Module`` s with plain init arguments, so a LightningCLI YAML
names them by ``class_path``::

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from divrl.images import ImageLike
from divrl.rewards import functional as RF
from divrl.rewards.base import Components, GroupScorer

__all__ = ["RewardOutput", "GroupReward", "NSSMReward", "VSMReward", "GatedReward", "LinearReward"]


class RewardOutput(NamedTuple):
    """Rewards of one group and the components behind them, float32 ``(G,)`` CPU tensors.

    ``vsm`` is ``None`` when it was neither needed nor tracked; ``penalized`` marks the samples whose identity
    gate fired (``VSM < s`` under R2; all False for rewards without a gate).
    """

    reward: Tensor
    nssm: Tensor | None
    vsm: Tensor | None
    penalized: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The non-empty fields by name (for logging)."""
        return {k: v for k, v in self._asdict().items() if v is not None}


class GroupReward(nn.Module):
    """Base class: ``forward(reference, images, ref_mask=None, gen_masks=None) -> RewardOutput``.

    Subclasses set which components they need and implement :meth:`combine`. Non-finite components raise
    (a failed score never becomes a reward).

    Args:
        scorer: computes nSSM / VSM for a group (:class:`~divrl.rewards.FeatureScorer` or
            :class:`~divrl.rewards.backbones.MTGServerScorer`).
        track_vsm: also compute VSM when the reward does not need it, for logging and image grids (costs one
            more similarity pass, or one more server request per group).
    """

    needs_nssm: bool = True
    needs_vsm: bool = False

    def __init__(self, scorer: GroupScorer, track_vsm: bool = True):
        super().__init__()
        if not isinstance(scorer, GroupScorer):
            raise TypeError(
                f"{type(self).__name__}: scorer must be a GroupScorer (FeatureScorer, MTGServerScorer...), got "
                f"{type(scorer).__name__}; wrap a backbone as FeatureScorer(backbone)"
            )
        self.scorer = scorer
        self.track_vsm = track_vsm

    def forward(
        self,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | Sequence[ImageLike] | None = None,
    ) -> RewardOutput:
        components = self.scorer.score_group(
            reference, images, ref_mask, gen_masks,
            need_nssm=self.needs_nssm, need_vsm=self.needs_vsm or self.track_vsm,
        )  # fmt: skip
        _check_finite(components, type(self.scorer).__name__)
        reward, penalized = self.combine(components)
        return RewardOutput(reward.float(), components.nssm, components.vsm, penalized)

    def combine(self, components: Components) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Return ``(reward, penalized)`` from the components."""
        raise NotImplementedError


class NSSMReward(GroupReward):
    """DivRL stage 1 (R1, *Explore*): reward = nSSM, the structural diversity w.r.t. the reference."""

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return c.nssm, torch.zeros_like(c.nssm, dtype=torch.bool)


class VSMReward(GroupReward):
    """Identity consistency alone: reward = VSM (useful as a metric or for ablations)."""

    needs_nssm = False
    needs_vsm = True

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
        self.threshold = threshold
        self.weight = weight

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
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"LinearReward: weight must lie in [0, 1], got {weight}")
        self.weight = weight

    def combine(self, c: Components) -> tuple[Tensor, Tensor]:
        return RF.linear_reward(c.nssm, c.vsm, self.weight), torch.zeros_like(c.vsm, dtype=torch.bool)


def _check_finite(components: Components, who: str) -> None:
    for name, value in components._asdict().items():
        if value is not None and not torch.isfinite(value).all():
            raise ValueError(f"{who} returned non-finite {name} scores {value.tolist()}; refusing to turn them into rewards")
