"""The identity shard schema (DESIGN.md "Shard schema"): one WebDataset sample = one identity.

``__key__`` is the identity id; ``ref.png`` the RGB reference; ``mask.png`` the optional subject mask (8-bit L);
``json`` = ``{"id", "prompts": [...], "category"?, "source", "license"?}``. A training condition is
(identity, one prompt drawn from its list).

Optional ``cond.pth`` (written by ``divrl data --precompute MODEL``): the conditioning a Kontext model computes from
the identity, so training can skip the text encoders and the VAE encoder: a ``torch.save`` d dict with ``model``,
``resolution``, ``max_sequence_length``, ``prompt_embeds`` ``(P, L, D)`` and ``pooled_prompt_embeds`` ``(P, D')`` (one
row per prompt, in the order of ``prompts``) and ``image_latents`` ``(1, T, C)`` (the packed reference latents).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import torch
from PIL import Image

__all__ = ["IdentityRecord", "REF_KEY", "MASK_KEY", "META_KEY", "COND_KEY", "check_identity_id"]

REF_KEY = "ref.png"
MASK_KEY = "mask.png"
META_KEY = "json"
COND_KEY = "cond.pth"
CONDITIONING_FIELDS = ("model", "resolution", "max_sequence_length", "prompt_embeds", "pooled_prompt_embeds",
                       "image_latents")  # fmt: skip
_ID = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


def check_identity_id(identity_id: str) -> str:
    """Return ``identity_id`` if it can be a WebDataset key (letters, digits, ``_``, ``-``, ``/``; no dots, which
    WebDataset reads as extension separators), else raise a ValueError saying how to fix it."""
    if not isinstance(identity_id, str) or not _ID.match(identity_id):
        raise ValueError(
            f"identity id {identity_id!r} cannot be a shard key: use letters, digits, '_', '-' and '/' only (no dots "
            f"or spaces), e.g. {re.sub(r'[^A-Za-z0-9_/-]+', '_', str(identity_id)).strip('_') or 'identity_0'!r}"
        )
    return identity_id


@dataclass
class IdentityRecord:
    """One identity: a reference image, an optional subject mask, and the prompts to condition on.

    Attributes:
        id: identity id (the shard key; see :func:`check_identity_id`).
        reference: the reference image (RGB).
        prompts: edit prompts for this identity (at least one).
        mask: optional subject mask (L; white = subject).
        source: where the identity comes from (``"synthetic"``, ``"syncd"``, ``"dreambench"``, ``"dreambooth"``...).
        category: optional category (DreamBench++: animal, human, object, style).
        license: optional licence of the reference image.
        extra: further JSON fields, kept as they are.
        conditioning: optional precomputed conditioning (see the module docstring), one row per prompt.
    """

    id: str
    reference: Image.Image
    prompts: list[str]
    mask: Image.Image | None = None
    source: str = "unknown"
    category: str | None = None
    license: str | None = None
    extra: dict = field(default_factory=dict)
    conditioning: dict | None = None

    def __post_init__(self) -> None:
        check_identity_id(self.id)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"identity {self.id!r}: needs at least one non-empty prompt, got {self.prompts!r}")
        if self.mask is not None and self.mask.size != self.reference.size:
            raise ValueError(
                f"identity {self.id!r}: mask size {self.mask.size} differs from the reference size {self.reference.size}"
            )
        if self.conditioning is not None:
            rows = [len(self.conditioning[k]) for k in ("prompt_embeds", "pooled_prompt_embeds")]
            if rows != [len(self.prompts)] * 2:
                raise ValueError(
                    f"identity {self.id!r}: precomputed conditioning has {rows} rows for {len(self.prompts)} prompts"
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
        reference = _open(sample[REF_KEY], key, REF_KEY, "RGB")
        mask = _open(sample[MASK_KEY], key, MASK_KEY, "L") if MASK_KEY in sample else None
        conditioning = _conditioning(sample[COND_KEY], key) if COND_KEY in sample else None
        known = {"id", "prompts", "source", "category", "license"}
        return cls(
            id=meta.get("id", key),
            reference=reference,
            prompts=list(meta.get("prompts") or []),
            mask=mask,
            source=meta.get("source", "unknown"),
            category=meta.get("category"),
            license=meta.get("license"),
            extra={k: v for k, v in meta.items() if k not in known},
            conditioning=conditioning,
        )


def _conditioning(data: bytes, key: str) -> dict:
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a broken entry
        raise ValueError(f"shard sample {key!r}: {COND_KEY!r} is not a readable conditioning file ({err})") from None
    missing = [k for k in CONDITIONING_FIELDS if not isinstance(value, dict) or k not in value]
    if missing:
        raise ValueError(f"shard sample {key!r}: {COND_KEY!r} lacks {missing}; rewrite it with divrl data --precompute")
    return value


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open(data: bytes, key: str, name: str, mode: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert(mode)
    except OSError as err:
        raise ValueError(f"shard sample {key!r}: {name!r} is not a readable image ({err})") from None
