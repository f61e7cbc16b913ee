"""A procedural world of subjects for the CPU demo: identity = shape, palette and texture; structure = pose,
position and scale. Deterministic for a seed; no files, no downloads.

Each identity is drawn once as its reference (a random pose; optionally further poses as further references) with a
subject mask; its prompts name it ("the red and yellow striped star") and ask for structural changes ("on the left,
small, tilted"), so a policy that copies the reference layout scores a low nSSM and one that changes the subject's
colours scores a low VSM.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from divrl.data.schema import IdentityRecord
from divrl.images import to_pil

__all__ = [
    "SubjectIdentity",
    "Pose",
    "render",
    "prompt_pose",
    "render_scene",
    "random_identity",
    "random_pose",
    "scene_poses",
    "synthetic_records",
    "multi_subject_records",
    "scene_prompt",
    "write_shards",
    "write_demo_dataset",
    "write_demo_multi_dataset",
]

KINDS = ("star", "square", "disc", "triangle", "ring", "cross")
TEXTURES = ("checker", "stripes", "dots", "plain")
PALETTE = {
    "red": (0.9, 0.15, 0.1),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.7, 0.25),
    "teal": (0.1, 0.65, 0.65),
    "blue": (0.15, 0.3, 0.9),
    "purple": (0.55, 0.2, 0.75),
    "pink": (0.95, 0.45, 0.7),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
_TEXTURE_WORDS = {"checker": "checkered", "stripes": "striped", "dots": "spotted", "plain": "plain"}
_PLACES = ("on the beach", "in the snow", "in a forest", "on a table", "in the city", "in the desert", "at night")
_LAYOUTS = ("on the left", "on the right", "at the top", "at the bottom", "in the corner", "in the centre")
_SCALES = ("small", "large", "tiny", "big")
_POSES = ("tilted", "upside down", "turned", "lying on its side")


@dataclass(frozen=True)
class SubjectIdentity:
    """What makes a subject itself: its shape, its two colours (palette names or RGB triples) and its texture.

    Attributes:
        kind: the shape, one of :data:`KINDS`.
        colours: the main and the second colour (palette names or RGB triples in [0, 1]).
        texture: how the second colour is laid over the first, one of :data:`TEXTURES`.
    """

    kind: str
    colours: tuple[str | tuple[float, float, float], str | tuple[float, float, float]]
    texture: str

    @property
    def name(self) -> str:
        """The subject's name in prompts, e.g. ``"red and yellow striped star"``."""
        first, second = self.colours
        colour = first if self.texture == "plain" else f"{first} and {second}"
        return f"{colour} {_TEXTURE_WORDS[self.texture]} {self.kind}"


@dataclass(frozen=True)
class Pose:
    """Where and how the subject stands.

    Attributes:
        cx: horizontal centre, as a fraction of the image side.
        cy: vertical centre, as a fraction of the image side.
        radius: size, as a fraction of the image side.
        rotation: rotation in radians.
    """

    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.3
    rotation: float = 0.0


def render(identity: SubjectIdentity, pose: Pose, size: int = 128, background: float = 0.5) -> tuple[Tensor, Tensor]:
    """Draw the subject: an image ``(3, size, size)`` in [0, 1] and its mask ``(size, size)`` in {0, 1}."""
    if identity.kind not in KINDS or identity.texture not in TEXTURES:
        raise ValueError(f"unknown subject {identity}; kinds {KINDS}, textures {TEXTURES}")
    grid = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    dx, dy = xx - pose.cx * size, yy - pose.cy * size
    r = pose.radius * size
    cos, sin = math.cos(pose.rotation), math.sin(pose.rotation)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # subject frame
    rho, angle = torch.sqrt(dx**2 + dy**2), torch.atan2(dy, dx) - pose.rotation
    if identity.kind == "star":
        mask = rho < r * (0.65 + 0.35 * torch.cos(5 * angle))
    elif identity.kind == "square":
        mask = (u.abs() < 0.8 * r) & (v.abs() < 0.8 * r)
    elif identity.kind == "disc":
        mask = rho < r
    elif identity.kind == "triangle":
        mask = (v > -0.5 * r) & (v < r - 1.732 * u.abs() * 0.866)
    elif identity.kind == "ring":
        mask = (rho < r) & (rho > 0.55 * r)
    else:  # cross
        mask = ((u.abs() < 0.3 * r) & (v.abs() < r)) | ((v.abs() < 0.3 * r) & (u.abs() < r))
    cell = size / 32
    if identity.texture == "checker":
        second = ((torch.div(dx, cell, rounding_mode="floor") + torch.div(dy, cell, rounding_mode="floor")) % 2) != 0
    elif identity.texture == "stripes":
        second = (torch.div(u, cell, rounding_mode="floor") % 2) != 0
    elif identity.texture == "dots":
        second = ((u % (2 * cell) - cell) ** 2 + (v % (2 * cell) - cell) ** 2) < (0.45 * cell) ** 2
    else:
        second = torch.zeros_like(mask)
    first, other = (torch.tensor(PALETTE[c] if isinstance(c, str) else c).view(3, 1, 1) for c in identity.colours)
    texture = torch.where(second, other, first)
    image = torch.where(mask, texture, torch.full((3, size, size), background))
    return image, mask.float()


def render_scene(identities, poses, size: int = 128, background: float = 0.5) -> tuple[Tensor, Tensor]:
    """Draw several subjects in one image (later ones in front): the image ``(3, size, size)`` and each subject's
    visible mask ``(K, size, size)``."""
    image = torch.full((3, size, size), background)
    masks = []
    for identity, pose in zip(identities, poses, strict=True):
        drawn, mask = render(identity, pose, size, background)
        image = torch.where(mask.bool(), drawn, image)
        masks = [m * (1 - mask) for m in masks] + [mask]
    return image, torch.stack(masks)


def scene_poses(count: int, rng: random.Random, copy: list[Pose] | None = None) -> list[Pose]:
    """Poses of ``count`` subjects side by side, left to right, one slot of ``1 / count`` of the width each.

    With ``copy`` (the subjects' reference poses), each keeps its reference's rotation and height and, scaled to fit
    its slot, its size: the copying base model. Otherwise rotation, height and size are drawn from ``rng``.
    """
    slot = 1.0 / count
    poses = []
    for k in range(count):
        largest = 0.42 * slot
        if copy is None:
            radius, rotation, cy = rng.uniform(0.6, 1.0) * largest, rng.uniform(0, 2 * math.pi), None
        else:
            radius, rotation, cy = min(copy[k].radius, 0.32) / 0.32 * largest, copy[k].rotation, copy[k].cy
        cy = rng.uniform(radius, 1 - radius) if cy is None else min(max(cy, radius), 1 - radius)
        poses.append(Pose((k + 0.5) * slot, cy, radius, rotation))
    return poses


def random_identity(rng: random.Random) -> SubjectIdentity:
    """A random subject (shape, two distinct palette colours, texture) drawn from ``rng``."""
    colours = tuple(rng.sample(sorted(PALETTE), 2))
    return SubjectIdentity(rng.choice(KINDS), colours, rng.choice(TEXTURES))  # type: ignore[arg-type]


def random_pose(rng: random.Random) -> Pose:
    """A random pose drawn from ``rng`` that keeps the subject inside the image."""
    radius = rng.uniform(0.18, 0.32)
    return Pose(rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius), radius, rng.uniform(0, 2 * math.pi))


_LAYOUT_CENTRES = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the corner": (0.28, 0.28),
    "in the centre": (0.5, 0.5),
}
_SCALE_RADII = {"tiny": 0.17, "small": 0.2, "large": 0.28, "big": 0.3}
_POSE_ROTATIONS = {
    "tilted": math.pi / 6,
    "upside down": math.pi,
    "turned": math.pi / 2,
    "lying on its side": -math.pi / 2,
}


def prompt_pose(layout: str, scale: str, pose: str, rng: random.Random) -> Pose:
    """The pose a prompt of the procedural world asks for ("on the left", "small", "tilted"), with a little jitter
    from ``rng``; the subject stays inside the image."""
    radius = _SCALE_RADII[scale] * rng.uniform(0.95, 1.05)
    cx, cy = (min(max(c + rng.uniform(-0.04, 0.04), radius), 1 - radius) for c in _LAYOUT_CENTRES[layout])
    return Pose(cx, cy, radius, _POSE_ROTATIONS[pose] + rng.uniform(-0.15, 0.15))


def _mask_image(mask: Tensor) -> Image.Image:
    """A ``{0, 1}`` mask as the 8-bit L image the shards store."""
    return Image.fromarray((mask * 255).to(torch.uint8).numpy(), mode="L")


def synthetic_records(
    num_identities: int,
    *,
    size: int = 128,
    prompts_per_identity: int = 4,
    seed: int = 0,
    prefix: str = "synth",
    references_per_identity: int = 1,
    targets: bool = False,
) -> Iterator[IdentityRecord]:
    """``num_identities`` distinct procedural identities as :class:`IdentityRecord` s, deterministic for ``seed``.

    Each identity is drawn as ``references_per_identity`` references (random poses of the same subject), each with
    its mask. Further poses are drawn after the first pose and the prompts, so one reference per identity (the
    default) draws exactly the records the demo dataset holds. ``targets=True`` adds a target image per prompt: the
    same subject in the pose the prompt asks for (:func:`prompt_pose`), for supervised fine-tuning; the targets come
    from a generator of their own, so the other fields do not change.
    """
    if references_per_identity < 1:
        raise ValueError(f"references_per_identity must be >= 1, got {references_per_identity}")
    rng = random.Random(seed)
    seen: set[SubjectIdentity] = set()
    index = 0
    while index < num_identities:
        identity = random_identity(rng)
        if identity in seen:
            if len(seen) >= len(KINDS) * len(TEXTURES) * len(PALETTE) * (len(PALETTE) - 1):
                raise ValueError(f"the synthetic world has fewer than {num_identities} distinct identities")
            continue
        seen.add(identity)
        views = [render(identity, random_pose(rng), size)]
        asks = [
            (rng.choice(_LAYOUTS), rng.choice(_SCALES), rng.choice(_POSES), rng.choice(_PLACES))
            for _ in range(prompts_per_identity)
        ]
        prompts = [
            f"a photo of the {identity.name} {layout}, {scale} and {pose}, {place}"
            for layout, scale, pose, place in asks
        ]
        views += [render(identity, random_pose(rng), size) for _ in range(references_per_identity - 1)]
        if targets:  # from a generator of their own: the records without targets stay as they were
            other = random.Random(f"divrl-targets/{seed}/{index}")
            targets_of = {
                p: to_pil(render(identity, prompt_pose(*ask[:3], other), size)[0]) for p, ask in enumerate(asks)
            }
        yield IdentityRecord(
            id=f"{prefix}_{index:05d}",
            references=[to_pil(image) for image, _ in views],
            prompts=prompts,
            masks=[_mask_image(mask) for _, mask in views],
            source="synthetic",
            category="object",
            license="CC0-1.0",
            extra={"kind": identity.kind, "colours": list(identity.colours), "texture": identity.texture},
            targets=targets_of if targets else {},
        )
        index += 1


_SLOTS = {
    2: ("on the left", "on the right"),
    3: ("on the left", "in the middle", "on the right"),
    4: ("on the far left", "on the left", "on the right", "on the far right"),
}


def scene_prompt(identities, rng: random.Random) -> str:
    """A prompt naming every subject of a scene left to right, and a place drawn from ``rng``."""
    named = " and ".join(f"the {identity.name} {slot}" for identity, slot in zip(identities, _SLOTS[len(identities)]))
    return f"a photo of {named}, {rng.choice(_PLACES)}"


def multi_subject_records(
    num_samples: int,
    *,
    size: int = 128,
    prompts_per_identity: int = 4,
    seed: int = 0,
    prefix: str = "multi",
    subjects: tuple[int, ...] = (2, 3, 4),
    weights: tuple[float, ...] | None = (0.9, 0.05, 0.05),
) -> Iterator[IdentityRecord]:
    """Multi-subject conditions of the procedural world: each sample draws ``K`` distinct subjects (``K`` from
    ``subjects`` with probabilities ``weights``; PSR's training mix of 2 / 3 / 4 by default), deterministic for
    ``seed``.

    A sample holds one reference per subject (the subject alone in a random pose, with its mask), the subjects' shape
    words as ``extra["subjects"]`` (the category words the multi-subject rewards detect them by), and prompts that
    name every subject left to right ("a photo of the red striped star on the left and the blue plain disc on the
    right, on the beach"). Subjects of one sample have distinct identities (their shapes may repeat).
    """
    if not subjects or any(k not in _SLOTS for k in subjects):
        raise ValueError(f"subjects must be counts among {sorted(_SLOTS)}, got {subjects!r}")
    if weights is not None and len(weights) != len(subjects):
        raise ValueError(f"give one weight per subject count: {len(subjects)} counts, {len(weights)} weights")
    rng = random.Random(seed)
    for index in range(num_samples):
        count = rng.choices(subjects, weights=weights)[0] if len(subjects) > 1 else subjects[0]
        identities: list[SubjectIdentity] = []
        while len(identities) < count:
            identity = random_identity(rng)
            if identity not in identities:
                identities.append(identity)
        views = [render(identity, random_pose(rng), size) for identity in identities]
        prompts = [scene_prompt(identities, rng) for _ in range(prompts_per_identity)]
        yield IdentityRecord(
            id=f"{prefix}_{index:05d}",
            references=[to_pil(image) for image, _ in views],
            prompts=prompts,
            masks=[_mask_image(mask) for _, mask in views],
            source="synthetic",
            license="CC0-1.0",
            extra={
                "subjects": [identity.kind for identity in identities],
                "identities": [{"kind": i.kind, "colours": list(i.colours), "texture": i.texture} for i in identities],
            },
        )


def write_shards(
    records, out_dir: str | os.PathLike, *, shard_size: int = 100, name: str = "shard", start: int = 0
) -> list[Path]:
    """Write records as ``<out_dir>/<name>-000000.tar``, ... (numbered from ``start``); each shard is written to a
    temporary name and renamed when complete, so an interrupted run never leaves a half-written shard that training
    would read (a killed process leaves its ``.tar.partial``, which the next ``divrl data`` into the folder removes).
    The tar members carry a fixed time stamp: the same records give the same bytes (the committed demo shards stay
    unchanged when regenerated)."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    batch: list[IdentityRecord] = []

    def flush() -> None:
        final = out / f"{name}-{start + len(paths):06d}.tar"
        partial = final.with_name(final.name + ".partial")
        try:
            with wds.TarWriter(str(partial), mtime=0.0) as writer:
                for record in batch:
                    writer.write(record.to_sample())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(final)
        paths.append(final)
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return paths


DEMO_TRAIN_IDENTITIES = 24
DEMO_VAL_IDENTITIES = 8


def write_demo_dataset(out_dir: str | os.PathLike, *, size: int = 64, seed: int = 0) -> list[Path]:
    """The committed demo dataset (``data/demo``): 24 training identities in two shards and 8 held-out validation
    identities, 4 prompts each, ``size``-pixel references with masks and a target image per prompt (for the
    supervised objectives). Deterministic: rewriting it gives the same samples."""
    train = synthetic_records(
        DEMO_TRAIN_IDENTITIES, size=size, prompts_per_identity=4, seed=seed, prefix="train", targets=True
    )
    val = synthetic_records(
        DEMO_VAL_IDENTITIES, size=size, prompts_per_identity=4, seed=seed + 1, prefix="val", targets=True
    )
    return write_shards(train, out_dir, shard_size=12, name="train") + write_shards(
        val, out_dir, shard_size=8, name="val"
    )


DEMO_MULTI_TRAIN = 48
DEMO_MULTI_VAL = 8


def write_demo_multi_dataset(out_dir: str | os.PathLike, *, size: int = 64, seed: int = 0) -> list[Path]:
    """The committed multi-subject demo dataset (``data/demo-multi``): 48 training and 8 held-out conditions of two
    subjects each, 4 prompts each, ``size``-pixel references with masks. Deterministic."""
    train = multi_subject_records(
        DEMO_MULTI_TRAIN, size=size, seed=seed + 10, prefix="train", subjects=(2,), weights=None
    )
    val = multi_subject_records(DEMO_MULTI_VAL, size=size, seed=seed + 11, prefix="val", subjects=(2,), weights=None)
    return write_shards(train, out_dir, shard_size=24, name="train") + write_shards(
        val, out_dir, shard_size=8, name="val"
    )
