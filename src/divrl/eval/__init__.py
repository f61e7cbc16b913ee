"""Evaluation of subject-driven generators: the DivRL paper's Table 1 metrics, trade-off plot and reports.

- :mod:`divrl.eval.functional`: the metrics as tensor functions (cosine, sDINO patch similarity, scale-invariant
  IoU, consistency ratio, diversity over consistency).
- :mod:`divrl.eval.models`: CLIP embedder, HPSv2, segmenters; :mod:`divrl.eval.lpips`: LPIPS without torchvision.
- :class:`EvalSuite`: which model computes which column; :class:`ConsistencyDiversity`: the trade-off point as a
  torchmetrics ``Metric``.
- :class:`Evaluation`: generate or read samples, score them, write ``metrics.json``, ``table.md``, ``frontier.png``
  and grids (``divrl evaluate``).
"""

from divrl.eval.functional import (
    consistency_ratio,
    cosine,
    diversity_over_consistency,
    patch_similarity,
    scale_invariant_iou,
)
from divrl.eval.lpips import LPIPS
from divrl.eval.metrics import ConsistencyDiversity, summarize
from divrl.eval.models import (
    BackgroundSegmenter,
    CallableSegmenter,
    CLIPEmbedder,
    HPSv2,
    Segmenter,
)
from divrl.eval.runner import EvalCondition, Evaluation, data_conditions, samples_layout
from divrl.eval.suite import COLUMNS, EvalSuite

__all__ = [
    "cosine",
    "patch_similarity",
    "scale_invariant_iou",
    "consistency_ratio",
    "diversity_over_consistency",
    "ConsistencyDiversity",
    "summarize",
    "CLIPEmbedder",
    "HPSv2",
    "LPIPS",
    "Segmenter",
    "BackgroundSegmenter",
    "CallableSegmenter",
    "EvalSuite",
    "COLUMNS",
    "Evaluation",
    "EvalCondition",
    "data_conditions",
    "samples_layout",
]
