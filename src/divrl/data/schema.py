"""The identity shard schema (DESIGN.md "Shard schema"): one WebDataset sample = one identity.

Entries of a sample (the tar member ``<__key__>.<entry>``):

- ``__key__``: the identity id (see :func:`check_identity_id`).
- ``ref.png``: reference 0, RGB (required).
- ``mask.png``: optional subject mask of reference 0 (8-bit L, white = subject).
- ``ref_1.png``, ``ref_2.png``, ...: further references of the same identity, RGB. Indices are contiguous: reading
  stops at the first missing ``ref_i.png`` (a ``ref_i.png`` after a gap is not read).
- ``mask_1.png``, ``mask_2.png``, ...: optional mask of ``ref_i.png``. A ``mask_i.png`` whose ``ref_i.png`` is not
  read, or a mask whose size differs from its reference's, makes the sample bad (skipped and counted by the streams).
- ``target_<p>.png``: optional target image of prompt ``p`` (0-based index into ``prompts``), RGB: what a
  supervised objective (:class:`~divrl.objectives.SFTObjective`) trains the generator to produce for (references,
  prompt ``p``); another photo of the same subject. Prompts without a target are fine.
- ``rejected_<p>.png``: optional *rejected* image of prompt ``p``, RGB: with ``target_<p>.png`` (the chosen image) it
  makes a preference pair for offline DPO (:class:`~divrl.objectives.DPOObjective` with ``pairs: shards``). A
  rejected image without its target makes the sample bad.
- ``json``: ``{"id", "prompts": [...], "source", ..., "category"?, "license"?}``; further fields are kept as
  :attr:`IdentityRecord.extra`.
- ``cond.pth`` (optional, written by ``divrl data --precompute MODEL``): the conditioning a model family precomputes
  for the identity, so that training can skip its encoders. It is **opaque** here: a ``torch.save`` d dict, written by
  the policy's ``precompute`` and read only by that model family's encoder. The data layer only checks that
  ``torch.load(..., weights_only=True)`` reads it as a dict.

A single-reference identity (K = 1) is stored exactly as before references 1.. existed. A training condition is
(identity, one prompt drawn from its list).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IdentityRecord",
    "REF_KEY",
    "MASK_KEY",
    "META_KEY",
    "COND_KEY",
    "check_identity_id",
    "reference_key",
    "mask_key",
    "normalise_references",
    "target_key",
    "rejected_key",
    "image_error",
]

REF_KEY = "ref.png"
MASK_KEY = "mask.png"
META_KEY = "json"
COND_KEY = "cond.pth"
_ID = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_MASK_I = re.compile(r"^mask_([1-9][0-9]*)\.png$")
_PER_PROMPT = re.compile(r"^(target|rejected)_(0|[1-9][0-9]*)\.png$")


def reference_key(index: int) -> str:
    """The sample entry of reference ``index``: ``ref.png`` for 0, then ``ref_1.png``, ``ref_2.png``, ..."""
    return REF_KEY if index == 0 else f"ref_{index}.png"


def mask_key(index: int) -> str:
    """The sample entry of the mask of reference ``index``: ``mask.png`` for 0, then ``mask_1.png``, ..."""
    return MASK_KEY if index == 0 else f"mask_{index}.png"


def target_key(prompt: int) -> str:
    """The sample entry of the target image of prompt number ``prompt``: ``target_0.png``, ``target_1.png``, ..."""
    return f"target_{prompt}.png"


def rejected_key(prompt: int) -> str:
    """The sample entry of the rejected image of prompt number ``prompt``: ``rejected_0.png``, ..."""
    return f"rejected_{prompt}.png"


def check_identity_id(identity_id: str) -> str:
    """Return ``identity_id`` if it can be a WebDataset key (letters, digits, ``_``, ``-``, ``/``; no dots, which
    WebDataset reads as extension separators), else raise a ValueError saying how to fix it."""
    if not isinstance(identity_id, str) or not _ID.match(identity_id):
        raise ValueError(
            f"identity id {identity_id!r} cannot be a shard key: use letters, digits, '_', '-' and '/' only (no dots "
            f"or spaces), e.g. {re.sub(r'[^A-Za-z0-9_/-]+', '_', str(identity_id)).strip('_') or 'identity_0'!r}"
        )
    return identity_id


def normalise_references(identity: str, references, masks) -> tuple[list, list]:
    """The references and masks of ``identity`` as two lists of the same length.

    Args:
        identity: the identity id, named in errors.
        references: a list (or tuple) of images, at least one; anything else (a ``PIL.Image``, a tensor...) is one
            reference.
        masks: ``None`` (no masks), a list (or tuple) with one entry (an image or ``None``) per reference, padded
            with ``None`` when shorter; anything else is the mask of the first reference.

    Returns:
        ``(references, masks)``, new lists, ``len(masks) == len(references)``.

    Raises:
        ValueError: no reference, more masks than references, or a PIL mask whose size differs from its PIL
            reference's; the message names the identity and the index.
    """
    refs = list(references) if isinstance(references, (list, tuple)) else [references]
    if not refs or any(image is None for image in refs):
        raise ValueError(f"identity {identity!r}: needs at least one reference image (and no None), got {references!r}")
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if len(masks) > len(refs):
        raise ValueError(
            f"identity {identity!r}: {len(masks)} masks for {len(refs)} references; give one mask (or None) per "
            f"reference"
        )
    masks += [None] * (len(refs) - len(masks))
    for index, (image, mask) in enumerate(zip(refs, masks)):
        if isinstance(image, Image.Image) and isinstance(mask, Image.Image) and mask.size != image.size:
            raise ValueError(
                f"identity {identity!r}: mask {index} has size {mask.size} but reference {index} has size "
                f"{image.size}; resize the mask to its reference"
            )
    return refs, masks


class FirstReference:
    """``reference`` and ``mask``: the first reference (``ref.png``) and its mask, for single-subject code."""

    references: list  # provided by the dataclass that mixes this in
    masks: list

    @property
    def reference(self) -> Image.Image:
        """The first reference."""
        return self.references[0]

    @property
    def mask(self) -> Image.Image | None:
        """The mask of the first reference, or ``None``."""
        return self.masks[0]


@dataclass
class IdentityRecord(FirstReference):
    """One identity: one or more reference images, their optional subject masks, and the prompts to condition on.

    ``IdentityRecord(id, image, prompts, mask)`` (one image and its mask, not in a list) means one reference. After
    construction ``masks`` is a list as long as ``references``, ``None`` where a reference has no mask (see
    :func:`normalise_references`).

    Attributes:
        id: identity id (the shard key; see :func:`check_identity_id`).
        references: the reference images (RGB), at least one; reference 0 is ``ref.png``.
        prompts: edit prompts for this identity (at least one).
        masks: optional subject masks (L; white = subject), one entry (an image or ``None``) per reference; each has
            the size of its reference.
        source: where the identity comes from (``"synthetic"``, ``"syncd"``, ``"dreambench"``, ``"dreambooth"``...).
        category: optional category (DreamBench++: animal, human, object, style).
        license: optional licence of the reference images.
        extra: further JSON fields, kept as they are.
        conditioning: optional precomputed conditioning (``cond.pth``): a dict, opaque to the data layer (see the
            module docstring).
        targets: optional target image per prompt, ``{prompt index: image}`` (``target_<p>.png``): supervised pairs.
        rejected: optional rejected image per prompt (``rejected_<p>.png``), each with a target: preference pairs.
    """

    id: str
    references: list[Image.Image]
    prompts: list[str]
    masks: list[Image.Image | None] | None = None
    source: str = "unknown"
    category: str | None = None
    license: str | None = None
    extra: dict = field(default_factory=dict)
    conditioning: dict | None = None
    targets: dict[int, Image.Image] = field(default_factory=dict)
    rejected: dict[int, Image.Image] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_identity_id(self.id)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"identity {self.id!r}: needs at least one non-empty prompt, got {self.prompts!r}")
        self.references, self.masks = normalise_references(self.id, self.references, self.masks)
        self.targets, self.rejected = dict(self.targets or {}), dict(self.rejected or {})
        for what, images in (("target", self.targets), ("rejected image", self.rejected)):
            bad = [p for p in images if not isinstance(p, int) or not 0 <= p < len(self.prompts)]
            if bad:
                raise ValueError(
                    f"identity {self.id!r}: {what} of prompt {bad[0]!r}, but it has {len(self.prompts)} "
                    f"prompts; key targets by prompt index 0..{len(self.prompts) - 1}"
                )
        orphans = sorted(set(self.rejected) - set(self.targets))
        if orphans:
            raise ValueError(
                f"identity {self.id!r}: prompt {orphans[0]} has a rejected image but no target (the "
                f"chosen image of the pair); give both, or neither"
            )
        named = (
            [("reference", i, im) for i, im in enumerate(self.references)]
            + [("mask", i, im) for i, im in enumerate(self.masks)]
            + [("target", i, im) for i, im in self.targets.items()]
            + [("rejected image", i, im) for i, im in self.rejected.items()]
        )
        for what, index, image in named:
            if image is not None and not isinstance(image, Image.Image):
                raise ValueError(
                    f"identity {self.id!r}: {what} {index} is a {type(image).__name__}; an IdentityRecord holds PIL "
                    f"images (convert it with divrl.images.to_pil or PIL.Image.open)"
                )
        if self.conditioning is not None and not isinstance(self.conditioning, dict):
            raise ValueError(
                f"identity {self.id!r}: precomputed conditioning must be a dict (what cond.pth stores), got a "
                f"{type(self.conditioning).__name__}"
            )

    def to_sample(self) -> dict:
        """The WebDataset sample (``__key__`` plus encoded files) for ``webdataset.TarWriter.write``."""
        meta = {"id": self.id, "prompts": list(self.prompts), "source": self.source, **self.extra}
        if self.category is not None:
            meta["category"] = self.category
        if self.license is not None:
            meta["license"] = self.license
        sample = {"__key__": self.id, REF_KEY: _png(self.reference.convert("RGB")), META_KEY: json.dumps(meta).encode()}
        if self.mask is not None:
            sample[MASK_KEY] = _png(self.mask.convert("L"))
        for index in range(1, len(self.references)):
            sample[reference_key(index)] = _png(self.references[index].convert("RGB"))
            if self.masks[index] is not None:
                sample[mask_key(index)] = _png(self.masks[index].convert("L"))
        for prompt, image in sorted(self.targets.items()):
            sample[target_key(prompt)] = _png(image.convert("RGB"))
        for prompt, image in sorted(self.rejected.items()):
            sample[rejected_key(prompt)] = _png(image.convert("RGB"))
        if self.conditioning is not None:
            buffer = io.BytesIO()
            torch.save(self.conditioning, buffer)
            sample[COND_KEY] = buffer.getvalue()
        return sample

    @classmethod
    def from_sample(cls, sample: dict) -> IdentityRecord:
        """Decode a raw WebDataset sample (bytes per key); errors name the sample and the missing or broken key."""
        key = sample.get("__key__", "<no key>")
        for required in (REF_KEY, META_KEY):
            if required not in sample:
                raise ValueError(f"shard sample {key!r} has no {required!r} entry; it does not follow the divrl schema")
        try:
            meta = json.loads(sample[META_KEY])
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"shard sample {key!r}: {META_KEY!r} is not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise ValueError(
                f"shard sample {key!r}: {META_KEY!r} holds a JSON {type(meta).__name__}, not the object "
                f'of the schema ({{"id", "prompts": [...], ...}}); rewrite the shard with `divrl '
                f"data`"
            )
        prompts = meta.get("prompts") or []
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(
                f"shard sample {key!r}: 'prompts' in {META_KEY!r} must be a JSON list of strings, got a "
                f'{type(prompts).__name__} ({str(prompts)[:60]!r}); write it as ["...", ...] (divrl '
                f"data does)"
            )
        references, masks = [], []
        while reference_key(len(references)) in sample:
            ref, mask = reference_key(len(references)), mask_key(len(references))
            references.append(_open(sample[ref], key, ref, "RGB"))
            masks.append(_open(sample[mask], key, mask, "L") if mask in sample else None)
            if masks[-1] is not None and masks[-1].getbbox() is None:  # all black: no subject to score against
                raise ValueError(f"shard sample {key!r}: {mask!r} is empty (no subject pixel); fix or drop the mask")
        indices = sorted(int(m.group(1)) for name in sample if (m := _MASK_I.match(name)))
        orphans = [index for index in indices if index >= len(references)]
        if orphans:
            raise ValueError(
                f"shard sample {key!r}: {mask_key(orphans[0])!r} has no reference: {reference_key(orphans[0])!r} is "
                f"absent or follows a gap "
                f"(references are ref.png, ref_1.png, ... with contiguous indices); write its reference or drop the "
                f"mask"
            )
        conditioning = _conditioning(sample[COND_KEY], key) if COND_KEY in sample else None
        per_prompt: dict[str, dict[int, Image.Image]] = {"target": {}, "rejected": {}}
        for name in sorted(sample):
            if m := _PER_PROMPT.match(name):
                per_prompt[m.group(1)][int(m.group(2))] = _open(sample[name], key, name, "RGB")
        known = {"id", "prompts", "source", "category", "license"}
        return cls(
            id=meta.get("id", key),
            references=references,
            prompts=prompts,
            masks=masks,
            source=meta.get("source", "unknown"),
            category=meta.get("category"),
            license=meta.get("license"),
            extra={k: v for k, v in meta.items() if k not in known},
            conditioning=conditioning,
            targets=per_prompt["target"],
            rejected=per_prompt["rejected"],
        )


def _conditioning(data: bytes, key: str) -> dict:
    """The ``cond.pth`` payload: any dict ``torch.load(weights_only=True)`` reads; its fields are not looked at."""
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a broken entry
        raise ValueError(
            f"shard sample {key!r}: {COND_KEY!r} is not a readable conditioning file ({err}); rewrite the shards with "
            f"`divrl data ... --precompute MODEL`"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"shard sample {key!r}: {COND_KEY!r} holds a {type(value).__name__}, not the dict that `divrl data ... "
            f"--precompute MODEL` writes; rewrite the shards with it"
        )
    return value


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_error(err: Exception) -> str:
    """Why PIL could not read an image, without the ``<_io.BytesIO object at 0x...>`` it names image bytes by."""
    if isinstance(err, UnidentifiedImageError):
        return "not a PNG, JPEG or other image format PIL reads"
    return f"{type(err).__name__}: {err}"


def _open(data: bytes, key: str, name: str, mode: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"shard sample {key!r}: {name!r} is not a readable image ({image_error(err)}); rewrite the "
            f"shard with `divrl data`"
        ) from None
