"""DINOv2 patch features as a :class:`~divrl.rewards.backbones.base.FeatureBackbone`.

This is the paper's *backbone-generalisation* variant of VSM: instead of Mind-the-Glitch's disentangled pair, the
semantic and the visual grids are both the DINOv2 patch features (the very same tensor, so the VSM computation
forms one similarity matrix instead of two). The same grids are the features of **DINO-nSSM**, the nSSM computed
on DINOv2 self-similarity matrices.

Images of any size are resized (bilinear, antialiased, aspect ratio not kept) to ``grid_size * patch_size`` pixels
square — 48 × 14 = 672 by default, so the grid is 48 × 48 — normalised with the checkpoint's mean/std, and encoded;
the CLS token and any register tokens are dropped and the patch tokens are laid out as a ``(B, C, grid, grid)``
float32 grid. DINOv2 interpolates its position embeddings, so any grid size works with any checkpoint.

Loading goes through :meth:`transformers.AutoModel.from_pretrained`, so a Hub id (``facebook/dinov2-small``,
``facebook/dinov2-with-registers-base``...) and a local folder written by ``save_pretrained`` are handled alike.
Nothing here downloads anything by itself: with ``local_files_only=True`` only the local cache / folder is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divrl.rewards.backbones.base import FeatureBackbone, Features
from divrl.utils import Frozen, load_image_processor, load_pretrained, parse_dtype

__all__ = ["DINOv2Backbone"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class DINOv2Backbone(Frozen, FeatureBackbone):
    """DINOv2 (with or without registers) patch tokens as the semantic *and* visual feature grid.

    :meth:`extract` returns ``Features(grid, grid)`` with one tensor object in both fields; the rewards detect the
    identity and compute a single similarity matrix. Use :meth:`from_model` to wrap a model already in memory.

    Args:
        model: a Hugging Face Hub id (``"facebook/dinov2-small"``, ``"facebook/dinov2-with-registers-base"``...) or
            a local folder holding a ``save_pretrained`` checkpoint (``config.json`` + weights, optionally a
            ``preprocessor_config.json`` whose ``image_mean``/``image_std`` are used; ImageNet statistics otherwise).
        grid_size: side of the output grid. Images are resized to ``grid_size * patch_size`` pixels square
            (48 × 14 = 672 by default, the paper's 48 × 48 grid).
        layer: which hidden state to return, as an index into the model's ``hidden_states`` (0 = patch embeddings,
            ``i`` = output of block ``i``, before the final layer norm; negative indices count from the end).
            ``-1`` (default) is ``last_hidden_state``, i.e. the last block *after* the final layer norm.
        dtype: dtype of the model weights and of its inputs: ``"float32"``, ``"bfloat16"``, ``"float16"``, or
            ``None`` to keep the checkpoint's float32. Features are always returned as float32.
        device: where to put the model (``"cuda"``, ``"cuda:1"``, ``"cpu"``...); ``None`` leaves it on the CPU,
            where it was loaded, for the caller (or a Lightning module owning the backbone) to move.
        max_batch: encode at most this many images per forward pass (``None``: all at once, best on a GPU; on a
            CPU 1 or 2 is faster).
        local_files_only: only read the local folder / Hugging Face cache; never contact the Hub. Set it on
            offline machines with a populated cache (otherwise a missing network means retries, then an error).

    Raises:
        FileNotFoundError: if ``model`` is a filesystem path (absolute, ``./``, ``../`` or ``~``) that does not
            exist.
        OSError: if the checkpoint cannot be loaded (unknown id, not cached while offline, broken folder).
        ValueError: on an unknown ``dtype``, a ``layer`` outside the model's hidden states, a non-positive
            ``grid_size``, or a checkpoint that is not a DINOv2 model.
    """

    def __init__(
        self,
        model: str = "facebook/dinov2-small",
        grid_size: int = 48,
        layer: int = -1,
        dtype: str | None = None,
        device: str | None = None,
        local_files_only: bool = False,
        max_batch: int | None = None,
    ):
        super().__init__()
        self.max_batch = max_batch
        torch_dtype = parse_dtype(dtype, "DINOv2Backbone")
        network = _load_model(model, local_files_only)
        mean, std = _load_mean_std(model, local_files_only)
        if torch_dtype is not None:
            network = network.to(torch_dtype)
        self._setup(network, grid_size, layer, mean, std, name=str(model))
        if device is not None:
            self.to(device)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        grid_size: int = 48,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        layer: int = -1,
        max_batch: int | None = None,
    ) -> DINOv2Backbone:
        """Wrap an already-built ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (no loading, no copy).

        The model is put in eval mode and its parameters stop requiring gradients.

        Args:
            model: the transformers DINOv2 model (its ``config`` gives the patch size and register count).
            grid_size: side of the output grid (see the class docstring).
            image_mean: per-channel mean used to normalise ``[0, 1]`` images (ImageNet by default).
            image_std: per-channel standard deviation (ImageNet by default).
            layer: hidden-state index, ``-1`` = ``last_hidden_state`` (see the class docstring).
            max_batch: images per forward pass (see the class docstring).
        """
        self = cls.__new__(cls)
        FeatureBackbone.__init__(self)
        self.max_batch = max_batch
        self._setup(model, grid_size, layer, tuple(image_mean), tuple(image_std), name=type(model).__name__)
        return self

    def _setup(
        self,
        model: nn.Module,
        grid_size: int,
        layer: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
    ) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"DINOv2Backbone: {name!r} is a {type(model).__name__} (model_type={model_type!r}); expected a DINOv2 "
                f"model ({', '.join(_MODEL_TYPES)})"
            )
        if not isinstance(grid_size, int) or isinstance(grid_size, bool) or grid_size < 1:
            raise ValueError(f"DINOv2Backbone: grid_size must be a positive integer, got {grid_size!r}")
        num_layers = int(config.num_hidden_layers)
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"DINOv2Backbone: layer must index the {num_layers + 1} hidden states of {name!r} "
                f"(-{num_layers + 1}..{num_layers}; -1 = last_hidden_state), got {layer!r}"
            )
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"DINOv2Backbone: image mean/std must be 3 values (std > 0), got {mean!r} / {std!r}")

        self.model = model.eval()
        self.model.requires_grad_(False)
        self.name = name
        self.grid_size = grid_size
        self.layer = layer
        self.patch_size = int(config.patch_size)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def resolution(self) -> int:
        """Side in pixels of the square model input: ``grid_size * patch_size``."""
        return self.grid_size * self.patch_size

    def extract(self, images: Tensor) -> Features:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOv2Backbone: expected a (B, 3, H, W) batch, got {tuple(images.shape)}")
        size = self.resolution
        pixels = self._pixels(images)

        if self.layer == -1:
            tokens = self.model(pixel_values=pixels).last_hidden_state
        else:
            tokens = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]

        tokens = tokens[:, 1 + self.num_register_tokens :]
        batch, count, channels = tokens.shape
        if count != self.grid_size * self.grid_size:
            raise RuntimeError(
                f"DINOv2Backbone: the model returned {count} patch tokens for a {size}x{size} input; expected "
                f"{self.grid_size}x{self.grid_size} (patch size {self.patch_size}, "
                f"{self.num_register_tokens} register tokens)"
            )
        grid = tokens.float().reshape(batch, self.grid_size, self.grid_size, channels).permute(0, 3, 1, 2)
        grid = grid.contiguous()
        return Features(grid, grid)

    @torch.no_grad()
    def embed(self, images) -> Tensor:
        """The global image embedding: the CLS token after the final layer norm (``pooler_output``), ``(B, C)``
        float32, for images of any size resized to :attr:`resolution` — the **DINO** score of the evaluation is the
        cosine of two such embeddings (at ``grid_size=16``, i.e. 224² for patch 14, the usual protocol)."""
        from divrl.images import to_image_batch

        pixels = self._pixels(to_image_batch(images).to(self.device))
        return self.model(pixel_values=pixels).pooler_output.float()

    def _pixels(self, images: Tensor) -> Tensor:
        size = self.resolution
        pixels = images.float()
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return ((pixels - self.image_mean) / self.image_std).to(self._model_dtype())

    def _model_dtype(self) -> torch.dtype:
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.float32

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, grid_size={self.grid_size}, patch_size={self.patch_size}, layer={self.layer}, "
            f"registers={self.num_register_tokens}"
        )


def _load_model(model: str | os.PathLike, local_files_only: bool) -> nn.Module:
    from transformers import AutoModel

    return load_pretrained(
        AutoModel.from_pretrained, model, local_files_only, "DINOv2Backbone", "facebook/dinov2-small"
    )


def _load_mean_std(model: str | os.PathLike, local_files_only: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's normalisation statistics, or ImageNet's when it ships no preprocessor config."""
    processor = load_image_processor(model, local_files_only)
    mean = getattr(processor, "image_mean", None)
    std = getattr(processor, "image_std", None)
    if mean is None or std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return _three(mean), _three(std)


def _three(value: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)
