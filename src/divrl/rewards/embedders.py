"""Crop features for the multi-subject rewards: an :class:`Embedder` turns each crop into one L2-normalised vector
(the subject's identity); :class:`BackboneEmbedder` averages any feature backbone's grid. PSR's DINO CLS feature is
:class:`~divrl.rewards.subject_models.CLSEmbedder`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divrl.rewards.backbones.base import FeatureBackbone

__all__ = ["Embedder", "BackboneEmbedder", "resize"]


class Embedder(nn.Module):
    """Base class: crops → one L2-normalised vector each (the subject's identity).

    Subclasses implement :meth:`embed`; calling the module runs it without gradients, checks it, normalises.
    """

    def embed(self, crops: Sequence[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """``(N, D)`` features of ``N`` crops, each a float ``(3, h, w)`` tensor in [0, 1] of its own size."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        if not crops:
            return torch.zeros(0, 0)
        features = self.embed(list(crops))
        who = type(self).__name__
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != len(crops):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{who}.embed returned {shape} for {len(crops)} crops; expected (N, D)")
        return F.normalize(features.float(), dim=-1).cpu()


class BackboneEmbedder(Embedder):
    """The mean of a :class:`~divrl.rewards.backbones.FeatureBackbone`'s grid over a crop (resized to ``size``).

    Args:
        backbone: the feature grid (DINOv2, the weight-free :class:`~divrl.rewards.backbones.DenseDescriptor`...).
        size: crops are resized (bilinear, antialiased) to ``size × size`` before the backbone.
        features: which grid to average, ``visual`` (appearance: the identity) or ``semantic``.
    """

    def __init__(self, backbone: FeatureBackbone, size: int = 64, features: Literal["visual", "semantic"] = "visual"):
        super().__init__()
        if features not in ("visual", "semantic"):
            raise ValueError(f"BackboneEmbedder: features must be 'visual' or 'semantic', got {features!r}")
        self.backbone, self.size, self.features = backbone, size, features

    def embed(self, crops: Sequence[Tensor]) -> Tensor:
        batch = torch.cat([resize(c, self.size) for c in crops])
        grid = getattr(self.backbone(batch), self.features)
        return grid.float().mean(dim=(-2, -1))


def resize(image: Tensor, size: int) -> Tensor:
    """``(3, h, w)`` → ``(1, 3, size, size)``, bilinear with antialiasing."""
    return F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
