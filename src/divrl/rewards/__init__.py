"""Rewards: the :class:`Reward` seam, DivRL's nSSM / VSM rewards, and rewards composed of others.

- :mod:`divrl.rewards.base`: :class:`Reward` (``forward(group) -> RewardOutput``), :class:`Group`,
  :class:`RewardOutput`, :class:`NonFiniteReward`; the scorer interface :class:`GroupScorer`.
- :mod:`divrl.rewards.functional`: pure tensor functions (``nssm``, ``vsm``, ``gated_reward``, ``linear_reward``).
- :mod:`divrl.rewards.backbones`: feature grids from DINOv2, the weight-free dense descriptor, any callable, and
  the Mind-the-Glitch reward-server client.
- :class:`FeatureScorer`: a group (one reference, G samples) → nSSM / VSM components from a local backbone.
- :class:`NSSMReward` (R1), :class:`GatedReward` (R2), :class:`VSMReward`, :class:`LinearReward`.
- :class:`WeightedReward` (a weighted sum of rewards), :class:`CallableReward` (a plain function as a reward).
- :class:`RemoteReward`: a reward scored by ``divrl serve-reward`` servers (LitServe), with failover
  (:mod:`divrl.rewards.remote`, the wire format in :mod:`divrl.rewards.wire`).
- Several subjects per condition (:mod:`divrl.rewards.multi`): :class:`PairwiseSubjectConsistency` (PSR) and
  :class:`PerSubjectDivRL`, which find each subject with a :class:`SubjectLocator` (a :class:`Detector` and an
  assignment) and compare crops with an :class:`Embedder` (:mod:`divrl.rewards.subjects`; Grounding DINO and DINO
  CLS features in :mod:`divrl.rewards.subject_models`).
"""

from divrl.rewards.base import Components, Group, GroupScorer, NonFiniteReward, Reward, RewardOutput
from divrl.rewards.compose import CallableReward, WeightedReward
from divrl.rewards.embedders import BackboneEmbedder, Embedder
from divrl.rewards.functional import gated_reward, linear_reward, nssm, vsm
from divrl.rewards.modules import GatedReward, GroupReward, LinearReward, NSSMReward, VSMReward
from divrl.rewards.multi import PairwiseSubjectConsistency, PerSubjectDivRL
from divrl.rewards.remote import RemoteReward
from divrl.rewards.scorers import FeatureScorer
from divrl.rewards.subject_models import CLSEmbedder, GroundingDINODetector
from divrl.rewards.subjects import CallableDetector, Detector, PlainBackgroundDetector, SubjectLocator

__all__ = [
    "nssm",
    "vsm",
    "gated_reward",
    "linear_reward",
    "Reward",
    "Group",
    "RewardOutput",
    "NonFiniteReward",
    "Components",
    "GroupScorer",
    "FeatureScorer",
    "GroupReward",
    "NSSMReward",
    "VSMReward",
    "GatedReward",
    "LinearReward",
    "WeightedReward",
    "CallableReward",
    "RemoteReward",
    "PairwiseSubjectConsistency",
    "PerSubjectDivRL",
    "SubjectLocator",
    "Detector",
    "PlainBackgroundDetector",
    "CallableDetector",
    "Embedder",
    "BackboneEmbedder",
    "GroundingDINODetector",
    "CLSEmbedder",
]
