"""Finding each subject of a multi-subject condition in its reference and in the generated images.

A multi-subject condition has ``K`` references, one per subject, and names each subject's *category word* in its
identity's JSON (``"subjects": ["dog", "backpack"]``, see :func:`subject_words`). The multi-subject rewards
(:mod:`divrl.rewards.multi`) crop every subject out of every image and compare the crop with its own reference.
Three pieces do that, each pluggable:

- a :class:`Detector` finds boxes by category word: :class:`PlainBackgroundDetector` (weight-free, for subjects on a
  plain background: the demo world), :class:`CallableDetector` (any function), and
  :class:`~divrl.rewards.subject_models.GroundingDINODetector` (PSR's open-vocabulary detector, through transformers);
- an :class:`~divrl.rewards.embedders.Embedder` turns a crop into one L2-normalised vector:
  :class:`~divrl.rewards.embedders.BackboneEmbedder` (the mean of any
  :class:`~divrl.rewards.backbones.FeatureBackbone`'s grid: DINOv2, the weight-free dense descriptor) and
  :class:`~divrl.rewards.subject_models.CLSEmbedder` (the CLS token of DINO v1 / DINOv2 through transformers, PSR's
  feature);
- a :class:`SubjectLocator` assigns boxes to subjects: PSR's ``order`` (subject *i* takes the first box of its word;
  two subjects of one word take boxes 0 and 1, as PSR's two-subject evaluation; its three- and four-subject scripts
  give every subject box 0, which ``order`` does not copy) or ``hungarian`` (UMO: every detected box is a candidate,
  and subjects and boxes are matched one to one by maximal total similarity to the references).

A subject that is not found is **counted** (``found`` is False) and then either cropped as the whole image (PSR's
fallback) or scored ``missing_score`` — never silently.

Boxes are float ``(x0, y0, x1, y1)`` in pixels of the image they were found in (x1, y1 exclusive).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from divrl.images import ImageLike, to_image_batch, to_mask_batch
from divrl.rewards.compose import _import
from divrl.rewards.embedders import Embedder

log = logging.getLogger(__name__)

__all__ = [
    "Detector",
    "CallableDetector",
    "PlainBackgroundDetector",
    "SubjectLocator",
    "Located",
    "subject_words",
    "crop",
    "box_of_mask",
]


def subject_words(sample, class_agnostic: bool = False) -> list[str]:
    """The category word of each of ``sample``'s references, in reference order.

    Read from the identity's JSON field ``subjects`` (a list, one word per reference; written by ``divrl data
    psrbench`` and the synthetic multi-subject world). A single-reference identity without it uses its ``subject`` or
    ``class`` field, or its category. A class-agnostic detector needs no words (``"object"`` each).

    Raises:
        ValueError: ``subjects`` does not have one word per reference, or no word is known and the detector needs one.
    """
    count = len(sample.references)
    words = sample.metadata.get("subjects")
    if words is not None:
        if (
            not isinstance(words, (list, tuple))
            or len(words) != count
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise ValueError(
                f"identity {sample.id!r}: 'subjects' must list one category word per reference ({count}), got {words!r}"
            )
        return [w.strip() for w in words]
    if count == 1:
        word = sample.metadata.get("subject") or sample.metadata.get("class") or sample.category
        if word:
            return [str(word)]
    if class_agnostic:
        return ["object"] * count
    raise ValueError(
        f"identity {sample.id!r} has {count} reference(s) but no category words; list them in its JSON as "
        f"'subjects': [one word per reference] (the detector finds each subject by its word)"
    )


# ---------------------------------------------------------------------------------------------------- boxes


def crop(image: Tensor, box: Tensor) -> Tensor:
    """The pixels of ``image`` ``(3, H, W)`` inside ``box``: every coordinate truncated to a whole pixel as PSR's
    evaluation does (``image[int(y0):int(y1), int(x0):int(x1)]``), clamped to the image, at least one pixel."""
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = (int(np.floor(float(v))) for v in box[:4])
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    return image[..., y0:y1, x0:x1]


def box_of_mask(mask: Tensor, threshold: float = 0.5) -> Tensor | None:
    """The tight box of a mask's pixels above ``threshold`` (``(H, W)``), or ``None`` when it is empty."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _fingerprint(image) -> str | None:
    """A digest of an image's content (tensor or PIL), the reference-box cache's key."""
    if image is None:
        return None
    data = (
        image.detach().cpu().contiguous().numpy().tobytes()
        if isinstance(image, Tensor)
        else np.asarray(image).tobytes() + str(getattr(image, "mode", "")).encode()
    )
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def whole(image: Tensor) -> Tensor:
    """The box of the whole image."""
    return torch.tensor([0.0, 0.0, float(image.shape[-1]), float(image.shape[-2])])


def _iou(a: Tensor, b: Tensor) -> float:
    ix = max(0.0, min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0])))
    iy = max(0.0, min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1])))
    inter = ix * iy
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------------- detectors


class Detector(nn.Module):
    """Base class: find the subjects a category word names in a batch of images.

    Subclasses implement :meth:`detect`. Calling the module runs it without gradients and checks its output.
    """

    class_agnostic: bool = False
    """The detector ignores the word and returns every subject it sees (in :meth:`detect`'s order)."""

    def detect(self, images: Tensor, word: str) -> list[Tensor]:  # pragma: no cover - abstract
        """Boxes of ``word`` in each of ``images`` (float ``(N, 3, H, W)`` in [0, 1]): one float ``(n_i, 4)`` tensor of
        ``(x0, y0, x1, y1)`` pixel boxes per image, in the detector's order (``n_i`` may be 0). Calling the detector
        drops boxes without area and refuses malformed output with an error naming the detector."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: ImageLike, word: str) -> list[Tensor]:
        batch = to_image_batch(images, "images")
        boxes = self.detect(batch, word)
        who = type(self).__name__
        if not isinstance(boxes, (list, tuple)) or len(boxes) != batch.shape[0]:
            raise ValueError(
                f"{who}.detect returned {type(boxes).__name__} of length "
                f"{len(boxes) if hasattr(boxes, '__len__') else '?'} for {batch.shape[0]} images; expected a "
                f"list with one (n, 4) tensor of boxes per image"
            )
        out = []
        for index, b in enumerate(boxes):
            try:
                b = torch.as_tensor(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(
                    f"{who}.detect returned {b!r} for image {index} ({err}); expected finite (n, 4) "
                    f"(x0, y0, x1, y1) pixel boxes"
                ) from err
            if b.numel() == 0:
                b = torch.zeros(0, 4)
            elif b.dim() == 1 and b.numel() == 4:
                b = b[None]
            if b.dim() != 2 or b.shape[-1] != 4 or not torch.isfinite(b).all():
                raise ValueError(
                    f"{who}.detect returned boxes {b.tolist()} for image {index}; expected finite (n, 4) "
                    f"(x0, y0, x1, y1) pixel boxes"
                )
            out.append(b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])])  # a box without area holds no subject
        return out


class CallableDetector(Detector):
    """Any function ``fn(images, word) -> boxes`` as a detector.

    Args:
        fn: the function (or an importable dotted path to it): ``images`` float ``(N, 3, H, W)`` in [0, 1], the
            category word; returns one ``(n, 4)`` array of ``(x0, y0, x1, y1)`` pixel boxes per image, best first.
        class_agnostic: the function ignores the word (see :attr:`Detector.class_agnostic`).
    """

    def __init__(self, fn: Callable | str, class_agnostic: bool = False):
        super().__init__()
        self.fn = _import(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableDetector: fn must be callable, got {self.fn!r}")
        self.class_agnostic = class_agnostic

    def detect(self, images: Tensor, word: str) -> list[Tensor]:
        return list(self.fn(images, word))


class PlainBackgroundDetector(Detector):
    """A weight-free detector for subjects on a plain background (the synthetic demo world, product shots).

    The background colour is the median of the image's border pixels; a pixel is foreground when one of its channels
    differs from it by more than ``threshold``; every 8-connected foreground region of at least ``min_area`` of the
    image is a subject. Boxes are returned **left to right** (by their centres), so with PSR's ``order`` assignment the
    subjects are read in the order a prompt like "A on the left and B on the right" names them. Class-agnostic: the
    word is ignored.

    Args:
        threshold: the per-channel colour difference (in [0, 1]) that makes a pixel foreground.
        min_area: the smallest subject, as a fraction of the image's pixels (smaller regions are noise).
        border: the width in pixels of the frame whose median colour is the background.
    """

    class_agnostic = True

    def __init__(self, threshold: float = 0.15, min_area: float = 0.01, border: int = 1):
        super().__init__()
        if not 0 < threshold < 1 or not 0 <= min_area < 1 or border < 1:
            raise ValueError(
                f"PlainBackgroundDetector: need 0 < threshold < 1, 0 <= min_area < 1 and border >= 1, got "
                f"{threshold}, {min_area}, {border}"
            )
        self.threshold, self.min_area, self.border = threshold, min_area, border

    def detect(self, images: Tensor, word: str) -> list[Tensor]:
        from scipy import ndimage

        out = []
        for image in images.detach().float().cpu():
            b = self.border
            frame = torch.cat(
                [
                    image[:, :b].reshape(3, -1),
                    image[:, -b:].reshape(3, -1),
                    image[:, :, :b].reshape(3, -1),
                    image[:, :, -b:].reshape(3, -1),
                ],
                dim=1,
            )
            background = frame.median(dim=1).values
            foreground = ((image - background[:, None, None]).abs().amax(0) > self.threshold).numpy()
            labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
            boxes = []
            for index, region in enumerate(ndimage.find_objects(labels), start=1):
                area = int((labels[region] == index).sum())
                if area >= max(1, self.min_area * foreground.size):
                    ys, xs = region
                    boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            boxes.sort(key=lambda q: (q[0] + q[2], q[1] + q[3]))
            out.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        return out


# ---------------------------------------------------------------------------------------------------- assignment


@dataclass
class Located:
    """Where each subject is in each image.

    Attributes:
        boxes: ``(N, K, 4)`` the box of subject *k* in image *n* (the whole image where it was not found).
        found: ``(N, K)`` bool, the subject was detected (and, under ``hungarian``, matched).
        similarity: ``(N, K)`` cosine of the crop's embedding with its reference's, when the locator computed it
            (``hungarian``); else ``None``.
    """

    boxes: Tensor
    found: Tensor
    similarity: Tensor | None = None


class SubjectLocator(nn.Module):
    """Assigns detected boxes to the ``K`` subjects of a condition.

    Args:
        detector: finds boxes by category word.
        assignment: ``order`` (PSR: subject *k* takes the first box of its word, the *j*-th subject of one word takes
            box *j*; a class-agnostic detector's boxes are taken in its order) or ``hungarian`` (UMO: all boxes of all
            the words are candidates, boxes overlapping an earlier one by IoU > 0.7 dropped, and subjects and
            candidates matched one to one by maximal total cosine with the references; needs ``embedder``).
        embedder: the crop features ``hungarian`` matches with.
        reference_crop: where a subject is in its reference: ``auto`` (the box of its mask when the reference has
            one, else detected), ``detect`` (PSR), ``whole`` (the whole reference).
    """

    def __init__(
        self,
        detector: Detector,
        assignment: Literal["order", "hungarian"] = "order",
        embedder: Embedder | None = None,
        reference_crop: Literal["auto", "detect", "whole"] = "auto",
    ):
        super().__init__()
        if assignment not in ("order", "hungarian"):
            raise ValueError(f"assignment must be 'order' (PSR) or 'hungarian' (UMO), got {assignment!r}")
        if reference_crop not in ("auto", "detect", "whole"):
            raise ValueError(f"reference_crop must be 'auto', 'detect' or 'whole', got {reference_crop!r}")
        if assignment == "hungarian" and embedder is None:
            raise ValueError("assignment 'hungarian' matches crops to references by their features; give an embedder")
        if not isinstance(detector, Detector):
            raise TypeError(
                f"detector must be a Detector (PlainBackgroundDetector, GroundingDINODetector, "
                f"CallableDetector), got {type(detector).__name__}"
            )
        self.detector, self.assignment, self.embedder, self.reference_crop = (
            detector,
            assignment,
            embedder,
            reference_crop,
        )
        self._reference_boxes: dict[tuple, tuple[Tensor, bool]] = {}

    def references(
        self, references: Sequence[ImageLike], masks: Sequence, words: Sequence[str], key: str | None = None
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Each reference as a ``(3, H, W)`` tensor, its subject's box, and whether the subject was located (by its
        mask or the detector). A subject not located in its reference is cropped as the whole reference, counted in
        the returned flags and logged. Boxes are cached by the content of the reference and its mask (references
        repeat from group to group); ``key`` (the identity id) only names the condition in the log."""
        images = [to_image_batch(r, f"reference {k}")[0] for k, r in enumerate(references)]
        boxes, found = [], []
        for k, (image, mask, word) in enumerate(zip(images, masks, words)):
            cache_key = (word, self.reference_crop, _fingerprint(image), _fingerprint(mask))
            if cache_key in self._reference_boxes:
                box, located = self._reference_boxes[cache_key]
            else:
                box, located = self._reference_box(image, mask, word, k)
                if not located:
                    log.warning(
                        "%s: subject %d (%r) not found in its reference; the whole reference is its crop "
                        "(counted in ref_found)",
                        key or "a condition",
                        k + 1,
                        word,
                    )
                if len(self._reference_boxes) >= 4096:
                    self._reference_boxes.clear()
                self._reference_boxes[cache_key] = (box, located)
            boxes.append(box)
            found.append(located)
        return images, boxes, torch.tensor(found)

    def _reference_box(self, image: Tensor, mask, word: str, k: int) -> tuple[Tensor, bool]:
        if self.reference_crop == "whole":
            return whole(image), True
        if mask is not None:
            m = to_mask_batch(mask, f"mask {k}")[0]
            if tuple(m.shape) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"mask {k} has size {tuple(m.shape)} but reference {k} {tuple(image.shape[-2:])}; "
                    f"resize the mask to its reference"
                )
            box = box_of_mask(m) if self.reference_crop == "auto" else None
            if box is not None:
                return box, True
        detected = self.detector(image[None], word)[0]
        return (detected[0], True) if len(detected) else (whole(image), False)

    def locate(self, images: Tensor, words: Sequence[str], ref_features: Tensor | None = None) -> Located:
        """Find the ``K = len(words)`` subjects in each of ``images`` ``(N, 3, H, W)``.

        ``ref_features``: the references' ``(K, D)`` embeddings (required by ``hungarian``).
        """
        count, size = len(words), images.shape[0]
        unique = ["object"] if self.detector.class_agnostic else list(dict.fromkeys(words))
        detected = {w: self.detector(images, w) for w in unique}
        boxes = whole(images[0]).repeat(size, count, 1)
        found = torch.zeros(size, count, dtype=torch.bool)
        if self.assignment == "order":
            for k, word in enumerate(words):
                rank = k if self.detector.class_agnostic else list(words[:k]).count(word)
                for n in range(size):
                    candidates = detected["object" if self.detector.class_agnostic else word][n]
                    if rank < len(candidates):
                        boxes[n, k], found[n, k] = candidates[rank], True
            return Located(boxes, found)
        if ref_features is None:
            raise ValueError("hungarian assignment needs the references' features")
        from scipy.optimize import linear_sum_assignment

        similarity = torch.zeros(size, count)
        candidates: list[list[Tensor]] = []
        for n in range(size):
            kept: list[Tensor] = []
            for word in unique:
                for box in detected[word][n]:
                    if all(_iou(box, c) <= 0.7 for c in kept):
                        kept.append(box)
            candidates.append(kept)
        crops = [crop(images[n], b) for n in range(size) for b in candidates[n]]
        features = self.embedder(crops) if crops else None  # every image's candidates in one call
        start = 0
        for n in range(size):
            if not candidates[n]:
                continue
            cosine = ref_features @ features[start : start + len(candidates[n])].T  # (K, M)
            start += len(candidates[n])
            rows, cols = linear_sum_assignment(cosine.numpy(), maximize=True)
            for k, m in zip(rows.tolist(), cols.tolist()):
                boxes[n, k], found[n, k], similarity[n, k] = candidates[n][m], True, cosine[k, m]
        return Located(boxes, found, similarity)
