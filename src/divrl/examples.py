"""A tiny built-in example group, drawn procedurally (no files, no downloads).

The subject is a textured two-colour star on a grey background; the variants change its structure (moved,
rotated, smaller), its colours only, or the whole identity. ``divrl score`` with no images scores this group, so a
newcomer sees what nSSM and VSM measure before having any data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from divrl.data.synthetic import Pose, SubjectIdentity, render

__all__ = ["draw_subject", "example_group"]


def draw_subject(
    size: int = 256,
    kind: str = "star",
    colours: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0.9, 0.15, 0.1), (0.95, 0.8, 0.1)),
    centre: tuple[float, float] = (0.5, 0.5),
    radius: float = 0.3,
    rotation: float = 0.0,
    background: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Draw one checkered subject of the synthetic world (:mod:`divrl.data.synthetic`): an image
    ``(3, size, size)`` in [0, 1] and its mask ``(size, size)``.

    Args:
        size: image side in pixels.
        kind: a shape of :data:`divrl.data.synthetic.KINDS` (``"star"``, ``"square"``, ``"disc"``...).
        colours: the two colours of the checkered texture, RGB in [0, 1].
        centre: subject centre as fractions of the image side (x, y).
        radius: subject radius as a fraction of the image side.
        rotation: rotation in radians.
        background: grey level of the background.
    """
    return render(SubjectIdentity(kind, colours, "checker"), Pose(*centre, radius, rotation), size, background)


def example_group(size: int = 256) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """The built-in group: ``(reference (3,S,S), reference mask (S,S), variants (5,3,S,S), variant names)``."""
    reference, mask = draw_subject(size)
    variants = {
        "identical copy": draw_subject(size),
        "moved, rotated, smaller": draw_subject(size, centre=(0.35, 0.6), radius=0.22, rotation=0.6),
        "mirrored and moved": draw_subject(size, centre=(0.65, 0.4), rotation=math.pi / 5),
        "recoloured (same layout)": draw_subject(size, colours=((0.1, 0.3, 0.9), (0.2, 0.85, 0.9))),
        "another subject": draw_subject(size, "square", ((0.1, 0.7, 0.2), (0.6, 0.1, 0.7)), (0.6, 0.45), 0.25),
    }
    images = torch.stack([image for image, _ in variants.values()])
    return reference, mask, images, list(variants)
