"""Qwen-Image-Edit-Plus conditioning: prompts *and* references → :class:`QwenEditCondition`.

Unlike FLUX, the text encoder (Qwen2.5-VL) reads the references with the prompt: the prompt template holds
``Picture i: <|vision_start|><|image_pad|><|vision_end|>`` per reference, and each reference is resized to a
``condition_image_size`` area (the pipeline's ~384²) for the vision tower. Separately, each reference is resized to a
``vae_image_size`` area (~1024²) for the VAE; its latents (normalised by the VAE's per-channel mean and std, packed
2×2) follow the noisy tokens, and ``img_shapes`` gives the transformer every latent grid. :class:`QwenEditEncoder`
does each step with diffusers' own ``QwenImageEditPlusPipeline`` methods on the policy's components, one condition at
a time as the pipeline does (so the embeddings are the pipeline's to the bit), and caches the prompt embeddings per
(prompt, references) and each reference's latents, least recently used evicted.

``divrl data --precompute QWEN_MODEL`` stores, per identity, every prompt's embedding (read with the identity's
references), the negative prompt's, and each reference's packed latents with its grid (:data:`PAYLOAD_FIELDS`), so a
run with ``policy.text_encoders: false`` needs neither the 8B VL encoder (Qwen2.5-VL-7B) nor the VAE encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from divrl.images import ImageLike, to_image_batch, to_pil
from divrl.policy.rows import BatchRows, no_vae_encoder, remember

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.policy.qwen_image.policy import QwenEditPolicy

__all__ = ["QwenEditCondition", "QwenEditEncoder", "pad_embeddings", "FAMILY", "PAYLOAD_FIELDS"]

FAMILY = "qwen-image-edit"
"""The ``family`` entry of this family's precomputed payloads."""

PAYLOAD_FIELDS = (
    "family",
    "model",
    "condition_image_size",
    "vae_image_size",
    "negative_prompt",
    "prompts",
    "prompt_embeds",
    "negative_prompt_embeds",
    "image_latents",
    "image_shapes",
)
"""The entries of a precomputed payload (:meth:`QwenEditEncoder.precompute`)."""


@dataclass
class QwenEditCondition(BatchRows):
    """Everything the Qwen-Image transformer needs besides the noisy latents, for a batch of samples.

    Attributes:
        prompt_embeds: the VL encoder's last hidden states of the prompt (template prefix dropped) ``(B, L, D)``.
        prompt_mask: ``(B, L)`` (1 = a token, 0 = padding), or ``None`` when no row is padded.
        negative_prompt_embeds, negative_mask: the negative prompt's, read with the same references, for true CFG;
            ``None`` without CFG.
        image_latents: packed latents of every reference, one after the other, ``(B, T_refs, C)``.
        img_shapes: the latent grids ``(frames, rows, columns)`` of the generated image and of each reference (shared
            by the batch).
        true_cfg_scale: the CFG scale ``s``; 1 when there is no CFG.
        height, width: generated image size in pixels.
        num_tokens: ``T``, the number of noisy image tokens.
    """

    prompt_embeds: Tensor
    prompt_mask: Tensor | None
    negative_prompt_embeds: Tensor | None
    negative_mask: Tensor | None
    image_latents: Tensor
    img_shapes: list[tuple[int, int, int]]
    true_cfg_scale: float
    height: int
    width: int
    num_tokens: int

    row_fields: ClassVar[tuple[str, ...]] = (
        "prompt_embeds",
        "prompt_mask",
        "negative_prompt_embeds",
        "negative_mask",
        "image_latents",
    )
    """The per-row tensors (the rest is shared by the batch)."""

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def num_references(self) -> int:
        return len(self.img_shapes) - 1


def pad_embeddings(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Embeddings ``(L_i, D)`` of different lengths → ``(B, max L, D)`` padded with zeros and the mask, ``None`` when
    no row is padded (as the pipeline stacks a batch of prompts)."""
    longest = max(len(r) for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(longest - len(r), r.shape[-1])]) for r in rows])
    mask = torch.stack([torch.arange(longest, device=rows[0].device) < len(r) for r in rows]).long()
    return embeds, None if bool(mask.all()) else mask


class QwenEditEncoder:
    """Encodes prompts with their references and the references' latents for a
    :class:`~divrl.policy.qwen_image.QwenEditPolicy`, caching both.

    Args:
        policy: the policy whose components encode (held, not copied).
        cache_size: how many encoded prompts (and, separately, reference latents) to keep.
    """

    def __init__(self, policy: QwenEditPolicy, cache_size: int = 256):
        self.policy = policy
        self.cache_size = cache_size
        self.prompts: OrderedDict[tuple, Tensor] = OrderedDict()
        self.references: OrderedDict[tuple, tuple[Tensor, tuple[int, int, int]]] = OrderedDict()

    def clear(self) -> None:
        self.prompts.clear()
        self.references.clear()

    # ------------------------------------------------------------------------------------------------ encoding

    @staticmethod
    def sizes(image, area: int) -> tuple[int, int]:
        """``(height, width)`` of the pipeline's resize of ``image`` to ``area`` pixels at its aspect ratio (multiples
        of 32, ``calculate_dimensions``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        width, height = calculate_dimensions(area, image.width / image.height)
        if not height or not width:
            raise ValueError(
                f"a {image.width}x{image.height} reference resized to a {area}-pixel area (policy."
                f"condition_image_size / vae_image_size) has a side that rounds to 0 (sides are multiples "
                f"of 32): crop it nearer to square, or raise the area"
            )
        return height, width

    @torch.no_grad()
    def encode_prompt(self, prompt: str, images: Sequence, key: str | None = None) -> Tensor:
        """The embedding ``(L, D)`` of ``prompt`` read with its references ``images`` (PIL), as
        ``QwenImageEditPlusPipeline.encode_prompt`` computes it for one prompt; cached under ``(prompt, key)``."""
        policy = self.policy
        cache_key = None if key is None else (prompt, key, len(images))
        if cache_key is not None and cache_key in self.prompts:
            self.prompts.move_to_end(cache_key)
            return self.prompts[cache_key]
        pipe = policy.pipeline()
        if policy.text_encoder is None or pipe.processor is None:
            raise RuntimeError(
                "this policy was loaded without its text encoder or processor (policy.text_encoders: "
                "false), so every condition must come precomputed: convert the shards with `divrl data "
                "... --precompute MODEL` (a Qwen-Image-Edit model), or set policy.text_encoders: true"
            )
        resized = [
            pipe.image_processor.resize(image, *self.sizes(image, policy.condition_image_size)) for image in images
        ]
        embeds, _ = pipe.encode_prompt(prompt=[prompt], image=resized, device=policy.device)
        embeds = embeds[0].to(policy.dtype)
        if cache_key is not None:
            remember(self.prompts, cache_key, embeds, self.cache_size)
        return embeds

    @torch.no_grad()
    def encode_reference(self, image, key: str | None = None) -> tuple[Tensor, tuple[int, int, int]]:
        """VAE latents of one reference at the ``vae_image_size`` area: packed ``(1, T_ref, C)`` and the grid
        ``(1, rows, columns)`` that ``img_shapes`` lists for it. ``key`` enables caching."""
        policy = self.policy
        area = policy.vae_image_size
        cache_key = None if key is None else (key, area)
        if cache_key is not None and cache_key in self.references:
            self.references.move_to_end(cache_key)
            return self.references[cache_key]
        if policy.vae.encoder is None:
            raise no_vae_encoder("a Qwen-Image-Edit model")
        pipe = policy.pipeline()
        height, width = self.sizes(image, area)
        pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
        latents = pipe._encode_vae_image(pixels.to(device=policy.device, dtype=policy.vae.dtype), generator=None)
        rows, cols = latents.shape[3:]
        packed = pipe._pack_latents(latents, 1, latents.shape[1], rows, cols).to(policy.dtype)
        out = (packed, (1, rows // 2, cols // 2))
        if cache_key is not None:
            remember(self.references, cache_key, out, self.cache_size)
        return out

    def condition(
        self,
        references: Sequence[Sequence[ImageLike]],
        prompts: Sequence[str],
        height: int,
        width: int,
        true_cfg_scale: float,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> QwenEditCondition:
        """Conditions for ``len(prompts)`` prompts, each with its list of ``K`` references (the same ``K``, and the same
        latent grids, for every prompt), each repeated ``group_size`` times."""
        if len(references) != len(prompts):
            raise ValueError(
                f"condition: {len(references)} reference lists for {len(prompts)} prompts; give one per prompt"
            )
        counts = sorted({len(r) for r in references})
        if len(counts) != 1 or counts[0] < 1:
            raise ValueError(
                f"condition: the prompts of one batch have {counts} references; give each the same "
                f"number (at least one), or condition them in separate batches"
            )
        self.policy.check_size(height, width)
        keys = list(reference_keys) if reference_keys is not None else [None] * len(prompts)
        images = [[self._pil(image) for image in row] for row in references]
        rows = []
        for prompt, row, key in zip(prompts, images, keys):
            encoded = [
                self.encode_reference(image, None if key is None else f"{key}#{i}") for i, image in enumerate(row)
            ]
            negative = self.encode_prompt(self.policy.negative_prompt, row, key) if true_cfg_scale > 1 else None
            rows.append(
                (
                    self.encode_prompt(prompt, row, key),
                    negative,
                    [latent for latent, _ in encoded],
                    [shape for _, shape in encoded],
                )
            )
        return self.assemble(rows, height, width, true_cfg_scale, group_size)

    def assemble(
        self, rows: Sequence[tuple], height: int, width: int, true_cfg_scale: float, group_size: int = 1
    ) -> QwenEditCondition:
        """A condition from its rows, each ``(prompt embedding (L, D), negative's (L', D) or None, the references'
        packed latents [(1, T_k, C)], their grids [(1, rows, columns)])``, computed now or precomputed."""
        policy = self.policy
        grid_rows, grid_cols = policy.token_grid(height, width)
        shapes = None
        for _, _, _, row_shapes in rows:
            row_shapes = [(1, grid_rows, grid_cols), *(tuple(shape) for shape in row_shapes)]
            if shapes is not None and row_shapes != shapes:
                raise ValueError(
                    f"condition: the references of one batch have latent grids {shapes[1:]} and "
                    f"{row_shapes[1:]}; give references of one aspect ratio per batch (data.batch_size 1 "
                    f"takes any)"
                )
            shapes = row_shapes
        device, dtype = policy.device, policy.dtype
        embeds, mask = pad_embeddings([row[0].to(device, dtype) for row in rows])
        negative = negative_mask = None
        if true_cfg_scale > 1:
            negative, negative_mask = pad_embeddings([row[1].to(device, dtype) for row in rows])
        condition = QwenEditCondition(
            prompt_embeds=embeds,
            prompt_mask=mask,
            negative_prompt_embeds=negative,
            negative_mask=negative_mask,
            image_latents=torch.cat([torch.cat(list(row[2]), dim=1) for row in rows]).to(device, dtype),
            img_shapes=shapes,
            true_cfg_scale=float(true_cfg_scale),
            height=height,
            width=width,
            num_tokens=grid_rows * grid_cols,
        )
        return condition.repeat_interleave(group_size) if group_size > 1 else condition

    def encode(
        self, samples: Sequence[ConditionSample], height: int, width: int, true_cfg_scale: float, group_size: int = 1
    ) -> QwenEditCondition:
        """The batch's conditions: from the precomputed payloads when every sample has one of this family, else
        encoded from the prompts and the reference images (another family's payload is ignored, or refused without
        the encoders)."""
        counts = {len(s.references) for s in samples}
        if len(counts) > 1:
            raise ValueError(
                f"QwenEditPolicy: the identities of one batch have {sorted(counts)} references "
                f"({', '.join(f'{s.id}: {len(s.references)}' for s in samples)}); batch identities with "
                f"the same number of references (data.batch_size 1 mixes any)"
            )
        policy = self.policy
        ours = all(isinstance(s.conditioning, dict) and s.conditioning.get("family") == FAMILY for s in samples)
        live = None not in (policy.text_encoder, policy.pipeline().processor, policy.vae.encoder)
        if ours or (not live and all(s.conditioning is not None for s in samples)):
            rows = [self.read_payload(s, true_cfg_scale > 1) for s in samples]
            return self.assemble(rows, height, width, true_cfg_scale, group_size)
        return self.condition(
            [list(s.references) for s in samples],
            [s.prompt for s in samples],
            height,
            width,
            true_cfg_scale,
            group_size,
            reference_keys=[s.id for s in samples],
        )

    # ------------------------------------------------------------------------------------------------ payloads

    def read_payload(self, sample: ConditionSample, negative: bool) -> tuple:
        """The sample's row of its identity's payload (see :meth:`assemble`), after checking that it was made by this
        family with this run's reference sizes and negative prompt."""
        payload, policy = sample.conditioning, self.policy
        if not isinstance(payload, dict) or payload.get("family") != FAMILY:
            found = payload.get("family", "FLUX.1 Kontext") if isinstance(payload, dict) else "unknown"
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was made for another model family "
                f"({found}), not Qwen-Image-Edit: set policy.text_encoders: true (the encoders then "
                f"encode every condition and ignore it), or precompute with a Qwen-Image-Edit model"
            )
        missing = [k for k in PAYLOAD_FIELDS if k not in payload]
        want = {"condition_image_size": policy.condition_image_size, "vae_image_size": policy.vae_image_size}
        if negative:  # the negative prompt's embedding is read only with CFG
            want["negative_prompt"] = policy.negative_prompt
        wrong = {k: payload[k] for k, v in want.items() if k in payload and payload[k] != v}
        if missing or wrong:
            what = f"lacks {missing}" if missing else f"has {wrong}"
            instead = (
                "drop the precomputed entries (convert the shards again without --precompute)"
                if policy.text_encoder is not None
                else "set policy.text_encoders: true"
            )
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning {what}, this run needs {want}; "
                f"precompute with those settings (`divrl data ... --precompute {policy.model_id}` uses "
                f"the family's defaults: the pipeline's reference areas), or {instead}"
            )
        prompts, rows = payload["prompts"], len(payload["prompt_embeds"])
        if not 0 <= sample.prompt_index < rows or len(prompts) != rows or prompts[sample.prompt_index] != sample.prompt:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was computed for other prompts "
                f"({rows} rows; the one drawn is {sample.prompt!r}): rewrite the shards with --precompute"
            )
        if len(payload["image_latents"]) != len(sample.references):
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning has {len(payload['image_latents'])} "
                f"reference latents for {len(sample.references)} references; rewrite the shards"
            )
        return (
            payload["prompt_embeds"][sample.prompt_index],
            payload["negative_prompt_embeds"] if negative else None,
            list(payload["image_latents"]),
            [tuple(shape) for shape in payload["image_shapes"]],
        )

    @torch.no_grad()
    def precompute(self, record, resolution: int) -> dict:
        """The payload of ``record``: every prompt's embedding read with the identity's references, the negative
        prompt's, and every reference's packed latents with its grid, on the CPU. The reference sizes are the
        policy's areas (``resolution``, the generated size, does not enter)."""
        policy = self.policy
        images = [self._pil(image) for image in record.references]
        encoded = [self.encode_reference(image) for image in images]
        payload = {
            "family": FAMILY,
            "model": policy.model_id,
            "resolution": resolution,
            "condition_image_size": policy.condition_image_size,
            "vae_image_size": policy.vae_image_size,
            "negative_prompt": policy.negative_prompt,
            "prompts": list(record.prompts),
            "prompt_embeds": [self.encode_prompt(p, images).cpu().clone() for p in record.prompts],
            "negative_prompt_embeds": self.encode_prompt(policy.negative_prompt, images).cpu().clone(),
            "image_latents": [latent.cpu().clone() for latent, _ in encoded],
            "image_shapes": [list(shape) for _, shape in encoded],
        }
        self.clear()
        return payload

    @staticmethod
    def _pil(image):
        """A reference as the pipeline takes it: a PIL image (tensors and arrays converted)."""
        if hasattr(image, "size") and hasattr(image, "convert") and not isinstance(image, Tensor):
            return image.convert("RGB")
        return to_pil(to_image_batch(image, "reference")[0])
