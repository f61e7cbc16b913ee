"""Evaluation metrics of the DivRL paper as pure tensor functions (plain torch, no models, no Lightning).

- :func:`cosine` — CLIP-T (image vs prompt embedding), CLIP-I and DINO (image vs reference embedding).
- :func:`patch_similarity` — **sDINO**: the mean, over the generated image's patches, of the best cosine to any
  reference patch. Unlike a global embedding it does not care *where* the subject's parts are, so it measures
  identity without rewarding a copied layout (the paper's out-of-domain consistency score).
- :func:`scale_invariant_iou` — **si-IoU**: crop both subject masks to their tight boxes, resize the generated crop to
  the reference box, IoU. Position and scale are factored out; what remains is the silhouette, i.e. the *pose*
  (high si-IoU = the pose was copied).
- :func:`consistency_ratio` and :func:`diversity_over_consistency` — the paper's trade-off axes (Figs. 3 and 6):
  the share of samples that keep the identity (VSM > 0.6 in domain, sDINO > 0.75 out of domain) and the mean
  structural diversity (nSSM) over those consistent samples only.

Undefined values are NaN, never a made-up number: the diversity over consistency of a method with no consistent
sample is NaN (the report prints "—" and the count), and so is a metric a category leaves out (VSM for ``style``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from divrl.rewards.functional import normalize_features, resize_mask

__all__ = [
    "cosine",
    "patch_similarity",
    "scale_invariant_iou",
    "consistency_ratio",
    "diversity_over_consistency",
    "mask_box",
]


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of ``(B, D)`` embeddings ``a`` and ``(B or 1, D)`` embeddings ``b`` → ``(B,)``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(
            f"cosine: expected (B, D) and (B or 1, D) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return F.cosine_similarity(a.float(), b.float().expand_as(a), dim=1, eps=1e-8)


def patch_similarity(
    gen_feats: Tensor, ref_feats: Tensor, gen_mask: Tensor | None = None, ref_mask: Tensor | None = None
) -> Tensor:
    """sDINO: mean over generated patches of the maximum cosine to the reference patches.

    Args:
        gen_feats: patch-feature grids of the generated images, ``(B, C, H, W)``.
        ref_feats: the reference's grid, ``(B or 1, C, H', W')`` (the grids may differ in size).
        gen_mask: optional ``(B or 1, h, w)`` subject mask of the generated images (area-averaged to the grid,
            ``> 0.5``): only patches inside it are averaged. A generated image whose mask covers no patch gets NaN.
        ref_mask: optional ``(B or 1, h, w)`` subject mask of the reference: matches may only land inside it.

    Returns:
        Float32 ``(B,)`` in ``[-1, 1]``.
    """
    if gen_feats.dim() != 4 or ref_feats.dim() != 4 or gen_feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(
            f"patch_similarity: expected (B, C, H, W) grids with one channel count, got {tuple(gen_feats.shape)} "
            f"and {tuple(ref_feats.shape)}"
        )
    batch = gen_feats.shape[0]
    if ref_feats.shape[0] not in (1, batch):
        raise ValueError(f"patch_similarity: the reference batch must be 1 or {batch}, got {ref_feats.shape[0]}")
    gen = normalize_features(gen_feats).flatten(2).transpose(1, 2)  # (B, N, C)
    ref = normalize_features(ref_feats).flatten(2)  # (1 or B, C, M)
    sim = gen @ ref  # (B, N, M)
    if ref_mask is not None:
        inside = resize_mask(ref_mask, tuple(ref_feats.shape[-2:]), "ref_mask").flatten(1)  # (1 or B, M)
        if not inside.any(1).all():
            raise ValueError("patch_similarity: ref_mask covers no patch of the reference grid; check the mask")
        sim = sim.masked_fill(~inside.unsqueeze(1), float("-inf"))
    best = sim.amax(2)  # (B, N)
    if gen_mask is None:
        return best.mean(1)
    keep = resize_mask(gen_mask, tuple(gen_feats.shape[-2:]), "gen_mask").flatten(1).expand(batch, -1)
    count = keep.sum(1)
    total = torch.where(keep, best, torch.zeros_like(best)).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def mask_box(mask: Tensor) -> tuple[int, int, int, int] | None:
    """Tight bounding box ``(top, bottom, left, right)`` (exclusive ends) of a 2-D bool mask; ``None`` if empty."""
    rows = mask.any(1).nonzero()
    if rows.numel() == 0:
        return None
    cols = mask.any(0).nonzero()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def scale_invariant_iou(gen_mask: Tensor, ref_mask: Tensor, threshold: float = 0.5) -> Tensor:
    """si-IoU: IoU of the two silhouettes after cropping each to its tight box and resizing the generated crop to the
    reference box's size (bilinear on the float mask, then ``> threshold``).

    Args:
        gen_mask: ``(B, H, W)`` masks of the generated subjects (bool, or float in [0, 1] thresholded at
            ``threshold``).
        ref_mask: ``(B or 1, H', W')`` reference mask(s).
        threshold: binarisation threshold of float masks.

    Returns:
        Float32 ``(B,)`` in ``[0, 1]``. A generated image with an empty mask (no subject found) scores 0: there is no
        overlap with an empty silhouette.

    Raises:
        ValueError: if a reference mask is empty (nothing to compare with: fix the reference mask).
    """
    if gen_mask.dim() != 3 or ref_mask.dim() != 3 or ref_mask.shape[0] not in (1, gen_mask.shape[0]):
        raise ValueError(
            f"scale_invariant_iou: expected (B, H, W) and (B or 1, H, W) masks, got {tuple(gen_mask.shape)} and "
            f"{tuple(ref_mask.shape)}"
        )
    gen = gen_mask.float() > threshold
    ref = ref_mask.float() > threshold
    scores = []
    for k in range(gen.shape[0]):
        r = ref[k if ref.shape[0] > 1 else 0]
        ref_box = mask_box(r)
        if ref_box is None:
            raise ValueError("scale_invariant_iou: the reference mask is empty; check the reference's subject mask")
        gen_box = mask_box(gen[k])
        if gen_box is None:
            scores.append(0.0)
            continue
        r_crop = r[ref_box[0] : ref_box[1], ref_box[2] : ref_box[3]]
        g_crop = gen_mask[k, gen_box[0] : gen_box[1], gen_box[2] : gen_box[3]].float()
        g_crop = (g_crop > threshold).float()
        resized = F.interpolate(g_crop[None, None], size=tuple(r_crop.shape), mode="bilinear", align_corners=False)
        g = resized[0, 0] > 0.5
        union = (g | r_crop).sum()
        scores.append(float((g & r_crop).sum() / union))
    return torch.tensor(scores, dtype=torch.float32)


def consistency_ratio(identity: Tensor, threshold: float) -> Tensor:
    """Share of samples whose identity score (VSM or sDINO) is **above** ``threshold``; NaN scores are left out
    (a category the identity metric does not cover). NaN when no sample has a score."""
    identity = torch.as_tensor(identity, dtype=torch.float32).flatten()
    valid = ~identity.isnan()
    if not valid.any():
        return torch.tensor(float("nan"))
    return (identity[valid] > threshold).float().mean()


def diversity_over_consistency(diversity: Tensor, identity: Tensor, threshold: float) -> Tensor:
    """Mean structural diversity (nSSM) over the consistent samples (identity ``> threshold``).

    NaN when no sample is consistent: a method that never keeps the identity has no diversity worth counting, and a
    0 would wrongly place it on the trade-off plot.
    """
    diversity = torch.as_tensor(diversity, dtype=torch.float32).flatten()
    identity = torch.as_tensor(identity, dtype=torch.float32).flatten()
    if diversity.shape != identity.shape:
        raise ValueError(
            f"diversity_over_consistency: {diversity.numel()} diversity scores for {identity.numel()} identity scores"
        )
    keep = (identity > threshold) & ~diversity.isnan()
    if not keep.any():
        return torch.tensor(float("nan"))
    return diversity[keep].mean()
