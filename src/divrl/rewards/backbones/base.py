"""The feature-backbone interface: images in, ``(B, C, H, W)`` semantic and visual grids out."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from divrl.images import ImageLike, to_image_batch


class Features(NamedTuple):
    """Dense features of a batch of images, one vector per grid cell.

    ``semantic`` drives correspondence (which reference cell a generated cell depicts); ``visual`` drives
    appearance (does it look the same). Backbones without a disentangled pair (DINOv2) return the *same tensor*
    for both, which the VSM computation detects and exploits (one similarity matrix instead of two).
    """

    semantic: Tensor
    visual: Tensor


class FeatureBackbone(nn.Module):
    """Base class of feature extractors used by the rewards.

    Subclasses implement :meth:`extract` on a float ``(B, 3, H, W)`` batch in ``[0, 1]`` (any size: the backbone
    resizes) and return :class:`Features` whose grids are ``(B, C, grid_size, grid_size)``. Calling the module
    accepts anything :func:`divrl.images.to_image_batch` does and runs without gradients.
    """

    grid_size: int = 48
    max_batch: int | None = None
    """Encode at most this many images per :meth:`extract` call (``None``: all at once). On a CPU large batches
    only add memory traffic (DINOv2-small at 672²: 1.9 s per image in a batch of 21, 1.4 s one at a time); on a
    GPU larger batches are faster until memory runs out."""

    def extract(self, images: Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: ImageLike) -> Features:
        batch = to_image_batch(images).to(self.device)
        step = self.max_batch or batch.shape[0]
        if step < 1:
            raise ValueError(f"{type(self).__name__}: max_batch must be a positive integer or None, got {step}")
        parts = []
        for chunk in batch.split(step):
            parts.append(self.extract(chunk))
            _check_features(parts[-1], chunk.shape[0], type(self).__name__)
        if len(parts) == 1:
            return parts[0]
        semantic = torch.cat([p.semantic for p in parts])
        shared = all(p.semantic is p.visual for p in parts)  # keep semantic-is-visual (one similarity in VSM)
        return Features(semantic, semantic if shared else torch.cat([p.visual for p in parts]))

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")


class CallableBackbone(FeatureBackbone):
    """Wrap any callable ``fn(images) -> Tensor | (semantic, visual)`` as a backbone.

    This is how a new feature extractor (an in-process Mind-the-Glitch model, another foundation model) plugs into
    the rewards without subclassing: ``fn`` receives a float ``(B, 3, H, W)`` batch in ``[0, 1]`` and returns one
    ``(B, C, H, W)`` grid (used as both semantic and visual) or a pair of grids.

    Args:
        fn: the feature extractor, or an importable dotted path to one (``"package.module.function"``), which is
            how a YAML config names it.
        grid_size: the side of the grids ``fn`` returns (checked on every call).
        max_batch: call ``fn`` on at most this many images at a time (``None``: the whole batch).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]] | str,
        grid_size: int = 48,
        max_batch: int | None = None,
    ):
        super().__init__()
        self.max_batch = max_batch
        self.fn = _import_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise TypeError(f"CallableBackbone: fn must be callable, got {self.fn!r}")
        self.grid_size = grid_size

    def extract(self, images: Tensor) -> Features:
        out = self.fn(images)
        if isinstance(out, Tensor):
            return Features(out, out)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return Features(*out)
        raise TypeError(
            f"CallableBackbone: {self.fn!r} must return a (B, C, H, W) tensor or a (semantic, visual) pair, "
            f"got {type(out).__name__}"
        )


def _check_features(features: Features, batch: int, who: str) -> None:
    for name, grid in zip(Features._fields, features):
        if not isinstance(grid, Tensor) or grid.dim() != 4 or grid.shape[0] != batch:
            shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            raise ValueError(f"{who} returned {name} features of shape {shape}; expected ({batch}, C, H, W)")
    if features.semantic.shape[-2:] != features.visual.shape[-2:]:
        raise ValueError(
            f"{who} returned semantic {tuple(features.semantic.shape)} and visual {tuple(features.visual.shape)} "
            f"grids of different sizes"
        )


def _import_callable(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"CallableBackbone: {path!r} is not a dotted path like 'package.module.function'")
    import importlib

    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"CallableBackbone: cannot import {path!r} ({err})") from err
