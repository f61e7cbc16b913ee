"""Feature backbones: images → ``(B, C, H, W)`` semantic and visual grids, plus the MTG reward-server client."""

from divrl.rewards.backbones.base import CallableBackbone, FeatureBackbone, Features
from divrl.rewards.backbones.dense import DenseDescriptor
from divrl.rewards.backbones.dinov2 import DINOv2Backbone
from divrl.rewards.backbones.mtg import MTGServerError, MTGServerScorer

__all__ = [
    "Features",
    "FeatureBackbone",
    "CallableBackbone",
    "DenseDescriptor",
    "DINOv2Backbone",
    "MTGServerScorer",
    "MTGServerError",
]
