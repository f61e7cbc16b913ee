"""Model-backed embedders and segmenters of the evaluation (plain torch + transformers, no Lightning).

- :class:`CLIPEmbedder` — CLIP image and text embeddings (the paper: ``openai/clip-vit-large-patch14``) for CLIP-T
  and CLIP-I. Loaded with ``CLIPModel.from_pretrained`` from a Hub id or a local ``save_pretrained`` folder.
- DINO (DINOv2-base CLS) and sDINO / DINO-nSSM (DINOv2-small patches) reuse
  :class:`divrl.rewards.backbones.DINOv2Backbone` (``embed`` gives the CLS embedding).
- :class:`HPSv2` — the Human Preference Score v2 through the ``hpsv2`` package, where it is installed.
- :class:`Segmenter` — subject masks of generated images (for si-IoU and masked scores): pluggable;
  :class:`BackgroundSegmenter` handles plain backgrounds such as the synthetic demo world. Grounded-SAM-2 (the paper's
  choice) plugs in as a :class:`Segmenter` subclass or a :class:`CallableSegmenter`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divrl.images import ImageLike, to_image_batch, to_pil
from divrl.utils import Frozen, load_image_processor, load_pretrained, parse_dtype

__all__ = ["CLIPEmbedder", "HPSv2", "Segmenter", "BackgroundSegmenter", "CallableSegmenter"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEmbedder(Frozen, nn.Module):
    """L2-normalised CLIP embeddings of images and texts.

    Images are preprocessed as CLIP's image processor does — the shorter side resized to the crop size (bicubic,
    antialiased), centre crop, normalised with the checkpoint's mean/std — in torch, batched. Texts are tokenised
    with the checkpoint's tokenizer, truncated to its context length (77 for OpenAI CLIP).

    Args:
        model: Hub id (``openai/clip-vit-large-patch14``) or a local folder with the model, tokenizer and
            (optionally) ``preprocessor_config.json``.
        dtype: weights dtype (``"float16"``, ``"bfloat16"``...; ``None`` keeps float32). Embeddings are float32.
        device: where to put the model; ``None`` leaves it on the CPU for the caller to move.
        local_files_only: never contact the Hub (offline machines with a populated cache or a local folder).
        max_batch: images or texts per forward pass (``None``: all at once).
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        dtype: str | None = None,
        device: str | None = None,
        local_files_only: bool = False,
        max_batch: int | None = 32,
    ):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.name = os.fspath(model)
        network = load_pretrained(
            CLIPModel.from_pretrained, model, local_files_only, "CLIPEmbedder", "openai/clip-vit-large-patch14"
        )
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, model, local_files_only, "CLIPEmbedder", "openai/clip-vit-large-patch14"
        )
        torch_dtype = parse_dtype(dtype, "CLIPEmbedder")
        self.model = (network.to(torch_dtype) if torch_dtype is not None else network).eval().requires_grad_(False)
        size, mean, std = _clip_preprocessing(model, local_files_only, network.config.vision_config.image_size)
        self.image_size = size
        self.context_length = int(network.config.text_config.max_position_embeddings)
        self.max_batch = max_batch
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] → CLIP pixel values ``(B, 3, S, S)``: shorter side to ``S``, centre crop."""
        h, w = images.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, int(h * scale)), max(self.image_size, int(w * scale)))  # HF truncates too
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.image_mean) / self.image_std

    @torch.no_grad()
    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """``(B, D)`` unit-norm image embeddings (the projected pooled vision output)."""
        batch = to_image_batch(images).to(self.device)
        out = []
        for chunk in batch.split(self.max_batch or batch.shape[0]):
            pixels = self.preprocess(chunk).to(self.model.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """``(B, D)`` unit-norm text embeddings (the projected end-of-text token)."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"CLIPEmbedder.embed_texts: expected a non-empty list of strings, got {texts!r}")
        out = []
        step = self.max_batch or len(texts)
        for start in range(0, len(texts), step):
            tokens = self.tokenizer(
                list(texts[start : start + step]),
                padding="max_length",
                truncation=True,
                max_length=self.context_length,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)


def _clip_preprocessing(model, local_files_only: bool, default_size: int) -> tuple[int, tuple, tuple]:
    """Crop size, mean and std of the checkpoint's image processor, or OpenAI CLIP's defaults."""
    processor = load_image_processor(model, local_files_only)
    crop = getattr(processor, "crop_size", None) or default_size
    if not isinstance(crop, (int, float)):  # {"height", "width"}: a dict, or transformers 5's SizeDict
        crop = crop["height"] if isinstance(crop, dict) else getattr(crop, "height", None) or default_size
    size = int(crop)
    mean = tuple(float(v) for v in getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN)
    std = tuple(float(v) for v in getattr(processor, "image_std", None) or OPENAI_CLIP_STD)
    return size, mean, std


class HPSv2:
    """Human Preference Score v2 (the paper's aesthetics column) through the ``hpsv2`` package.

    ``hpsv2`` is not a dependency of divrl (it pins its own open_clip and downloads its checkpoint on first use):
    ``pip install hpsv2`` where you evaluate. Without it, constructing this class raises an ``ImportError`` that
    says so; the evaluation leaves the HPS column out when no ``hps`` scorer is configured.

    Args:
        version: the HPS checkpoint, ``"v2.1"`` (default) or ``"v2.0"``.
    """

    def __init__(self, version: str = "v2.1"):
        try:
            self._hpsv2 = importlib.import_module("hpsv2")
        except ImportError as err:
            raise ImportError(
                "HPSv2 needs the `hpsv2` package (pip install hpsv2); or remove `hps` from the evaluation config"
            ) from err
        self.version = version

    def __call__(self, images: Tensor, prompt: str) -> Tensor:
        """Scores of ``(B, 3, H, W)`` images in [0, 1] for one prompt → float32 ``(B,)``."""
        pils = [to_pil(image) for image in to_image_batch(images)]
        scores = self._hpsv2.score(pils, prompt, hps_version=self.version)
        return torch.as_tensor([float(s) for s in scores], dtype=torch.float32).flatten()


class Segmenter:
    """Subject masks of images: ``segmenter(images (B, 3, H, W) in [0, 1]) → (B, H, W)`` float masks in [0, 1]."""

    def __call__(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BackgroundSegmenter(Segmenter):
    """The subject is whatever differs from a plain background.

    The background colour of each image is the per-channel median of its one-pixel border; a pixel belongs to the
    subject when some channel differs from it by more than ``tolerance``. Right for the synthetic demo world (flat
    grey background) and studio shots on plain backdrops; wrong for photos with scenery (use a real segmenter).

    Args:
        tolerance: colour distance (per channel, [0, 1] scale) above which a pixel is subject.
    """

    def __init__(self, tolerance: float = 0.1):
        if not 0 < tolerance < 1:
            raise ValueError(f"BackgroundSegmenter: tolerance must lie in (0, 1), got {tolerance}")
        self.tolerance = tolerance

    def __call__(self, images: Tensor) -> Tensor:
        x = to_image_batch(images)
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)  # (B, 3, P)
        background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
        return ((x - background).abs().amax(1) > self.tolerance).float()


class CallableSegmenter(Segmenter):
    """Any ``fn(images) -> (B, H, W) masks``, or a dotted path to one (how a YAML config names it)."""

    def __init__(self, fn: Callable[[Tensor], Tensor] | str):
        if isinstance(fn, str):
            module, _, attr = fn.rpartition(".")
            fn = getattr(importlib.import_module(module), attr)
        self.fn = fn

    def __call__(self, images: Tensor) -> Tensor:
        masks = torch.as_tensor(self.fn(images)).float()
        if masks.dim() != 3 or masks.shape[0] != images.shape[0]:
            raise ValueError(f"segmenter {self.fn!r} returned masks of shape {tuple(masks.shape)}; expected (B, H, W)")
        return masks
