"""Conversions between the image types users hold (PIL, numpy, uint8/float tensors, paths) and the float
``(B, 3, H, W)`` tensors in ``[0, 1]`` that backbones and rewards consume. Plain torch + PIL."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

ImageLike = Tensor | Image.Image | np.ndarray | str | os.PathLike
"""One image (PIL, HWC numpy, CHW tensor, path) or a batch: a (B, 3, H, W) tensor or a sequence of images."""

BACKGROUND = (255, 255, 255)
"""The colour transparent areas of a reference are composited on (white, as product and subject photos)."""

MIN_SIDE = 16
"""The smallest image side ``divrl sample`` and ``divrl score`` take (references, masks, scored images, ``--size``):
DINOv2 reads 14-pixel patches and the dense descriptor 8-pixel cells, so a smaller image holds at most one patch,
whatever it is resized to: its scores (and a generation conditioned on it) would mean nothing."""


def eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer greyscale (``I;16``, ``I``) as 8-bit ``L``, scaled by the bit depth, not clipped."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8), mode="L")


def in_mode(image: Image.Image, mode: str, alpha: list | None = None) -> Image.Image:
    """``image`` in ``mode`` as ``divrl data``, ``divrl sample`` and ``divrl score`` read every photo: upright (EXIF
    orientation applied: phone photos are stored sideways), 16-bit greyscale scaled to 8 bits (PIL's ``convert`` would
    clip it to white), and for ``RGB`` with transparency composited on :data:`BACKGROUND` (dropping alpha would turn
    transparent areas black); the alpha channel is appended to ``alpha`` when it holds any transparency (a subject
    mask for sources without masks)."""
    image = eight_bit(ImageOps.exif_transpose(image))
    if mode == "RGB" and (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        if alpha is not None and rgba.getchannel("A").getextrema()[0] < 255:
            alpha.append(rgba.getchannel("A"))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert(mode)


def check_side(image: Image.Image | Tensor, what: str) -> Image.Image | Tensor:
    """``image`` (PIL or ``(..., H, W)`` tensor); one smaller than :data:`MIN_SIDE` on a side raises a ``ValueError``
    naming ``what`` (the flag and the file)."""
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
    if min(w, h) < MIN_SIDE:
        raise ValueError(
            f"{what} is {w}x{h}; images must be at least {MIN_SIDE}x{MIN_SIDE} pixels (DINOv2 reads "
            f"14-pixel patches, the dense descriptor 8-pixel cells: a smaller image holds no structure to "
            f"score or to follow); pass a larger image"
        )
    return image


def to_image_batch(images: ImageLike | Sequence[ImageLike], name: str = "images") -> Tensor:
    """Return a float32 ``(B, 3, H, W)`` tensor in ``[0, 1]``.

    Accepts a ``(B, 3, H, W)`` or ``(3, H, W)`` tensor (float in [0, 1] or uint8), a PIL image, an ``HxWx3`` numpy
    array, a file path, or a sequence of those (all of one size). Grayscale and RGBA inputs are converted to RGB.
    """
    if isinstance(images, Tensor):
        return _tensor_to_batch(images, name)
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
        return _tensor_to_batch(_one_image(images, name), name)
    if isinstance(images, Sequence) and len(images) > 0:
        items = [_tensor_to_batch(_one_image(im, f"{name}[{i}]"), name)[0] for i, im in enumerate(images)]
        sizes = {tuple(t.shape[-2:]) for t in items}
        if len(sizes) > 1:
            raise ValueError(
                f"{name}: all images of a batch must have one size, got {sorted(sizes)}; resize them first"
            )
        return torch.stack(items)
    raise TypeError(
        f"{name}: expected an image, a (B, 3, H, W) tensor or a non-empty sequence of images, got {images!r}"
    )


def to_mask_batch(mask: ImageLike | Sequence[ImageLike] | None, name: str = "mask") -> Tensor | None:
    """Return a float32 ``(B, H, W)`` mask in ``[0, 1]`` (or ``None``).

    Accepts a bool/float/uint8 tensor ``(H, W)`` or ``(B, H, W)``, a PIL image (any mode; converted to ``L``), a
    numpy array, a path, or a sequence of those. Values of uint8 inputs are scaled by 1/255.
    """
    if mask is None:
        return None
    if isinstance(mask, (Image.Image, str, os.PathLike)):
        mask = in_mode(_open(mask, name), "L")
    if isinstance(mask, Image.Image):
        mask = torch.from_numpy(np.asarray(mask).copy())
    elif isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask.copy())
    elif isinstance(mask, Sequence) and not isinstance(mask, Tensor):
        return torch.cat([to_mask_batch(m, f"{name}[{i}]") for i, m in enumerate(mask)])
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a mask image or tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"{name} must have shape (H, W) or (B, H, W), got {tuple(mask.shape)}")
    if mask.dtype == torch.uint8:
        return mask.float() / 255.0
    return mask.float()


def to_pil(image: Tensor) -> Image.Image:
    """A ``(3, H, W)`` float tensor in [0, 1] as an RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def open_image(path_or_image, name: str, mode: str | None = None) -> Image.Image:
    """A PIL image from a path (or the image itself), in ``mode`` by :func:`in_mode` when given (as ``divrl data``
    reads photos); a file that is not a readable image raises a ``ValueError`` naming ``name`` and the file."""
    image = _open(path_or_image, name)
    return in_mode(image, mode) if mode is not None else image


def _open(path_or_image, name: str) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        return path_or_image
    try:
        with Image.open(path_or_image) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: cannot read image {os.fspath(path_or_image)!r} ({err}); check the file") from err


def _one_image(image: ImageLike, name: str) -> Tensor:
    if isinstance(image, Tensor):
        return image
    if isinstance(image, (str, os.PathLike, Image.Image)):
        image = np.asarray(in_mode(_open(image, name), "RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"{name}: expected an HxWx3 array, got shape {image.shape}")
        return torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}")


def _tensor_to_batch(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1] or uint8, got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.float()


def caption_grid(
    title: str, images: Sequence[Tensor], captions: Sequence[str], tile: int = 160, columns: int = 8
) -> Image.Image:
    """Images in rows of ``columns`` tiles, each with a caption line under it, below a title line (PIL image).

    ``images`` are ``(3, H, W)`` floats in [0, 1]; small images are upscaled without smoothing so pixels stay visible.
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    text_h, header = 14, 18
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    canvas = Image.new("RGB", (cols * tile, header + rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title[: tile * cols // 6], fill="black", font=font)
    for k, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (k % cols) * tile, header + (k // cols) * (tile + text_h)
        canvas.paste(to_pil(image.clamp(0, 1)).resize((tile, tile), Image.NEAREST), (x, y))
        draw.text((x + 2, y + tile + 1), caption, fill="black", font=font)
    return canvas
