"""``EvalSuite``: which models compute which column of the paper's Table 1, and the scoring of one group.

A group is one (identity, prompt) condition: a reference, its optional subject mask, the prompt and the ``N``
samples a method generated for it. :meth:`EvalSuite.score_group` returns one value per sample for every configured
column; columns whose model is not configured are simply absent (the table shows "—"). Every model is an ordinary
object built from the config (``class_path`` / ``init_args``), so any column can use another model — the paper's
(CLIP ViT-L/14, DINOv2, MTG) on GPUs, weight-free or tiny ones offline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from divrl.eval import functional as EF
from divrl.eval.models import CLIPEmbedder, HPSv2, Segmenter
from divrl.images import ImageLike, to_image_batch, to_mask_batch
from divrl.rewards.backbones.base import FeatureBackbone
from divrl.rewards.base import Group, GroupScorer, NonFiniteReward, Reward

__all__ = ["EvalSuite", "COLUMNS", "MAX_SUBJECTS"]

MAX_SUBJECTS = 4
"""Per-subject columns SC-1 … SC-4 (PSRBench's largest subset has four subjects)."""

log = logging.getLogger(__name__)

COLUMNS: dict[str, tuple[str, str]] = {
    "clip_t": ("CLIP-T", "↑"),
    "clip_i": ("CLIP-I", "↑"),
    "dino": ("DINO", "↑"),
    "vsm": ("VSM", "↑"),
    "dino_nssm": ("DINO-nSSM", "↑"),
    "si_iou": ("si-IoU", "↓"),
    "mtg_nssm": ("MTG-nSSM", "↑"),
    "hps": ("HPS", "↑"),
    "sdino": ("sDINO", "↑"),
    "lpips": ("LPIPS", "↑"),
    "sc": ("SC", "↑"),
    **{f"sc_{k}": (f"SC-{k}", "↑") for k in range(1, MAX_SUBJECTS + 1)},
    "found": ("found", "↑"),
    "ref_found": ("ref found", "↑"),
    "subject_vsm": ("VSM/subject", "↑"),
    "subject_nssm": ("nSSM/subject", "↑"),
}
"""Per-sample columns in the paper's Table 1 order (then the extra ones): key → (header, better direction).
si-IoU is lower-is-better: a high value means the generated silhouette copies the reference's pose. The multi-subject
columns: SC (PSRBench's subject consistency, the mean over subjects), SC-k (subject k's), found (the fraction of
subjects detected), ref found (the fraction located in their references), VSM/subject and nSSM/subject (DivRL's components of every subject against its own reference,
averaged over subjects)."""

SINGLE_REFERENCE = ("clip_i", "dino", "sdino", "vsm", "mtg_nssm", "dino_nssm", "si_iou")
"""The columns that compare a sample with *the* reference: left empty for a condition with several references
(comparing with its first subject alone would mislead); the multi-subject columns score those."""


class EvalSuite:
    """The evaluation models and protocol.

    Args:
        identity: scorer of **VSM-τ** and **MTG-nSSM** (``MTGServerScorer`` for the paper's Mind-the-Glitch features,
            or a ``FeatureScorer``); use ``pool: 1`` for a ``FeatureScorer``: the paper evaluates the 48×48 grid
            without pooling. Both use the reference's subject mask.
        dino_nssm: scorer of **DINO-nSSM** (the paper: ``FeatureScorer`` on DINOv2-small, ``pool: 1``); its VSM is
            not used.
        clip: CLIP embedder for **CLIP-T** (sample vs prompt) and **CLIP-I** (sample vs reference).
        dino: backbone whose global embedding gives **DINO** (``DINOv2Backbone`` on ``facebook/dinov2-base`` with
            ``grid_size: 16``, i.e. 224²). Needs an ``embed(images)`` method.
        sdino: backbone whose patch grid gives **sDINO** (the paper: DINOv2-small), any ``FeatureBackbone`` (its
            ``visual`` grid: appearance; DINOv2 has one grid for both).
        lpips: LPIPS module (:class:`divrl.eval.lpips.LPIPS`); the column is the mean LPIPS over all pairs of the
            group's samples (diversity between samples), repeated on each sample's row.
        hps: :class:`~divrl.eval.models.HPSv2` (needs the ``hpsv2`` package).
        segmenter: masks of generated images, needed for **si-IoU** (the paper: Grounded-SAM-2). References without
            a mask in the data are segmented with it too. ``None``: no si-IoU.
        consistency_metric: the identity column of the trade-off plot: ``"vsm"`` (in domain), ``"sdino"`` (out
            of domain, the paper's DreamBench++ protocol), or for several subjects ``"sc"`` or ``"subject_vsm"``.
        consistency_threshold: a sample is consistent above it (paper: VSM 0.6, sDINO 0.75).
        diversity_metric: the column averaged over consistent samples (paper: MTG-nSSM).
        identity_skip_categories: categories left out of VSM and MTG-nSSM (paper: ``style``: a style reference has
            no subject to match); their rows hold no value for those columns.
        subject_consistency: PSRBench's **SC** and **SC-k** columns, **found** and **ref found**
            (:class:`~divrl.rewards.PairwiseSubjectConsistency`; PSR's protocol: Grounding DINO, ``order``, DINO v1
            CLS, ``on_missing: whole_image``). Scores every condition, one subject or several.
        per_subject: **VSM/subject** and **nSSM/subject** (:class:`~divrl.rewards.PerSubjectDivRL`; its components
            ``vsm`` and ``nssm``, the means over subjects).
        rewards: any rewards (:class:`~divrl.rewards.Reward`, e.g. the run's training reward) as further columns,
            higher is better: ``name: reward`` gives the column ``name``, each sample's reward in the group of its
            condition's samples. A group whose reward is not finite leaves its cells empty.
    """

    def __init__(
        self,
        identity: GroupScorer | None = None,
        dino_nssm: GroupScorer | None = None,
        clip: CLIPEmbedder | None = None,
        dino: FeatureBackbone | None = None,
        sdino: FeatureBackbone | None = None,
        lpips: torch.nn.Module | None = None,
        hps: HPSv2 | None = None,
        segmenter: Segmenter | None = None,
        consistency_metric: Literal["vsm", "sdino", "sc", "subject_vsm"] = "vsm",
        consistency_threshold: float = 0.6,
        diversity_metric: str = "mtg_nssm",
        identity_skip_categories: Sequence[str] = ("style",),
        subject_consistency: Reward | None = None,
        per_subject: Reward | None = None,
        rewards: dict[str, Reward] | None = None,
    ):
        if consistency_metric not in CONSISTENCY:
            raise ValueError(
                f"EvalSuite: consistency_metric must be one of {list(CONSISTENCY)}, got {consistency_metric!r}"
            )
        if diversity_metric not in COLUMNS:
            raise ValueError(f"EvalSuite: diversity_metric must be one of {sorted(COLUMNS)}, got {diversity_metric!r}")
        if dino is not None and not hasattr(dino, "embed"):
            raise TypeError(
                f"EvalSuite: dino must have an embed(images) method (DINOv2Backbone), got {type(dino).__name__}"
            )
        self.identity = identity
        self.dino_nssm = dino_nssm
        self.clip = clip
        self.dino = dino
        self.sdino = sdino
        self.lpips = lpips
        self.hps = hps
        self.segmenter = segmenter
        self.subject_consistency = subject_consistency
        self.per_subject = per_subject
        self.consistency_metric = consistency_metric
        self.consistency_threshold = float(consistency_threshold)
        self.diversity_metric = diversity_metric
        self.identity_skip_categories = set(identity_skip_categories)
        self.rewards = dict(rewards or {})
        clash = sorted(set(self.rewards) & set(COLUMNS))
        if clash:
            raise ValueError(f"EvalSuite: rewards {clash} have the names of built-in columns; rename them")
        needed = {consistency_metric: "consistency_metric", diversity_metric: "diversity_metric"}
        for column, field in needed.items():
            if column not in self.columns:
                raise ValueError(
                    f"EvalSuite: {field} is {column!r} but no model computes that column; configure "
                    f"{_SOURCE[column]!r} or choose another {field}"
                )

    @property
    def columns(self) -> list[str]:
        """The configured per-sample columns, in table order, then the rewards'."""
        return [column for column in COLUMNS if getattr(self, _SOURCE[column]) is not None] + list(self.rewards)

    def header(self, column: str) -> str:
        """The table header of ``column`` (VSM carries its visual threshold, as the paper's VSM-0.7)."""
        if column not in COLUMNS:
            return f"{column} ↑"
        name, arrow = COLUMNS[column]
        if column == "vsm" and getattr(self.identity, "tau_v", None) is not None:
            name = f"VSM-{self.identity.tau_v:g}"
        return f"{name} {arrow}"

    def describe(self) -> dict[str, str]:
        """Which model computes each configured column (written into metrics.json and table.md)."""
        models = {column: getattr(self, source) for column, source in _SOURCE.items()}
        return {column: _describe(models.get(column) or self.rewards[column]) for column in self.columns}

    def to(self, device: torch.device | str) -> EvalSuite:
        for model in [
            *(
                getattr(self, n)
                for n in (
                    "identity",
                    "dino_nssm",
                    "clip",
                    "dino",
                    "sdino",
                    "lpips",
                    "subject_consistency",
                    "per_subject",
                )
            ),
            *self.rewards.values(),
        ]:
            if isinstance(model, torch.nn.Module):
                model.to(device)
        return self

    @torch.no_grad()
    def score_group(
        self,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        prompt: str,
        ref_mask: ImageLike | None = None,
        category: str | None = None,
        sample=None,
    ) -> dict[str, list[float]]:
        """One value per sample for every configured column (``None`` where a column does not cover the category).

        Args:
            reference: the reference image.
            images: the group's ``N`` samples.
            prompt: the prompt they were generated for (CLIP-T, HPS).
            ref_mask: the reference's subject mask (from the data); segmented when ``None`` and a segmenter is set.
            category: the identity's category (``identity_skip_categories`` leave VSM and MTG-nSSM out).
            sample: the condition as a :class:`~divrl.data.stream.ConditionSample` (its metadata and every reference)
                for the ``rewards`` columns; by default one built from the arguments above.
        """
        ref = to_image_batch(reference, "reference")
        gen = to_image_batch(images, "images")
        n = gen.shape[0]
        if sample is None:
            from divrl.data.stream import ConditionSample

            sample = ConditionSample("eval", prompt, [reference], [ref_mask], category)
        out: dict[str, Tensor] = self._score_subjects(sample, gen)
        gen_clip = self.clip.embed_images(gen) if self.clip is not None else None
        out.update(self._score_any_reference(gen, prompt, n, gen_clip))
        if len(sample.references) > 1:  # several subjects: no column compares with one reference
            out.update(self._score_rewards(sample, gen))
            return self._rows(out, n, skip=SINGLE_REFERENCE)
        mask = to_mask_batch(ref_mask, "ref_mask")
        if mask is None and self.segmenter is not None:
            mask = self.segmenter(ref)
        if self.clip is not None:
            out["clip_i"] = EF.cosine(gen_clip, self.clip.embed_images(ref))
        if self.dino is not None:
            out["dino"] = EF.cosine(self.dino.embed(gen), self.dino.embed(ref))
        if self.sdino is not None:
            out["sdino"] = EF.patch_similarity(self.sdino(gen).visual, self.sdino(ref).visual)  # appearance features
        usable = mask is None or _covers(mask)
        if not usable:  # an empty or tiny subject mask: the masked scores are undefined for this reference
            log.warning(
                "reference %r: its subject mask is empty or tiny; VSM, nSSM and si-IoU left out for it",
                getattr(reference, "filename", "") or prompt,
            )
        if self.identity is not None and category not in self.identity_skip_categories and usable:
            scores = self.identity.score_group(ref[0], gen, ref_mask=mask)
            out["vsm"], out["mtg_nssm"] = scores.vsm, scores.nssm
        if self.dino_nssm is not None and usable:
            out["dino_nssm"] = self.dino_nssm.score_group(ref[0], gen, ref_mask=mask, need_vsm=False).nssm
        if self.segmenter is not None and mask is not None and usable:
            gen_masks = torch.as_tensor(self.segmenter(gen)).cpu()  # a GPU segmenter's masks meet the CPU mask
            out["si_iou"] = EF.scale_invariant_iou(gen_masks, mask.cpu())
        out.update(self._score_rewards(sample, gen))
        return self._rows(out, n)

    def _rows(self, out: dict[str, Tensor], n: int, skip: Sequence[str] = ()) -> dict[str, list[float | None]]:
        return {
            column: [_float(v) for v in out[column].flatten().tolist()]
            if column in out and column not in skip
            else [None] * n
            for column in self.columns
        }

    def _score_any_reference(self, gen: Tensor, prompt: str, n: int, gen_clip: Tensor | None) -> dict[str, Tensor]:
        """The columns that do not look at a reference: CLIP-T (from the samples' CLIP embeddings), HPS, LPIPS."""
        out: dict[str, Tensor] = {}
        if self.clip is not None:
            out["clip_t"] = EF.cosine(gen_clip, self.clip.embed_texts([prompt]))
        if self.hps is not None:
            out["hps"] = self.hps(gen, prompt)
        if self.lpips is not None:
            device = next(self.lpips.parameters()).device
            out["lpips"] = torch.full((n,), float(self.lpips.pairwise(gen.to(device))) if n > 1 else float("nan"))
        return out

    def _score_subjects(self, sample, gen: Tensor) -> dict[str, Tensor]:
        """SC, SC-k and found; VSM/subject and nSSM/subject. A non-finite score leaves its cells empty (logged)."""
        out: dict[str, Tensor] = {}
        if len(sample.references) > MAX_SUBJECTS:
            log.warning(
                "condition %r has %d subjects; the SC-k columns stop at %d",
                sample.id,
                len(sample.references),
                MAX_SUBJECTS,
            )
        sc = {
            "reward": "sc",
            "found": "found",
            "ref_found": "ref_found",
            **{f"sc_{k}": f"sc_{k}" for k in range(1, MAX_SUBJECTS + 1)},
        }
        for model, names in (
            (self.subject_consistency, sc),
            (self.per_subject, {"vsm": "subject_vsm", "nssm": "subject_nssm"}),
        ):
            if model is None:
                continue
            try:
                scored = model(Group(sample, gen))
            except NonFiniteReward as err:
                log.warning("%s on %r: %s", type(model).__name__, sample.id, err)
                continue
            values = {"reward": scored.reward, **scored.components}
            out.update({column: values[key] for key, column in names.items() if key in values})
        return out

    def _score_rewards(self, sample, gen: Tensor) -> dict[str, Tensor]:
        if not self.rewards:
            return {}
        group = Group(sample, gen)
        out: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            try:
                scored = reward(group)
            except NonFiniteReward as err:  # the cells stay empty; logged, never a score of 0
                log.warning("reward column %r: %s", name, err)
                continue
            out[name] = scored.reward
        return out


_SOURCE = {
    "clip_t": "clip",
    "clip_i": "clip",
    "dino": "dino",
    "vsm": "identity",
    "mtg_nssm": "identity",
    "dino_nssm": "dino_nssm",
    "si_iou": "segmenter",
    "hps": "hps",
    "sdino": "sdino",
    "lpips": "lpips",
    "sc": "subject_consistency",
    "found": "subject_consistency",
    "ref_found": "subject_consistency",
    "subject_vsm": "per_subject",
    "subject_nssm": "per_subject",
    **{f"sc_{k}": "subject_consistency" for k in range(1, MAX_SUBJECTS + 1)},
}

CONSISTENCY = ("vsm", "sdino", "sc", "subject_vsm")
"""The columns ``consistency_metric`` may name."""


def _covers(mask: Tensor, min_fraction: float = 0.005) -> bool:
    """Whether a subject mask covers enough of the image to score with (0.5% of the pixels: 2 cells of a 24×24
    grid, what the masked nSSM needs)."""
    return bool((mask > 0.5).float().mean() >= min_fraction)


_SETTINGS = (
    "name",
    "url",
    "pool",
    "tau_s",
    "tau_v",
    "grid_size",
    "assignment",
    "reference_crop",
    "on_missing",
    "missing_score",
    "box_threshold",
    "text_threshold",
    "sort_by_score",
    "threshold",
    "min_area",
    "resize",
    "crop",
    "size",
    "features",
    "crop_size",
    "gate",
    "weight",
)
_PARTS = ("backbone", "scorer", "locator", "detector", "embedder")


def _describe(model) -> str:
    """The model and every setting that changes its scores, its parts described in brackets (what a resumed
    evaluation compares before reusing earlier scores)."""
    if model is None:
        return "not configured"
    parts = [type(model).__name__]
    for attr in _SETTINGS:
        value = getattr(model, attr, None)
        if isinstance(value, (str, int, float)) and not callable(value):
            parts.append(f"{attr}={value}")
    for attr in _PARTS:
        value = getattr(model, attr, None)
        if isinstance(value, torch.nn.Module):
            parts.append(f"{attr}=({_describe(value)})" if attr != "backbone" else f"backbone={_describe(value)}")
    return " ".join(parts)


def _float(value) -> float | None:
    value = float(value)
    return None if value != value else value
