"""The DivRL rewards as pure, batched tensor functions.

Everything here is plain torch (no Lightning, no models): feature grids in, one score per generated image out.
Feature grids are ``(B, C, H, W)`` tensors; the reference may have batch 1 and then broadcasts over the
``B`` generated images (one reference, a group of ``G`` samples). All arithmetic runs in float32 whatever the
input dtype (bf16 features from a bf16 backbone are upcast first), and no function loops over pixels in Python.

Formulas (paper §3; ``DESIGN.md`` "The math"):

- **nSSM** (structural diversity). L2-normalise every feature vector of the grid, average-pool ``pool × pool``
  (48→24 for ``pool=2``; *no* re-normalisation after pooling), flatten to ``N`` tokens ``F`` and form the
  self-similarity matrix ``SSM = F Fᵀ`` for the reference and for each generated image. Keep the entries
  ``(i, j)`` with ``i ≠ j`` and both tokens inside the reference mask (all entries without a mask) and take the
  Pearson correlation ``ρ`` of the two SSMs over them: ``nSSM = 1 − ρ``, in ``[0, 2]``. ``ρ`` is the population
  Pearson of the paper's eq. 5 (the official code's is ``(n−1)/n`` of it: its stds use Bessel's correction;
  ``docs/configuration.md``).
- **VSM** (identity, Mind-the-Glitch). Each generated cell (inside its mask) is matched by cosine argmax to
  the reference cells inside the reference mask, once with semantic and once with visual features. Cells whose
  semantic maximum exceeds ``tau_s`` are kept; one-to-one, each matched reference cell keeps only the source cell
  with the highest semantic score; VSM is the fraction of kept cells whose visual maximum exceeds ``tau_v``.
- **R2** (``gated_reward``): ``nSSM`` if ``VSM ≥ s``, else ``nSSM − λ·(s − VSM)²``.
- **Linear baseline** (``linear_reward``): ``w·VSM + (1 − w)·nSSM``.

Degenerate inputs have defined values (never NaN):

- nSSM, an SSM with no spread over the kept entries (a constant feature grid; std below ``1e-5``): if both SSMs
  are flat, the two structures are identical, ``ρ = 1`` and nSSM = 0 (so ``nssm(x, x) == 0`` for every ``x``);
  if only one is flat there is no shared structure, ``ρ = 0`` and nSSM = 1.
- nSSM, fewer than two tokens inside the reference mask (no off-diagonal pair to correlate): nSSM = 0, i.e. no
  evidence of diversity earns no reward. The reward modules refuse such a reference mask with an error instead
  of scoring with it.
- VSM, no cell passes the semantic threshold (or an empty mask): VSM = 0, so the R2 penalty applies in full.
  (The published code returns NaN here, and ``NaN < s`` is false, so the NaN escaped the identity gate.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "nssm",
    "vsm",
    "gated_reward",
    "linear_reward",
    "normalize_features",
    "pool_features",
    "check_pool",
    "self_similarity",
    "masked_pearson",
    "resize_mask",
]

_FLAT_STD = 1e-5
"""SSM entries lie in [-1, 1]; a spread below this is float noise around a constant (see the module docstring)."""


def normalize_features(feats: Tensor, eps: float = 1e-8) -> Tensor:
    """L2-normalise each feature vector of a ``(B, C, H, W)`` grid along ``C``, in float32.

    An all-zero vector stays zero (it is similar to nothing) instead of becoming NaN.
    """
    _check_grid(feats, "feats")
    feats = feats.float()
    return feats / feats.norm(dim=1, keepdim=True).clamp_min(eps)


def pool_features(feats: Tensor, pool: int) -> Tensor:
    """Average-pool a ``(B, C, H, W)`` grid by ``pool × pool`` (no re-normalisation).

    Raises:
        ValueError: if ``H`` or ``W`` is not a multiple of ``pool``.
    """
    check_pool(tuple(feats.shape[-2:]), pool)
    return feats if pool == 1 else F.avg_pool2d(feats, pool)


def check_pool(grid: tuple[int, int], pool: int) -> None:
    """Refuse a pooling factor that is not a positive integer dividing the ``(H, W)`` feature grid, naming both."""
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
        raise ValueError(f"pool must be a positive integer, got {pool!r}")
    h, w = grid
    if h % pool or w % pool:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        listed = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
        raise ValueError(
            f"pool={pool} does not divide the backbone's {h}x{w} feature grid; set the scorer's pool to "
            f"one that does ({listed})"
        )


def self_similarity(tokens: Tensor) -> Tensor:
    """Self-similarity matrix ``F Fᵀ`` of ``(B, N, C)`` tokens, shape ``(B, N, N)``."""
    return tokens @ tokens.transpose(1, 2)


def resize_mask(mask: Tensor, size: tuple[int, int], name: str = "mask") -> Tensor:
    """Area-average a ``(B, h, w)`` mask (bool or float in [0, 1]) to ``size`` and threshold at 0.5.

    ``h`` and ``w`` must be integer multiples of ``size`` so each output cell averages whole input cells.

    Returns:
        A bool tensor ``(B, *size)``.
    """
    if mask.dim() != 3:
        raise ValueError(f"{name} must have shape (B or 1, H, W), got {tuple(mask.shape)}")
    h, w = mask.shape[-2:]
    th, tw = size
    if h % th or w % tw:
        raise ValueError(
            f"{name} of size {h}x{w} cannot be area-averaged to the {th}x{tw} grid: its height and width must be "
            f"integer multiples of the grid's. Resize the mask to a multiple of {th}x{tw} first."
        )
    mask = mask.float()
    if (h, w) != (th, tw):
        mask = F.avg_pool2d(mask.unsqueeze(1), (h // th, w // tw)).squeeze(1)
    return mask > 0.5


def masked_pearson(a: Tensor, b: Tensor, weights: Tensor) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` over the entries where ``weights`` is 1, per batch element.

    ``a``, ``b`` and ``weights`` have shape ``(1 or B, ...)`` and broadcast over the batch; the statistics reduce
    over every non-batch dimension. A batch-1 operand (the reference SSM) is centred once, not ``B`` times.

    Degenerate cases (see the module docstring): both operands flat → 1, one flat → 0, and fewer than two
    weighted entries → 1 (nothing tells the two apart).
    """
    a, b, weights = a.float(), b.float(), weights.float()
    dims = tuple(range(1, a.dim()))
    count = weights.sum(dims)
    denom = count.clamp_min(1.0)

    def centre(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (weights * x).sum(dims) / denom
        x_c = x - mean.reshape(-1, *([1] * len(dims)))
        return x_c, (weights * x_c.square()).sum(dims) / denom

    a_c, var_a = centre(a)
    b_c, var_b = centre(b)
    cov = (weights * a_c * b_c).sum(dims) / denom
    flat_a, flat_b = var_a <= _FLAT_STD**2, var_b <= _FLAT_STD**2
    rho = (cov / (var_a * var_b).sqrt().clamp_min(_FLAT_STD**2)).clamp(-1.0, 1.0)
    rho = torch.where(flat_a | flat_b, (flat_a & flat_b).float(), rho)
    return torch.where(count >= 2, rho, torch.ones_like(rho))


def nssm(gen_feats: Tensor, ref_feats: Tensor, ref_mask: Tensor | None = None, pool: int = 2) -> Tensor:
    """Structural diversity of generated images w.r.t. a reference: ``1 − Pearson(SSM_gen, SSM_ref)``.

    Args:
        gen_feats: generated-image feature grids ``(B, C, H, W)``.
        ref_feats: reference feature grids ``(B or 1, C, H, W)``; batch 1 broadcasts over the ``B`` images.
        ref_mask: optional subject mask of the reference, ``(B or 1, h, w)`` bool or float, at any resolution
            that is an integer multiple of the pooled grid ``(H/pool, W/pool)``; it is area-averaged to the pooled
            grid and thresholded at 0.5. Only token pairs inside the mask are compared (for both images, as in the
            paper). ``None`` compares all pairs.
        pool: average-pooling factor applied after normalisation (2 turns the 48×48 grid into the paper's 24×24).

    Returns:
        Float32 tensor ``(B,)`` with values in ``[0, 2]``: 0 for identical structure, 1 for unrelated, 2 for
        anti-correlated. See the module docstring for flat grids and near-empty masks.
    """
    _check_pair(gen_feats, ref_feats, "gen_feats", "ref_feats")
    gen = pool_features(normalize_features(gen_feats), pool)
    ref = pool_features(normalize_features(ref_feats), pool)
    batch = gen.shape[0]
    h, w = gen.shape[-2:]
    n = h * w
    ssm_gen = self_similarity(gen.flatten(2).transpose(1, 2))  # (B, N, N)
    ssm_ref = self_similarity(ref.flatten(2).transpose(1, 2))  # (1 or B, N, N)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=gen.device)
    if ref_mask is None:
        pairs = off_diag.unsqueeze(0)
    else:
        _check_mask_batch(ref_mask, batch, "ref_mask")
        inside = resize_mask(ref_mask.to(gen.device), (h, w), "ref_mask").flatten(1)  # (1 or B, N)
        pairs = inside.unsqueeze(2) & inside.unsqueeze(1) & off_diag
    return 1.0 - masked_pearson(ssm_gen, ssm_ref, pairs).expand(batch)


def vsm(
    gen_sem: Tensor,
    gen_vis: Tensor,
    ref_sem: Tensor,
    ref_vis: Tensor,
    gen_mask: Tensor | None = None,
    ref_mask: Tensor | None = None,
    tau_s: float = 0.7,
    tau_v: float = 0.7,
) -> Tensor:
    """Visual Semantic Matching (identity consistency), in ``[0, 1]``.

    Args:
        gen_sem, gen_vis: semantic and visual feature grids of the generated images, ``(B, C, H, W)``.
        ref_sem, ref_vis: the reference's grids, ``(B or 1, C, H, W)``; batch 1 broadcasts.
            All four grids share one ``H × W`` (the channel counts of semantic and visual may differ).
            Passing the same tensor as semantic and visual is the DINOv2 variant of the paper.
        gen_mask: optional ``(B or 1, h, w)`` mask of the generated subject; only its cells are matched.
        ref_mask: optional ``(B or 1, h, w)`` mask of the reference subject; matches may only land inside it.
            Masks may have any resolution that is an integer multiple of ``H × W`` (area-averaged, ``> 0.5``).
        tau_s: semantic threshold: a generated cell takes part only if its best semantic cosine exceeds it.
        tau_v: visual threshold: a kept cell counts as consistent if its best visual cosine exceeds it.

    Returns:
        Float32 tensor ``(B,)``: the fraction of kept cells that are visually consistent; 0 when no cell is kept.
    """
    _check_pair(gen_sem, ref_sem, "gen_sem", "ref_sem")
    _check_pair(gen_vis, ref_vis, "gen_vis", "ref_vis")
    if gen_sem.shape[-2:] != gen_vis.shape[-2:] or gen_sem.shape[0] != gen_vis.shape[0]:
        raise ValueError(
            f"gen_sem {tuple(gen_sem.shape)} and gen_vis {tuple(gen_vis.shape)} must share batch and grid size"
        )
    batch = gen_sem.shape[0]
    h, w = gen_sem.shape[-2:]
    device = gen_sem.device
    ref_inside = _inside(ref_mask, batch, (h, w), device, "ref_mask")  # (1 or B, N)
    gen_inside = _inside(gen_mask, batch, (h, w), device, "gen_mask")

    sem_score, sem_match, vis_score = _best_matches(gen_sem, gen_vis, ref_sem, ref_vis, ref_inside)

    candidate = gen_inside & (sem_score > tau_s)
    kept = _one_to_one(sem_score, sem_match, candidate, num_targets=h * w)
    n_kept = kept.sum(1)
    n_consistent = (kept & (vis_score > tau_v)).sum(1)
    return torch.where(n_kept > 0, n_consistent / n_kept.clamp_min(1), torch.zeros(batch, device=device))


def gated_reward(nssm: Tensor, vsm: Tensor, threshold: float = 0.5, weight: float = 5.0) -> Tensor:
    """DivRL's stage-2 reward R2: ``nSSM`` if ``VSM ≥ threshold``, else ``nSSM − weight·(threshold − VSM)²``.

    Raises:
        ValueError: if ``vsm`` holds NaN. A NaN would silently pass the gate (``NaN < s`` is false), which is
            exactly the published code's bug; our ``vsm`` never returns NaN, so a NaN here is an upstream error.
    """
    nssm, vsm = _check_scores(nssm, vsm)
    gap = (threshold - vsm).clamp_min(0.0)
    return nssm - weight * gap.square()


def linear_reward(nssm: Tensor, vsm: Tensor, weight: float) -> Tensor:
    """Linear trade-off baseline of the paper's Figure 6: ``weight·VSM + (1 − weight)·nSSM``."""
    nssm, vsm = _check_scores(nssm, vsm)
    return weight * vsm + (1.0 - weight) * nssm


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _best_matches(
    gen_sem: Tensor, gen_vis: Tensor, ref_sem: Tensor, ref_vis: Tensor, ref_inside: Tensor, rows_per_block: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """For every generated cell, over the reference cells inside the mask: the best semantic cosine and its index,
    and the best visual cosine. Returns three ``(B, N)`` tensors.

    A batch-1 reference mask first drops the reference cells outside it (a smaller matrix, no masking pass). The
    ``(B, N, N)`` similarities are never materialised whole but formed and reduced in blocks of generated rows, so
    each block stays in cache (a 48×48 grid has N = 2304; the full matrix of 21 images is 0.45 GB). When semantic
    and visual features are the same tensors (DINOv2), one similarity serves both.
    """
    shared = gen_vis is gen_sem and ref_vis is ref_sem
    gen_s = normalize_features(gen_sem).flatten(2).transpose(1, 2)  # (B, N, C)
    gen_v = gen_s if shared else normalize_features(gen_vis).flatten(2).transpose(1, 2)
    ref_s = normalize_features(ref_sem).flatten(2)  # (1 or B, C, N)
    ref_v = ref_s if shared else normalize_features(ref_vis).flatten(2)
    batch, n = gen_s.shape[:2]
    columns = masked = None
    if ref_inside.shape[0] == 1 and not ref_inside.all():
        columns = ref_inside[0].nonzero().squeeze(1)  # reference cells inside the (shared) mask
        ref_s, ref_v = ref_s[:, :, columns], (ref_s if shared else ref_v)[:, :, columns]
    elif not ref_inside.all():
        masked = ~ref_inside.unsqueeze(1)  # (B, 1, N): per-image reference masks
    if ref_s.shape[-1] == 0:  # empty reference mask: nothing can match
        empty = gen_s.new_full((batch, n), float("-inf"))
        return empty, torch.zeros(batch, n, dtype=torch.long, device=gen_s.device), empty

    if ref_s.shape[0] == 1:  # one reference for the group: (M, C) row-major makes `block @ ref.T` a single GEMM
        ref_s = ref_s[0].T.contiguous()
        ref_v = ref_s if shared else ref_v[0].T.contiguous()

    def block_sim(gen_tokens: Tensor, ref_tokens: Tensor, rows: slice) -> Tensor:
        block = gen_tokens[:, rows]
        if ref_tokens.dim() == 2:
            sim = (block.reshape(-1, block.shape[-1]) @ ref_tokens.T).view(batch, block.shape[1], -1)
        else:
            sim = block @ ref_tokens  # (B, rows, M)
        return sim if masked is None else sim.masked_fill(masked, float("-inf"))

    sem_score, sem_index, vis_score = [], [], []
    for start in range(0, n, rows_per_block):
        rows = slice(start, start + rows_per_block)
        score, index = block_sim(gen_s, ref_s, rows).max(dim=2)
        sem_score.append(score)
        sem_index.append(index)
        vis_score.append(score if shared else block_sim(gen_v, ref_v, rows).amax(dim=2))
    index = torch.cat(sem_index, 1)
    return torch.cat(sem_score, 1), (index if columns is None else columns[index]), torch.cat(vis_score, 1)


def _one_to_one(score: Tensor, match: Tensor, candidate: Tensor, num_targets: int) -> Tensor:
    """Keep, per matched reference cell, only the candidate with the highest score (lowest index on ties)."""
    batch, n = score.shape
    neg_inf = torch.full((batch, num_targets), float("-inf"), device=score.device)
    best = neg_inf.scatter_reduce(1, match, score.masked_fill(~candidate, float("-inf")), reduce="amax")
    winner = candidate & (score >= best.gather(1, match))
    index = torch.arange(n, device=score.device).expand(batch, n)
    first = torch.full((batch, num_targets), n, device=score.device, dtype=index.dtype)
    first = first.scatter_reduce(1, match, index.masked_fill(~winner, n), reduce="amin")
    return winner & (index == first.gather(1, match))


def _inside(mask: Tensor | None, batch: int, size: tuple[int, int], device, name: str) -> Tensor:
    if mask is None:
        return torch.ones(1, size[0] * size[1], dtype=torch.bool, device=device)
    _check_mask_batch(mask, batch, name)
    return resize_mask(mask.to(device), size, name).flatten(1)


def _check_grid(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) feature grid, got {shape}")


def _check_pair(gen: Tensor, ref: Tensor, gen_name: str, ref_name: str) -> None:
    _check_grid(gen, gen_name)
    _check_grid(ref, ref_name)
    if gen.shape[1] != ref.shape[1] or gen.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"{gen_name} {tuple(gen.shape)} and {ref_name} {tuple(ref.shape)} must have the same channels and grid "
            f"size; extract both with the same backbone"
        )
    if ref.shape[0] not in (1, gen.shape[0]):
        raise ValueError(
            f"{ref_name} has batch {ref.shape[0]}; it must be 1 (one reference for the group) or match "
            f"{gen_name}'s batch {gen.shape[0]}"
        )


def _check_mask_batch(mask: Tensor, batch: int, name: str) -> None:
    if mask.dim() != 3 or mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (1 or {batch}, H, W), got {tuple(mask.shape)}")


def _check_scores(nssm: Tensor, vsm: Tensor) -> tuple[Tensor, Tensor]:
    nssm = torch.as_tensor(nssm).float()
    vsm = torch.as_tensor(vsm).float()
    if torch.isnan(vsm).any() or torch.isnan(nssm).any():
        raise ValueError(
            "nssm or vsm contains NaN; a NaN score must not reach the reward (it would silently escape the "
            "identity gate). Check the scorer that produced it."
        )
    return nssm, vsm
