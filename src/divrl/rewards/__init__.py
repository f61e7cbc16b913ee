"""The DivRL rewards: nSSM (structural diversity) and VSM (identity), as functions, scorers and reward modules.

- :mod:`divrl.rewards.functional`: pure tensor functions (``nssm``, ``vsm``, ``gated_reward``, ``linear_reward``).
- :mod:`divrl.rewards.backbones`: feature grids from DINOv2, the weight-free dense descriptor, any callable, and
  the Mind-the-Glitch reward-server client.
- :class:`FeatureScorer` / :class:`GroupScorer`: a group (one reference, G samples) → components.
- :class:`NSSMReward` (R1), :class:`GatedReward` (R2), :class:`VSMReward`, :class:`LinearReward`.
"""

from divrl.rewards.functional import gated_reward, linear_reward, nssm, vsm
from divrl.rewards.modules import GatedReward, GroupReward, LinearReward, NSSMReward, RewardOutput, VSMReward
from divrl.rewards.base import Components, GroupScorer
from divrl.rewards.scorers import FeatureScorer

__all__ = [
    "nssm",
    "vsm",
    "gated_reward",
    "linear_reward",
    "Components",
    "GroupScorer",
    "FeatureScorer",
    "RewardOutput",
    "GroupReward",
    "NSSMReward",
    "VSMReward",
    "GatedReward",
    "LinearReward",
]
