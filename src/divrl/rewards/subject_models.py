"""PSR's subject detector and subject feature, through transformers.

Two pluggable pieces of :mod:`divrl.rewards.subjects`, with pretrained weights:

- :class:`GroundingDINODetector`: the open-vocabulary detector that finds each subject by its category word
  (Grounding DINO, through ``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``);
- :class:`CLSEmbedder`: the subject feature, the L2-normalised CLS token of DINO v1 ViT-S/16 (or DINOv2), through
  ``AutoModel``.

Loading goes through ``from_pretrained`` exactly as :class:`~divrl.rewards.backbones.dinov2.DINOv2Backbone` does, so a
Hub id and a local folder written by ``save_pretrained`` are handled alike, and nothing here downloads anything by
itself: with ``local_files_only=True`` only the local folder / Hugging Face cache is read. Both models are loaded when
the object is built, frozen and kept in eval mode.

Both follow PSR's pipeline, which works on PIL images: float images and crops are quantised to 8 bits (as the saved
PNG / JPEG images PSR evaluates are) and resized with PIL.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from divrl.rewards.embedders import Embedder
from divrl.rewards.subjects import Detector
from divrl.utils import Frozen, load_pretrained, parse_dtype

__all__ = ["GroundingDINODetector", "CLSEmbedder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_pil(image: Tensor) -> Image.Image:
    """A float ``(3, H, W)`` image in [0, 1] → an 8-bit RGB PIL image (rounded to the nearest level)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _without_adapter_kwargs(loader):
    """``loader`` (a config / processor ``from_pretrained``) minus the ``adapter_kwargs`` that
    :func:`~divrl.utils.load_pretrained` adds for models (only model loading looks for a PEFT adapter; a processor
    would keep the argument as an attribute)."""

    def load(name, **kwargs):
        kwargs.pop("adapter_kwargs", None)
        return loader(name, **kwargs)

    return load


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _model_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _check_max_batch(max_batch: int | None, who: str) -> None:
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"{who}: max_batch must be a positive integer or None, got {max_batch!r}")


# ---------------------------------------------------------------------------------------------------- detector


class GroundingDINODetector(Frozen, Detector):
    """PSR's open-vocabulary detector: Grounding DINO, prompted with the subject's category word.

    PSR detects subjects with Grounding DINO Swin-T OGC (the Swin-T backbone trained on O365, GoldG and Cap4M);
    ``IDEA-Research/grounding-dino-tiny`` is that checkpoint converted to transformers.

    The prompt is the word lower-cased and stripped, ending with ``"."`` (Grounding DINO's convention: ``"dog."``).
    Each image is quantised to 8 bits and handed to the checkpoint's processor as a PIL image (its PIL backend on
    transformers 5.x: resized with PIL, bilinear, to the processor config's size — shorter side 800, longer side at
    most 1333 for the IDEA-Research checkpoints, as Grounding DINO's own ``load_image``), the model runs
    without gradients, and the processor's ``post_process_grounded_object_detection`` keeps the queries whose best
    token score (the max over the prompt's tokens of the sigmoid of the logits) exceeds ``box_threshold`` and scales
    their boxes to the image's pixels. Boxes are returned in query order, as Grounding DINO's own ``predict`` returns
    them and PSR's "first box" reads them (``sort_by_score: true`` sorts them best first), clamped to the image.

    Args:
        model: a Hugging Face Hub id (``"IDEA-Research/grounding-dino-tiny"``, ``"IDEA-Research/grounding-dino-base"``)
            or a local folder holding a ``save_pretrained`` checkpoint *and* its processor (tokenizer + image
            processor).
        box_threshold: a query is a detection when its best token score exceeds this (PSR: 0.35).
        text_threshold: the score above which a prompt token belongs to a detection's phrase (PSR: 0.25). As in
            Grounding DINO's ``predict``, it only labels the boxes; it does not remove any.
        dtype: dtype of the model weights and of its pixel inputs: ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``None`` to keep the checkpoint's float32. Boxes are always float32.
        device: where to put the model (``"cuda"``, ``"cuda:1"``, ``"cpu"``...); ``None`` leaves it on the CPU, where
            it was loaded, for the caller (or a Lightning module owning the detector) to move.
        local_files_only: only read the local folder / Hugging Face cache; never contact the Hub. Set it on offline
            machines with a populated cache (otherwise a missing network means retries, then an error).
        max_batch: detect in at most this many images per forward pass (``None``: all at once).
        sort_by_score: return each image's boxes best score first instead of in query order (PSR's order).

    Raises:
        FileNotFoundError: if ``model`` is a filesystem path (absolute, ``./``, ``../`` or ``~``) that does not exist.
        OSError: if the checkpoint or its processor cannot be loaded (unknown id, not cached while offline, broken
            folder); the message names the model and the fix (``hf download``, ``local_files_only``).
        ValueError: on an unknown ``dtype``, thresholds outside [0, 1], or a bad ``max_batch``.
    """

    def __init__(
        self,
        model: str = "IDEA-Research/grounding-dino-tiny",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        dtype: str | None = None,
        device: str | None = None,
        local_files_only: bool = False,
        max_batch: int | None = None,
        sort_by_score: bool = False,
    ):
        super().__init__()
        who = "GroundingDINODetector"
        if not 0 <= box_threshold <= 1 or not 0 <= text_threshold <= 1:
            raise ValueError(
                f"{who}: box_threshold and text_threshold must be in [0, 1], got {box_threshold} and {text_threshold}"
            )
        _check_max_batch(max_batch, who)
        torch_dtype = parse_dtype(dtype, who)
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        example = "IDEA-Research/grounding-dino-tiny"
        network = load_pretrained(
            AutoModelForZeroShotObjectDetection.from_pretrained, model, local_files_only, who, example
        )
        # The PIL image processor resizes as Grounding DINO's own pipeline does (transformers 5.x; 4.x has only one).
        processor_kwargs: dict[str, Any] = {"backend": "pil"} if _transformers_major() >= 5 else {}
        self.processor = load_pretrained(
            _without_adapter_kwargs(AutoProcessor.from_pretrained),
            model,
            local_files_only,
            who,
            example,
            **processor_kwargs,
        )
        if not hasattr(self.processor, "post_process_grounded_object_detection"):
            raise ValueError(
                f"{who}: {str(model)!r} has a {type(self.processor).__name__}, not a Grounding DINO "
                f"processor (no post_process_grounded_object_detection)"
            )
        if torch_dtype is not None:
            network = network.to(torch_dtype)
        self.model = network.eval()
        self.model.requires_grad_(False)
        self.name = str(model)
        self.box_threshold, self.text_threshold, self.max_batch = float(box_threshold), float(text_threshold), max_batch
        self.sort_by_score = bool(sort_by_score)
        # transformers < 4.49 calls the box threshold `box_threshold`, later versions `threshold`.
        parameters = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        self._threshold_arg = "threshold" if "threshold" in parameters else "box_threshold"
        self.eval()
        if device is not None:
            self.to(device)

    @staticmethod
    def prompt(word: str) -> str:
        """Grounding DINO's text prompt for a category word: lower-cased, stripped, ending with ``"."``."""
        text = str(word).strip().lower()
        if not text:
            raise ValueError("GroundingDINODetector: the category word is empty")
        return text if text.endswith(".") else text + "."

    @torch.no_grad()
    def detect(self, images: Tensor, word: str) -> list[Tensor]:
        prompt = self.prompt(word)
        height, width = images.shape[-2:]
        step = self.max_batch or images.shape[0]
        device, dtype = _model_device(self.model), _model_dtype(self.model)
        out: list[Tensor] = []
        for start in range(0, images.shape[0], step):
            chunk = [_to_pil(image) for image in images[start : start + step]]
            inputs = self.processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt")
            inputs = {key: value.to(device) for key, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            outputs = self.model(**inputs)
            outputs.logits, outputs.pred_boxes = outputs.logits.float().cpu(), outputs.pred_boxes.float().cpu()
            results = self.processor.post_process_grounded_object_detection(
                outputs,
                inputs["input_ids"].cpu(),
                text_threshold=self.text_threshold,
                target_sizes=[(height, width)] * len(chunk),
                **{self._threshold_arg: self.box_threshold},
            )
            for result in results:
                boxes = result["boxes"].float().reshape(-1, 4).clone()
                if self.sort_by_score:
                    boxes = boxes[torch.sort(result["scores"], descending=True, stable=True).indices]
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
                out.append(boxes)
        return out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, box_threshold={self.box_threshold}, text_threshold={self.text_threshold}, "
            f"max_batch={self.max_batch}, sort_by_score={self.sort_by_score}"
        )


# ---------------------------------------------------------------------------------------------------- embedder


class CLSEmbedder(Frozen, Embedder):
    """PSR's subject feature: the L2-normalised CLS token of DINO v1 ViT-S/16 (or of a DINOv2).

    The feature is ``last_hidden_state[:, 0]``, the CLS token of the last block *after* the final layer norm (for
    both ``ViTModel`` and ``Dinov2Model``: DINO's own ``model(x)`` output). Each crop is preprocessed as PSR's
    evaluation does with torchvision on PIL images — ``Resize(resize, BICUBIC)`` (the shorter side to ``resize``, the
    longer one ``int(resize * long / short)``), ``CenterCrop(crop)``, ``ToTensor``, ``Normalize(mean, std)`` — and
    the resize is done **with PIL** on the crop quantised to 8 bits, so the pixels are exactly torchvision's. All the
    crops (of any sizes) then go through the model in one forward pass (or ``max_batch`` at a time).

    Args:
        model: a Hugging Face Hub id (``"facebook/dino-vits16"``, PSR's; ``"facebook/dinov2-small"``...) or a local
            folder holding a ``save_pretrained`` checkpoint of a ViT / DINOv2 model.
        resize: the shorter side of a crop after resizing (PSR: 256).
        crop: the side of the square centre crop fed to the model (PSR: 224); at most ``resize``. A ViT whose
            ``image_size`` differs interpolates its position embeddings.
        mean: per-channel mean used to normalise the [0, 1] pixels (ImageNet's by default).
        std: per-channel standard deviation (ImageNet's by default).
        dtype: dtype of the model weights and of its inputs: ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``None``
            to keep the checkpoint's float32. Features are always float32.
        device: where to put the model (``"cuda"``, ``"cpu"``...); ``None`` leaves it on the CPU for the caller to
            move.
        local_files_only: only read the local folder / Hugging Face cache; never contact the Hub.
        max_batch: embed at most this many crops per forward pass (``None``: all at once).

    Raises:
        FileNotFoundError: if ``model`` is a filesystem path that does not exist.
        OSError: if the checkpoint cannot be loaded (the message names the model and the fix).
        ValueError: on an unknown ``dtype``, ``crop > resize``, non-positive sizes, bad mean/std or ``max_batch``, or
            a checkpoint whose output has no CLS token (not a ViT-like model).
    """

    def __init__(
        self,
        model: str = "facebook/dino-vits16",
        resize: int = 256,
        crop: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dtype: str | None = None,
        device: str | None = None,
        local_files_only: bool = False,
        max_batch: int | None = None,
    ):
        super().__init__()
        who = "CLSEmbedder"
        for name, value in (("resize", resize), ("crop", crop)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")
        if crop > resize:
            raise ValueError(f"{who}: crop ({crop}) must not exceed resize ({resize}), the shorter side it is cut from")
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"{who}: mean/std must be 3 values (std > 0), got {mean!r} / {std!r}")
        _check_max_batch(max_batch, who)
        torch_dtype = parse_dtype(dtype, who)
        from transformers import MODEL_MAPPING, AutoConfig, AutoModel

        example = "facebook/dino-vits16"
        config = load_pretrained(
            _without_adapter_kwargs(AutoConfig.from_pretrained), model, local_files_only, who, example
        )
        kwargs: dict[str, Any] = {"config": config}
        model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            kwargs["add_pooling_layer"] = False  # ViTModel: the CLS token needs no pooler (DINO checkpoints ship none)
        network = load_pretrained(AutoModel.from_pretrained, model, local_files_only, who, example, **kwargs)
        if torch_dtype is not None:
            network = network.to(torch_dtype)
        self.model = network.eval()
        self.model.requires_grad_(False)
        self.name = str(model)
        self.resize, self.crop, self.max_batch = resize, crop, max_batch
        forward = inspect.signature(self.model.forward).parameters
        image_size = getattr(config, "image_size", crop)
        self._forward_kwargs = (
            {"interpolate_pos_encoding": True} if ("interpolate_pos_encoding" in forward and image_size != crop) else {}
        )
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()
        if device is not None:
            self.to(device)

    def preprocess(self, crop: Tensor) -> Tensor:
        """One float ``(3, h, w)`` crop in [0, 1] → the ``(3, crop, crop)`` [0, 1] pixels the model sees (before
        normalisation): 8-bit PIL image, shorter side resized to :attr:`resize` (bicubic), centre crop."""
        if crop.dim() != 3 or crop.shape[0] != 3:
            raise ValueError(f"CLSEmbedder: expected a (3, h, w) crop, got {tuple(crop.shape)}")
        image = _to_pil(crop)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != (width, height):
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
        top = int(round((size[1] - self.crop) / 2.0))
        left = int(round((size[0] - self.crop) / 2.0))
        return pixels[:, top : top + self.crop, left : left + self.crop]

    @torch.no_grad()
    def embed(self, crops: Sequence[Tensor]) -> Tensor:
        pixels = torch.stack([self.preprocess(c) for c in crops]).to(self.image_mean.device)
        pixels = ((pixels - self.image_mean) / self.image_std).to(_model_dtype(self.model))
        step = self.max_batch or pixels.shape[0]
        features = []
        for start in range(0, pixels.shape[0], step):
            tokens = self.model(pixel_values=pixels[start : start + step], **self._forward_kwargs).last_hidden_state
            if tokens.dim() != 3:
                raise ValueError(
                    f"CLSEmbedder: {self.name!r} returned last_hidden_state of shape "
                    f"{tuple(tokens.shape)}; expected (N, tokens, D) with the CLS token first (a ViT / "
                    f"DINO / DINOv2 model)"
                )
            features.append(tokens[:, 0].float())
        return torch.nn.functional.normalize(torch.cat(features), dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resize={self.resize}, crop={self.crop}, max_batch={self.max_batch}"
