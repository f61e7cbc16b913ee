"""Group scorers: one reference, ``G`` generated images → per-image nSSM and VSM.

A scorer owns *how* the reward components are computed: :class:`FeatureScorer` runs a local
:class:`~divrl.rewards.backbones.FeatureBackbone` and the functions of :mod:`divrl.rewards.functional`;
:class:`~divrl.rewards.backbones.mtg.MTGServerScorer` asks a running Mind-the-Glitch reward server. The reward
modules (:mod:`divrl.rewards.modules`) combine the components into a reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from divrl.images import ImageLike, to_mask_batch
from divrl.rewards import functional as RF
from divrl.rewards.backbones.base import FeatureBackbone, Features
from divrl.rewards.base import Components, GroupScorer, check_setting


class FeatureScorer(GroupScorer):
    """Compute nSSM and VSM from a local feature backbone.

    The reference is encoded **once** per group and the ``G`` images in one call (the backbone's ``max_batch``
    bounds how many go through at once); when both components are requested they share the same features.

    Args:
        backbone: the feature extractor (DINOv2, the weight-free dense descriptor, any
            :class:`~divrl.rewards.backbones.CallableBackbone`...).
        pool: nSSM pooling factor on the backbone grid; 2 turns 48×48 into the paper's 24×24 (the published code
            resizes to 32×32 instead; docs/reference.md). Evaluation uses 1 (no pooling), as in the paper.
        tau_s: VSM semantic threshold (paper and code: 0.7).
        tau_v: VSM visual threshold (paper: 0.7, the ``vsm_0.7`` key of the published code).
        nssm_features: which grid nSSM compares, ``"visual"`` (default) or ``"semantic"``; identical for DINOv2.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        pool: int = 2,
        tau_s: float = 0.7,
        tau_v: float = 0.7,
        nssm_features: Literal["visual", "semantic"] = "visual",
    ):
        super().__init__()
        if nssm_features not in ("visual", "semantic"):
            raise ValueError(f"nssm_features must be 'visual' or 'semantic', got {nssm_features!r}")
        RF.check_pool((pool, pool), pool)  # a positive integer; the grid is checked when features arrive
        self.backbone = backbone
        self.pool = pool
        where = "the scorer's init_args (model.rewards[i].init_args.scorer, or the evaluation's scorer)"
        self.tau_s = check_setting(
            "FeatureScorer",
            "tau_s",
            tau_s,
            0.0,
            1.0,
            where=where,
            what="a cosine similarity, paper: 0.7; above 1 no cell passes and every VSM is 0",
        )
        self.tau_v = check_setting(
            "FeatureScorer",
            "tau_v",
            tau_v,
            0.0,
            1.0,
            where=where,
            what="a cosine similarity, paper: 0.7; above 1 no cell passes and every VSM is 0",
        )
        self.nssm_features = nssm_features

    def score_group(
        self,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | Sequence[ImageLike] | None = None,
        *,
        need_nssm: bool = True,
        need_vsm: bool = True,
    ) -> Components:
        ref = self.backbone(reference)
        if ref.semantic.shape[0] != 1:
            raise ValueError(f"reference: expected one image, got a batch of {ref.semantic.shape[0]}")
        return self.score_features(
            ref, self.backbone(images), ref_mask, gen_masks, need_nssm=need_nssm, need_vsm=need_vsm
        )

    def score_features(
        self,
        ref: Features,
        gen: Features,
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | Sequence[ImageLike] | None = None,
        *,
        need_nssm: bool = True,
        need_vsm: bool = True,
    ) -> Components:
        """Score precomputed features (the reference's may be cached by the caller across groups)."""
        grid = tuple(gen.semantic.shape[-2:])
        if need_nssm:  # before the mask, which is checked on the pooled grid
            RF.check_pool(grid, self.pool)
        ref_mask_grid = _mask_to_grid(to_mask_batch(ref_mask, "ref_mask"), grid, "ref_mask")
        gen_mask_grid = _mask_to_grid(to_mask_batch(gen_masks, "gen_masks"), grid, "gen_masks")
        if ref_mask_grid is not None:
            _check_reference_mask(ref_mask_grid, grid, self.pool if need_nssm else 1)
        nssm = vsm = None
        if need_nssm:
            pick = (lambda f: f.visual) if self.nssm_features == "visual" else (lambda f: f.semantic)
            nssm = RF.nssm(pick(gen), pick(ref), ref_mask_grid, pool=self.pool).cpu()
        if need_vsm:
            vsm = RF.vsm(
                gen.semantic,
                gen.visual,
                ref.semantic,
                ref.visual,
                gen_mask=gen_mask_grid,
                ref_mask=ref_mask_grid,
                tau_s=self.tau_s,
                tau_v=self.tau_v,
            ).cpu()
        return Components(nssm, vsm)


def _mask_to_grid(mask: Tensor | None, grid: tuple[int, int], name: str) -> Tensor | None:
    """Area-resample an image-resolution mask to the feature grid as fractions in [0, 1] (thresholded later)."""
    if mask is None:
        return None
    if tuple(mask.shape[-2:]) == grid:
        return mask
    return F.interpolate(mask.unsqueeze(1), size=grid, mode="area").squeeze(1)


def _check_reference_mask(mask: Tensor, grid: tuple[int, int], pool: int) -> None:
    """Refuse a reference mask that leaves fewer than two cells to compare (it would score every sample 0)."""
    size = (grid[0] // pool, grid[1] // pool)
    cells = RF.resize_mask(_mask_to_grid(mask, (size[0] * pool, size[1] * pool), "ref_mask"), size).flatten(1).sum(1)
    if (cells < 2).any():
        raise ValueError(
            f"the subject mask covers {int(cells.min())} cell(s) of the {size[0]}x{size[1]} scoring grid; at least 2 "
            f"are needed. The mask is empty or tiny: check it (a shard's mask.png, divrl sample --mask, divrl score "
            f"--ref-mask), or score without a mask"
        )
