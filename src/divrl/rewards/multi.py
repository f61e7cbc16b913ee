"""Rewards for several subjects per condition: PSR's pairwise subject consistency and DivRL per subject.

Both find every subject in the generated images with a :class:`~divrl.rewards.subjects.SubjectLocator` (a detector
and an assignment of boxes to subjects) and compare each subject's crop with its own reference:

- :class:`PairwiseSubjectConsistency` (PSR, docs/reference.md "Multi-subject generation"): the mean over subjects of
  the cosine between the subject's crop and its reference's crop, in DINO CLS features;
- :class:`PerSubjectDivRL`: nSSM and VSM of each subject's crop against its own reference, the identity gate applied
  to every subject — the identity-diversity paradox measured per subject.

A subject that is not detected is counted (the component ``found``: the fraction of subjects found in each image) and
either cropped as the whole image (``on_missing: whole_image``, PSR's fallback) or scored ``missing_score``
(``on_missing: score``). A subject not located in its own reference is cropped as the whole reference, counted in
``ref_found`` and logged. A condition with one reference is scored the same way (one subject).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from divrl.images import to_mask_batch
from divrl.rewards import functional as RF
from divrl.rewards.backbones.base import Features
from divrl.rewards.base import Group, GroupScorer, NonFiniteReward, Reward, RewardOutput
from divrl.rewards.embedders import Embedder, resize
from divrl.rewards.scorers import FeatureScorer
from divrl.rewards.subjects import Located, SubjectLocator, crop, subject_words

__all__ = ["PairwiseSubjectConsistency", "PerSubjectDivRL"]

OnMissing = Literal["whole_image", "score"]


class _SubjectReward(Reward):
    """Shared by the multi-subject rewards: the locator, what a missing subject does, the subjects of a group."""

    def __init__(self, locator: SubjectLocator, on_missing: OnMissing, missing_score: float):
        super().__init__()
        if not isinstance(locator, SubjectLocator):
            raise TypeError(f"{type(self).__name__}: locator must be a SubjectLocator, got {type(locator).__name__}")
        if on_missing not in ("whole_image", "score"):
            raise ValueError(
                f"{type(self).__name__}: on_missing must be 'whole_image' (PSR's fallback) or 'score', "
                f"got {on_missing!r}"
            )
        self.locator, self.on_missing, self.missing_score = locator, on_missing, float(missing_score)

    def words(self, group: Group) -> list[str]:
        return subject_words(group.sample, self.locator.detector.class_agnostic)


class PairwiseSubjectConsistency(_SubjectReward):
    """PSR's reward: ``R = mean_k cos(E(crop_k(image)), E(crop_k(reference_k)))`` over the ``K`` subjects.

    Components: ``sc_k`` (the cosine of subject *k*, 1-based as the reference frames), ``found_k`` (1 where subject
    *k* was detected, else 0; logged per subject), ``found`` (the fraction of subjects detected in the image) and ``ref_found`` (the fraction located in their references; the others are
    cropped as the whole reference).

    Args:
        locator: finds the subjects (PSR: Grounding DINO, ``order``; the demo: the plain-background detector).
        embedder: the crop features (PSR: :class:`~divrl.rewards.subject_models.CLSEmbedder`, DINO v1 ViT-S/16);
            ``None`` uses the locator's embedder.
        on_missing: a subject not found in an image is cropped as the whole image (``whole_image``, PSR's official
            evaluation) or scores ``missing_score`` (``score``; UMO counts an unmatched subject −1).
        missing_score: the cosine of a missing subject under ``on_missing: score``.
    """

    def __init__(
        self,
        locator: SubjectLocator,
        embedder: Embedder | None = None,
        on_missing: OnMissing = "whole_image",
        missing_score: float = -1.0,
    ):
        super().__init__(locator, on_missing, missing_score)
        embedder = embedder if embedder is not None else locator.embedder
        if not isinstance(embedder, Embedder):
            raise TypeError(
                f"PairwiseSubjectConsistency: embedder must be an Embedder (or None to use the locator's), "
                f"got {type(embedder).__name__}"
            )
        self.embedder = embedder

    def forward(self, group: Group) -> RewardOutput:
        words = self.words(group)
        references, boxes, ref_found = self.locator.references(group.references, group.masks, words, group.sample.id)
        ref_crops = [crop(r, b) for r, b in zip(references, boxes)]
        ref_features = self.embedder(ref_crops)  # (K, D)
        where = self.locator.locate(group.images, words, self.locator_features(ref_crops, ref_features))
        count = len(words)
        if where.similarity is not None and self.locator.embedder is self.embedder:
            cosine = where.similarity.clone()  # the matching's own cosines: no second embedding
        else:
            crops = [crop(group.images[n], where.boxes[n, k]) for n in range(group.size) for k in range(count)]
            features = self.embedder(crops).reshape(group.size, count, -1)
            cosine = (features * ref_features[None]).sum(-1)
        unfound = ~where.found
        if unfound.any():
            if self.on_missing == "score":
                cosine[unfound] = self.missing_score
            elif where.similarity is not None and self.locator.embedder is self.embedder:
                rows = unfound.any(1).nonzero().flatten()  # PSR's fallback: the whole image, embedded only if needed
                whole = self.embedder(list(group.images[rows])) @ ref_features.T  # (rows, K)
                cosine[rows] = torch.where(unfound[rows], whole, cosine[rows])
        components = {f"sc_{k + 1}": cosine[:, k] for k in range(count)}
        components.update({f"found_{k + 1}": where.found[:, k].float() for k in range(count)})
        components["found"] = where.found.float().mean(1)
        components["ref_found"] = ref_found.float().mean().expand(group.size)
        return RewardOutput(cosine.mean(1), components)

    def locator_features(self, ref_crops: list[Tensor], own: Tensor) -> Tensor | None:
        """The references' features in the locator's embedder (``hungarian`` matches in its space), reusing ours when
        it is the same embedder."""
        if self.locator.assignment != "hungarian":
            return None
        return own if self.locator.embedder is self.embedder else self.locator.embedder(ref_crops)


class PerSubjectDivRL(_SubjectReward):
    """DivRL per subject: nSSM and VSM of every subject's crop against its own reference, and the identity gate on
    every subject.

    Each subject's crops (reference and generated, and the reference's mask cropped with it) are resized to
    ``crop_size`` and scored by ``scorer`` (:class:`~divrl.rewards.FeatureScorer`). Stage 1 (``gate: false``):
    ``R = mean_k nSSM_k``. Stage 2 (``gate: true``): ``R = mean_k [nSSM_k − λ·(s − VSM_k)²·1(VSM_k < s)]``, and a
    sample is gated when any subject fails the gate.

    Components: ``nssm`` and ``vsm`` (the means over subjects), ``nssm_k`` and ``vsm_k`` per subject (1-based),
    ``found`` and ``ref_found`` (as :class:`PairwiseSubjectConsistency`). A subject scored under ``on_missing: score`` gets nSSM 0 and VSM ``missing_score`` (default 0: not
    itself, so the gate fires).

    Args:
        locator: finds the subjects; with ``hungarian`` it needs its own embedder.
        scorer: nSSM / VSM of one subject's crops (a :class:`~divrl.rewards.GroupScorer`).
        gate: apply the identity gate (DivRL stage 2, R2) or not (stage 1, R1).
        threshold: the gate ``s`` (paper: 0.5).
        weight: the penalty ``λ`` (paper: 5).
        crop_size: the side the crops are resized to before the scorer.
        on_missing: see :class:`PairwiseSubjectConsistency`.
        missing_score: the VSM of a missing subject under ``on_missing: score``.
    """

    def __init__(
        self,
        locator: SubjectLocator,
        scorer: GroupScorer,
        gate: bool = True,
        threshold: float = 0.5,
        weight: float = 5.0,
        crop_size: int = 64,
        on_missing: OnMissing = "whole_image",
        missing_score: float = 0.0,
    ):
        super().__init__(locator, on_missing, missing_score)
        if not isinstance(scorer, GroupScorer):
            raise TypeError(
                f"PerSubjectDivRL: scorer must be a GroupScorer (FeatureScorer...), got {type(scorer).__name__}"
            )
        self.scorer, self.gate, self.threshold, self.weight, self.crop_size = scorer, gate, threshold, weight, crop_size

    def forward(self, group: Group) -> RewardOutput:
        words = self.words(group)
        references, boxes, ref_found = self.locator.references(group.references, group.masks, words, group.sample.id)
        ref_crops = [crop(r, b) for r, b in zip(references, boxes)]
        ref_features = None
        if self.locator.assignment == "hungarian":
            ref_features = self.locator.embedder(ref_crops)
        where: Located = self.locator.locate(group.images, words, ref_features)
        count = len(words)
        refs = torch.cat([resize(c, self.crop_size) for c in ref_crops])  # (K, 3, S, S)
        gens = torch.cat(
            [
                resize(crop(group.images[n], where.boxes[n, k]), self.crop_size)
                for k in range(count)
                for n in range(group.size)
            ]
        )  # (K·G, 3, S, S), subject-major
        features = self._features(torch.cat([refs, gens]))  # every crop of the group in one backbone call
        nssm, vsm = [], []
        for k, word in enumerate(words):
            mask = group.masks[k]
            if mask is not None:
                mask = to_mask_batch(mask, f"mask {k}")
                if tuple(mask.shape[-2:]) != tuple(references[k].shape[-2:]):
                    raise ValueError(
                        f"{group.sample.id!r}: mask {k} has size {tuple(mask.shape[-2:])} but reference {k} "
                        f"{tuple(references[k].shape[-2:])}; resize the mask to its reference"
                    )
                mask = crop(mask, boxes[k])[None]  # (1, 1, h, w)
                mask = F.interpolate(mask, size=(self.crop_size,) * 2, mode="bilinear", align_corners=False)[0, 0]
            rows = slice(k * group.size, (k + 1) * group.size)  # subject k's crops in `gens`
            if features is None:
                parts = self.scorer.score_group(refs[k : k + 1], gens[rows], mask, need_nssm=True, need_vsm=True)
            else:  # features hold the K references first, then `gens`
                gen_rows = slice(count + rows.start, count + rows.stop)
                parts = self.scorer.score_features(
                    _rows(features, slice(k, k + 1)), _rows(features, gen_rows), mask, need_nssm=True, need_vsm=True
                )
            for name, value in parts._asdict().items():
                if value is None or not torch.isfinite(value).all():
                    raise NonFiniteReward(
                        f"PerSubjectDivRL: {type(self.scorer).__name__} returned {name} "
                        f"{None if value is None else value.tolist()} for subject {k + 1} ({word!r})"
                    )
            found = where.found[:, k]
            if self.on_missing == "score":
                parts = parts._replace(
                    nssm=torch.where(found, parts.nssm, torch.zeros_like(parts.nssm)),
                    vsm=torch.where(found, parts.vsm, torch.full_like(parts.vsm, self.missing_score)),
                )
            nssm.append(parts.nssm.float())
            vsm.append(parts.vsm.float())
        nssm_k, vsm_k = torch.stack(nssm, 1), torch.stack(vsm, 1)  # (G, K)
        if self.gate:
            reward = RF.gated_reward(nssm_k, vsm_k, self.threshold, self.weight).mean(1)
            gated = (vsm_k < self.threshold).any(1)
        else:
            reward, gated = nssm_k.mean(1), torch.zeros(group.size, dtype=torch.bool)
        components = {"nssm": nssm_k.mean(1), "vsm": vsm_k.mean(1)}
        for k in range(len(words)):
            components[f"nssm_{k + 1}"], components[f"vsm_{k + 1}"] = nssm_k[:, k], vsm_k[:, k]
        components["found"] = where.found.float().mean(1)
        components["ref_found"] = ref_found.float().mean().expand(group.size)
        return RewardOutput(reward, components, gated)

    def _features(self, crops: Tensor) -> Features | None:
        """The backbone features of every crop, when the scorer is a local :class:`~divrl.rewards.FeatureScorer`
        (else ``None``: each subject is scored with ``score_group``, e.g. by a reward server)."""
        if isinstance(self.scorer, FeatureScorer) and type(self.scorer).score_group is FeatureScorer.score_group:
            return self.scorer.backbone(crops)
        return None  # a scorer that scores groups its own way keeps doing so


def _rows(features: Features, rows: slice) -> Features:
    """Some rows of a batch's features, keeping a shared semantic/visual grid shared (one similarity in VSM)."""
    semantic = features.semantic[rows]
    return Features(semantic, semantic if features.visual is features.semantic else features.visual[rows])
