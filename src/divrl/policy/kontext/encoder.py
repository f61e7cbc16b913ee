"""FLUX.1 Kontext conditioning: prompts and reference images → :class:`Condition`, and the precomputed payload.

:class:`KontextEncoder` is the only reader and writer of the payload ``divrl data --precompute`` stores in a shard
(``cond.pth``): a dict with ``model``, ``resolution``, ``max_sequence_length``, ``prompts`` (the identity's prompts
it was computed for; absent in payloads written before divrl's seams), ``prompt_embeds`` ``(P, L, D)`` and
``pooled_prompt_embeds`` ``(P, D')`` (one row per prompt of the identity, in order) and ``image_latents`` ``(K, T, C)``
(the packed latents of each of the identity's ``K`` references). Prompt encoding and reference preprocessing go through
diffusers' own ``FluxKontextPipeline`` methods on the policy's components, so tokenisation, truncation and VAE scaling
match the pipeline by construction.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from divrl.images import ImageLike, to_image_batch
from divrl.policy.rows import BatchRows, no_vae_encoder, remember

if TYPE_CHECKING:
    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import ConditionSample
    from divrl.policy.kontext.policy import KontextPolicy

__all__ = ["Condition", "KontextEncoder", "PAYLOAD_FIELDS"]

log = logging.getLogger(__name__)

PAYLOAD_FIELDS = (
    "model",
    "resolution",
    "max_sequence_length",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "image_latents",
)
"""The entries of a precomputed Kontext payload."""


@dataclass
class Condition(BatchRows):
    """Everything the transformer needs besides the noisy latents, for a batch of samples (a :class:`Conditioning`).

    Batch tensors have the samples along dim 0 (a group of ``G`` samples of one condition repeats its row ``G``
    times); ``text_ids`` and ``img_ids`` are shared by the batch.

    Attributes:
        prompt_embeds: T5 token embeddings ``(B, L, D)``.
        pooled_prompt_embeds: CLIP pooled embedding ``(B, D')``.
        text_ids: text position ids ``(L, 3)`` (zeros, as in FLUX).
        image_latents: packed latents of every reference, one after the other, ``(B, K·T_ref, 4·C)``.
        img_ids: position ids of the noisy tokens followed by each reference's tokens ``(T + K·T_ref, 3)``
            (:func:`reference_ids`).
        guidance: distilled guidance scale per sample ``(B,)`` (float32), or ``None`` for models without it.
        height, width: generated image size in pixels.
        num_tokens: ``T``, the number of noisy image tokens (the transformer output is cut back to them).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    text_ids: Tensor
    image_latents: Tensor
    img_ids: Tensor
    guidance: Tensor | None
    height: int
    width: int
    num_tokens: int

    row_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds", "image_latents", "guidance")
    """The per-row tensors (the position ids are shared by the batch)."""

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]


POSITIONS = ("frame", "stitch")
"""How several references are placed in FLUX's position space (``policy.reference_positions``)."""


def reference_ids(latent_ids: Tensor, count: int, positions: str, width: int) -> Tensor:
    """The position ids ``(count · T_ref, 3)`` of ``count`` references whose tokens each sit on the grid of
    ``latent_ids`` ``(T_ref, 3)`` (channels: frame index, row, column; ``width`` packed columns).

    ``frame`` (the FLUX.1 Kontext paper's multi-image scheme, PSR's): reference *i* (1-based) is frame *i*, its rows and
    columns restarting at 0. ``stitch`` (diffusers' community multi-image pipeline): every reference in frame 1, side
    by side, reference *i*'s columns shifted by ``(i − 1) · width``. With one reference both are frame 1, columns from
    0: FLUX.1 Kontext's single-reference ids.
    """
    if positions not in POSITIONS:
        raise ValueError(f"policy.reference_positions: {positions!r} is not one of {list(POSITIONS)}")
    blocks = []
    for i in range(count):
        ids = latent_ids.clone()
        ids[..., 0] = i + 1 if positions == "frame" else 1
        if positions == "stitch":
            ids[..., 2] += i * width
        blocks.append(ids)
    return torch.cat(blocks)


class KontextEncoder:
    """Encodes prompts and references for a :class:`~divrl.policy.KontextPolicy`, caching both (least recently used
    entries evicted beyond ``cache_size``), and reads and writes the precomputed payload.

    Args:
        policy: the policy whose components encode (held, not copied).
        cache_size: how many encoded prompts (and, separately, references) to keep.
    """

    def __init__(self, policy: KontextPolicy, cache_size: int = 256):
        self.policy = policy
        self.cache_size = cache_size
        self.prompts: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.references: OrderedDict[tuple, Tensor] = OrderedDict()
        self._warned_model = False

    def clear(self) -> None:
        self.prompts.clear()
        self.references.clear()

    # ------------------------------------------------------------------------------------------------ encoding

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """T5 embeddings ``(B, L, D)``, CLIP pooled ``(B, D')`` and text ids ``(L, 3)``; each prompt encoded once."""
        policy = self.policy
        if policy.text_encoder is None or policy.text_encoder_2 is None:
            raise RuntimeError(
                "this policy was loaded without text encoders (policy.text_encoders: false), so every condition must "
                "come precomputed: convert the shards with `divrl data ... --precompute MODEL`"
            )
        unique = list(dict.fromkeys(prompts))
        # Collect this call's encodings first: caching new prompts may evict ones this call still needs.
        found = {p: self.prompts[p] for p in unique if p in self.prompts}
        missing = [p for p in unique if p not in found]
        if missing:
            embeds, pooled, _ = policy.pipeline().encode_prompt(
                prompt=missing, prompt_2=None, device=policy.device, max_sequence_length=policy.max_sequence_length
            )
            for k, prompt in enumerate(missing):
                found[prompt] = (embeds[k : k + 1], pooled[k : k + 1])
        for prompt in prompts:
            remember(self.prompts, prompt, found[prompt], self.cache_size)  # (re)inserted as most recently used
        embeds = torch.cat([found[p][0] for p in prompts])
        pooled = torch.cat([found[p][1] for p in prompts])
        text_ids = torch.zeros(embeds.shape[1], 3, device=policy.device, dtype=embeds.dtype)
        return embeds, pooled, text_ids

    @torch.no_grad()
    def encode_reference(self, image: ImageLike, height: int, width: int, key: str | None = None) -> Tensor:
        """VAE-encode one reference image at ``height × width`` → packed latents ``(1, T_ref, 4·C)``.

        The image is resized (aspect not kept, as in DivRL's 512×512 training) and normalised by diffusers'
        ``VaeImageProcessor``; the latent is the distribution's mode, shifted and scaled as the pipeline does.
        ``key`` (e.g. the identity id) enables caching across groups.
        """
        policy = self.policy
        cache_key = None if key is None else (key, height, width)
        if cache_key is not None and cache_key in self.references:
            self.references.move_to_end(cache_key)
            return self.references[cache_key]
        policy.check_size(height, width)
        vae = policy.vae
        if vae.encoder is None:
            raise no_vae_encoder()
        pixels = to_image_batch(image, "reference")
        if pixels.shape[0] != 1:
            raise ValueError(f"encode_reference: expected one image, got {pixels.shape[0]}")
        pipe = policy.pipeline()
        processor = pipe.image_processor
        pixels = processor.preprocess(processor.resize(pixels, height, width), height, width)
        pixels = pixels.to(device=policy.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        packed = pipe._pack_latents(latents, 1, latents.shape[1], latents.shape[2], latents.shape[3])
        packed = packed.to(policy.dtype)
        if cache_key is not None:
            remember(self.references, cache_key, packed, self.cache_size)
        return packed

    def condition(
        self,
        references: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        height: int,
        width: int,
        guidance: float,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> Condition:
        """Conditions for ``len(prompts)`` (reference, prompt) pairs, each repeated ``group_size`` times (see
        :meth:`KontextPolicy.condition`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(references, Tensor):
            references = list(references) if references.dim() == 4 else [references] * len(prompts)
        elif isinstance(references, (str, os.PathLike)) or not isinstance(references, Sequence):
            references = [references] * len(prompts)
        if len(references) != len(prompts):
            raise ValueError(f"condition: {len(references)} references for {len(prompts)} prompts; give one per prompt")
        # each prompt's references: one image, or a list of K images (every prompt of a batch the same K)
        per_prompt = [list(r) if isinstance(r, (list, tuple)) else [r] for r in references]
        counts = sorted({len(r) for r in per_prompt})
        if len(counts) != 1 or counts[0] < 1:
            raise ValueError(
                f"condition: the prompts of one batch have {counts} references; give each the same "
                f"number (at least one), or condition them in separate batches"
            )
        keys = list(reference_keys) if reference_keys is not None else [None] * len(prompts)
        embeds, pooled, _ = self.encode_prompts(prompts)
        image_latents = torch.cat(
            [
                torch.cat(
                    [
                        self.encode_reference(image, height, width, None if key is None else f"{key}#{i}" if i else key)
                        for i, image in enumerate(images)
                    ],
                    dim=1,
                )
                for images, key in zip(per_prompt, keys)
            ]
        )
        return self.condition_from_precomputed(embeds, pooled, image_latents, height, width, guidance, group_size)

    def condition_from_precomputed(
        self,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        image_latents: Tensor,
        height: int,
        width: int,
        guidance: float,
        group_size: int = 1,
    ) -> Condition:
        """Conditions from embeddings and reference latents computed earlier, without the text encoders or the VAE
        encoder; the same result as :meth:`condition` on the same inputs (see
        :meth:`KontextPolicy.condition_from_precomputed`)."""
        policy = self.policy
        batch = prompt_embeds.shape[0]
        if pooled_prompt_embeds.shape[0] != batch or image_latents.shape[0] != batch:
            raise ValueError(
                f"condition_from_precomputed: batch sizes differ: prompt_embeds {batch}, pooled "
                f"{pooled_prompt_embeds.shape[0]}, image_latents {image_latents.shape[0]}"
            )
        latent_h, latent_w = policy.latent_grid(height, width)
        expected = (latent_h // 2) * (latent_w // 2)
        count = image_latents.shape[1] // expected
        if image_latents.shape[1] % expected or count < 1:
            raise ValueError(
                f"condition_from_precomputed: reference latents have {image_latents.shape[1]} tokens, a {height}x{width} "
                f"image has {expected} per reference; precompute at the training resolution"
            )
        device, dtype = policy.device, policy.dtype
        embeds = prompt_embeds.to(device=device, dtype=dtype)
        pooled = pooled_prompt_embeds.to(device=device, dtype=dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        latent_ids = policy.pipeline()._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)
        image_ids = reference_ids(latent_ids, count, policy.reference_positions, latent_w // 2)
        guidance_t = None
        if policy.transformer.config.guidance_embeds:
            guidance_t = torch.full((batch,), guidance, device=device, dtype=torch.float32)
        condition = Condition(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            text_ids=text_ids,
            image_latents=image_latents.to(device=device, dtype=dtype),
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            guidance=guidance_t,
            height=height,
            width=width,
            num_tokens=latent_ids.shape[0],
        )
        return condition.repeat_interleave(group_size) if group_size > 1 else condition

    # ------------------------------------------------------------------------------------------------ samples

    def encode(
        self, samples: Sequence[ConditionSample], height: int, width: int, guidance: float, group_size: int = 1
    ) -> Condition:
        """The batch's conditions: from the precomputed payloads when every sample has one (no text encoder or VAE
        encoder runs), else encoded from the prompts and reference images."""
        counts = {len(s.references) for s in samples}
        if len(counts) > 1:
            raise ValueError(
                f"KontextPolicy: the identities of one batch have {sorted(counts)} references "
                f"({', '.join(f'{s.id}: {len(s.references)}' for s in samples)}); batch identities with "
                f"the same number of references (data.batch_size 1 mixes any)"
            )
        foreign = any(isinstance(s.conditioning, dict) and "family" in s.conditioning for s in samples)
        policy = self.policy
        live = None not in (policy.text_encoder, policy.text_encoder_2, policy.vae.encoder)
        if all(s.conditioning is not None for s in samples) and not (foreign and live):  # another family's: live
            rows = [self.read_payload(s, height) for s in samples]
            latents = [r[2].reshape(1, -1, r[2].shape[-1]) for r in rows]  # (K, T, C) → (1, K·T, C), in order
            return self.condition_from_precomputed(
                torch.cat([r[0] for r in rows]),
                torch.cat([r[1] for r in rows]),
                torch.cat(latents),
                height,
                width,
                guidance,
                group_size,
            )
        return self.condition(
            [list(s.references) for s in samples],
            [s.prompt for s in samples],
            height,
            width,
            guidance,
            group_size,
            reference_keys=[s.id for s in samples],
        )

    def read_payload(self, sample: ConditionSample, resolution: int) -> tuple[Tensor, Tensor, Tensor]:
        """The sample's rows of its identity's payload: prompt embeddings ``(1, L, D)``, pooled ``(1, D')`` and the
        reference latents ``(K, T, C)``, after checking that the payload fits this policy and run."""
        payload, policy = sample.conditioning, self.policy
        if isinstance(payload, dict) and "family" in payload:  # FLUX.1 Kontext's payloads carry no family
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was made for another model family "
                f"({payload['family']}), not FLUX.1 Kontext: set policy.text_encoders: true (Kontext then "
                f"encodes every condition itself and ignores it), or precompute with a Kontext model"
            )
        missing = [k for k in PAYLOAD_FIELDS if not isinstance(payload, dict) or k not in payload]
        if missing:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning lacks {missing}; rewrite the shards "
                f"with `divrl data ... --precompute MODEL`"
            )
        want = {"resolution": resolution, "max_sequence_length": policy.max_sequence_length}
        wrong = {k: payload[k] for k, v in want.items() if payload[k] != v}
        if wrong:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning has {wrong}, this run needs {want}. Convert the "
                f"shards again with `divrl data ... --precompute {policy.model_id} --precompute-resolution "
                f"{want['resolution']} --max-sequence-length {want['max_sequence_length']}`, or set "
                f"policy.text_encoders: true and drop the precomputed entries"
            )
        rows = len(payload["prompt_embeds"])
        if not 0 <= sample.prompt_index < rows or len(payload["pooled_prompt_embeds"]) != rows:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning has {rows} prompt rows, the prompt "
                f"drawn is number {sample.prompt_index}; rewrite the shards with --precompute"
            )
        prompts = payload.get("prompts")  # payloads written since divrl's seams name their prompts
        if prompts is not None and (len(prompts) != rows or prompts[sample.prompt_index] != sample.prompt):
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was computed for other prompts "
                f"({len(prompts)} rows; the one drawn is {sample.prompt!r}): the shards were edited after "
                f"--precompute; rewrite them"
            )
        if len(payload["image_latents"]) != len(sample.references):
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning has {len(payload['image_latents'])} "
                f"reference latents for {len(sample.references)} references; rewrite the shards"
            )
        if payload["model"] != policy.model_id and not self._warned_model:
            log.warning(
                "precomputed conditioning of %r was made with model %r; training %r",
                sample.id,
                payload["model"],
                policy.model_id,
            )
            self._warned_model = True
        index = slice(sample.prompt_index, sample.prompt_index + 1)
        return payload["prompt_embeds"][index], payload["pooled_prompt_embeds"][index], payload["image_latents"]

    @torch.no_grad()
    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        """The payload of ``record``: every prompt's embeddings and every reference's packed latents at
        ``resolution``², in the policy's dtype, on the CPU (see the module docstring)."""
        embeds, pooled, _ = self.encode_prompts(record.prompts)
        latents = torch.cat([self.encode_reference(r, resolution, resolution) for r in record.references])
        self.clear()  # every identity has its own prompts: keep host memory flat
        return {
            "model": self.policy.model_id,
            "resolution": resolution,
            "prompts": list(record.prompts),
            "max_sequence_length": self.policy.max_sequence_length,
            "prompt_embeds": embeds.cpu().clone(),
            "pooled_prompt_embeds": pooled.cpu().clone(),
            "image_latents": latents.cpu().clone(),
        }
