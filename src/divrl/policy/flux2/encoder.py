"""FLUX.2 [klein] conditioning: prompts and reference images → :class:`KleinCondition`, and the precomputed payload.

:class:`KleinEncoder` encodes through diffusers' own ``Flux2KleinPipeline`` methods on the policy's components (the chat
template, the stacked hidden layers of the Qwen3 encoder, the VAE's mode patchified and normalised by its batch-norm
statistics, the 4-axis position ids), so tokenisation and scaling match the pipeline by construction. Each prompt and
each reference is encoded once and cached (least recently used evicted); a condition's ``K`` references are encoded
separately and sit one after the other, reference *i* on time coordinate ``10·(i + 1)`` as the pipeline places them.

The payload :meth:`KleinEncoder.precompute` makes (a shard's ``cond.pth`` entry, written by ``divrl data --precompute
KLEIN_MODEL``) is a dict with ``family: "flux2-klein"``, ``model``, ``resolution``, ``max_sequence_length``,
``text_encoder_out_layers``, ``prompts``, ``prompt_embeds`` ``(P, L, D)``, the empty negative prompt's
``negative_prompt_embeds`` ``(1, L, D)`` and ``image_latents`` ``(K, T, C)``. Encoding live, the negative prompt is
encoded once per run.
"""

from __future__ import annotations

import logging
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
    from divrl.policy.flux2.policy import Flux2KleinPolicy

__all__ = ["KleinCondition", "KleinEncoder", "PAYLOAD_FIELDS", "FAMILY"]

log = logging.getLogger(__name__)

FAMILY = "flux2-klein"
"""The ``family`` entry of this family's precomputed payloads (a Kontext payload has none)."""

PAYLOAD_FIELDS = (
    "family",
    "model",
    "resolution",
    "max_sequence_length",
    "text_encoder_out_layers",
    "prompt_embeds",
    "negative_prompt_embeds",
    "image_latents",
)
"""The entries of a precomputed klein payload."""


@dataclass
class KleinCondition(BatchRows):
    """Everything the klein transformer needs besides the noisy latents, for a batch of samples (a ``Conditioning``).

    Attributes:
        prompt_embeds: stacked Qwen3 hidden states per token ``(B, L, D)``.
        negative_prompt_embeds: the empty prompt's ``(B, L, D)`` for classifier-free guidance, or ``None`` (no CFG).
        text_ids: text position ids ``(L, 4)`` (shared by the batch).
        image_latents: patchified, packed latents of every reference, one after the other, ``(B, K·T_ref, C)``.
        img_ids: position ids of the noisy tokens followed by each reference's ``(T + K·T_ref, 4)`` (shared).
        guidance_scale: the CFG scale ``s`` (velocity ``neg + s·(cond − neg)``); 1 when there is no CFG.
        height, width: generated image size in pixels.
        num_tokens: ``T``, the number of noisy image tokens (the transformer output is cut back to them).
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None
    text_ids: Tensor
    image_latents: Tensor
    img_ids: Tensor
    guidance_scale: float
    height: int
    width: int
    num_tokens: int

    row_fields: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_prompt_embeds", "image_latents")
    """The per-row tensors (the rest is shared by the batch)."""

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def num_references(self) -> int:
        return (self.img_ids.shape[0] - self.num_tokens) // self.num_tokens if self.num_tokens else 0


class KleinEncoder:
    """Encodes prompts and references for a :class:`~divrl.policy.flux2.Flux2KleinPolicy`, caching both, and reads and
    writes the precomputed payload.

    Args:
        policy: the policy whose components encode (held, not copied).
        cache_size: how many encoded prompts (and, separately, references) to keep.
    """

    def __init__(self, policy: Flux2KleinPolicy, cache_size: int = 256):
        self.policy = policy
        self.cache_size = cache_size
        self.prompts: OrderedDict[str, Tensor] = OrderedDict()
        self.references: OrderedDict[tuple, Tensor] = OrderedDict()
        self._negative: Tensor | None = None  # the empty prompt, kept for the whole run
        self._warned_model = False

    def clear(self) -> None:
        self.prompts.clear()
        self.references.clear()

    # ------------------------------------------------------------------------------------------------ encoding

    def _text_encoder_needed(self) -> None:
        if self.policy.text_encoder is None:
            raise RuntimeError(
                "this policy was loaded without its text encoder (policy.text_encoders: false), so every "
                "condition must come precomputed: convert the shards with `divrl data ... --precompute "
                "MODEL` (a klein model), or set policy.text_encoders: true"
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompt embeddings ``(B, L, D)`` as ``Flux2KleinPipeline.encode_prompt`` makes them; each prompt encoded once."""
        policy = self.policy
        unique = list(dict.fromkeys(prompts))
        found = {p: self.prompts[p] for p in unique if p in self.prompts}
        missing = [p for p in unique if p not in found]
        if missing:
            self._text_encoder_needed()
            embeds, _ = policy.pipeline().encode_prompt(
                prompt=missing,
                device=policy.device,
                max_sequence_length=policy.max_sequence_length,
                text_encoder_out_layers=policy.text_encoder_out_layers,
            )
            for k, prompt in enumerate(missing):
                found[prompt] = embeds[k : k + 1]
        for prompt in prompts:
            remember(self.prompts, prompt, found[prompt], self.cache_size)
        return torch.cat([found[p] for p in prompts]).to(policy.dtype)

    def negative_prompt(self) -> Tensor:
        """The empty prompt's embedding ``(1, L, D)``: the pipeline's negative prompt for classifier-free guidance."""
        if self._negative is None:
            self._negative = self.encode_prompts([""])
            self.prompts.pop("", None)
        return self._negative

    @torch.no_grad()
    def encode_reference(self, image: ImageLike, height: int, width: int, key: str | None = None) -> Tensor:
        """VAE-encode one reference image at ``height × width`` → patchified, packed latents ``(1, T_ref, C)``.

        The image is resized to ``height × width`` (aspect not kept, as for training shards) and normalised by the
        pipeline's image processor; the latent is the VAE's mode, patchified 2×2 and normalised by the VAE's batch-norm
        statistics (``Flux2KleinPipeline._encode_vae_image``). ``key`` (e.g. the identity id) enables caching.
        """
        policy = self.policy
        cache_key = None if key is None else (key, height, width)
        if cache_key is not None and cache_key in self.references:
            self.references.move_to_end(cache_key)
            return self.references[cache_key]
        policy.check_size(height, width)
        if policy.vae.encoder is None:
            raise no_vae_encoder("a klein model")
        pixels = to_image_batch(image, "reference")
        if pixels.shape[0] != 1:
            raise ValueError(f"encode_reference: expected one image, got {pixels.shape[0]}")
        pipe = policy.pipeline()
        processor = pipe.image_processor
        pixels = processor.preprocess(processor.resize(pixels, height, width), height, width)
        latents = pipe._encode_vae_image(pixels.to(device=policy.device, dtype=policy.vae.dtype), generator=None)
        packed = pipe._pack_latents(latents).to(policy.dtype)
        if cache_key is not None:
            remember(self.references, cache_key, packed, self.cache_size)
        return packed

    def condition(
        self,
        references: Sequence[Sequence[ImageLike]],
        prompts: Sequence[str],
        height: int,
        width: int,
        guidance_scale: float,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> KleinCondition:
        """Conditions for ``len(prompts)`` prompts, each with its list of ``K`` references (the same ``K`` for every
        prompt), each repeated ``group_size`` times."""
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
        keys = list(reference_keys) if reference_keys is not None else [None] * len(prompts)
        latents = [
            [
                self.encode_reference(image, height, width, None if key is None else f"{key}#{i}")
                for i, image in enumerate(images)
            ]
            for images, key in zip(references, keys)
        ]
        return self.from_latents(self.encode_prompts(prompts), latents, height, width, guidance_scale, group_size)

    def from_latents(
        self,
        prompt_embeds: Tensor,
        latents: Sequence[Sequence[Tensor]],
        height: int,
        width: int,
        guidance_scale: float,
        group_size: int = 1,
        negative: Tensor | None = None,
    ) -> KleinCondition:
        """A condition from prompt embeddings ``(B, L, D)`` and, per row, its references' packed latents ``(1, T_ref,
        C)`` each (computed now or precomputed); ``negative`` is the empty prompt's embedding when CFG is on
        (encoded here when not given)."""
        policy = self.policy
        if guidance_scale > 1 and policy.is_distilled:
            raise ValueError(
                f"guidance_scale {guidance_scale}: {policy.model_id or 'this model'} is step-distilled and "
                f"takes no classifier-free guidance; use 1"
            )
        device, dtype = policy.device, policy.dtype
        pipe = policy.pipeline()
        grid_h, grid_w = policy.token_grid(height, width)
        expected = grid_h * grid_w
        for row in latents:
            for latent in row:
                if latent.shape[-2] != expected:
                    raise ValueError(
                        f"reference latents have {latent.shape[-2]} tokens, a {height}x{width} image has "
                        f"{expected}; precompute at the training resolution"
                    )
        ids = pipe._prepare_latent_ids(torch.zeros(1, 1, grid_h, grid_w))[0]
        grids = [torch.zeros(1, 1, grid_h, grid_w)] * len(latents[0])
        reference_ids = pipe._prepare_image_ids(grids)[0]
        embeds = prompt_embeds.to(device=device, dtype=dtype)
        cfg = guidance_scale > 1
        if cfg and negative is None:
            negative = self.negative_prompt()
        condition = KleinCondition(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative.to(device=device, dtype=dtype).expand(len(embeds), -1, -1) if cfg else None,
            text_ids=pipe._prepare_text_ids(embeds[:1])[0].to(device),
            image_latents=torch.cat([torch.cat(list(row), dim=1) for row in latents]).to(device=device, dtype=dtype),
            img_ids=torch.cat([ids, reference_ids]).to(device),
            guidance_scale=float(guidance_scale),
            height=height,
            width=width,
            num_tokens=expected,
        )
        return condition.repeat_interleave(group_size) if group_size > 1 else condition

    # ------------------------------------------------------------------------------------------------ samples

    def encode(
        self, samples: Sequence[ConditionSample], height: int, width: int, guidance_scale: float, group_size: int = 1
    ) -> KleinCondition:
        """The batch's conditions: from the precomputed payloads when every sample has one, else encoded."""
        counts = {len(s.references) for s in samples}
        if len(counts) > 1:
            raise ValueError(
                f"Flux2KleinPolicy: the identities of one batch have {sorted(counts)} references "
                f"({', '.join(f'{s.id}: {len(s.references)}' for s in samples)}); batch identities with "
                f"the same number of references (data.batch_size 1 mixes any)"
            )
        ours = all(isinstance(s.conditioning, dict) and s.conditioning.get("family") == FAMILY for s in samples)
        live = self.policy.text_encoder is not None and self.policy.vae.encoder is not None
        if ours or (not live and all(s.conditioning is not None for s in samples)):  # another family's: refused
            rows = [self.read_payload(s, height) for s in samples]
            negative = rows[0][2] if guidance_scale > 1 else None
            return self.from_latents(
                torch.cat([r[0] for r in rows]),
                [list(r[1].split(1)) for r in rows],
                height,
                width,
                guidance_scale,
                group_size,
                negative,
            )
        return self.condition(
            [list(s.references) for s in samples],
            [s.prompt for s in samples],
            height,
            width,
            guidance_scale,
            group_size,
            reference_keys=[s.id for s in samples],
        )

    def read_payload(self, sample: ConditionSample, resolution: int) -> tuple[Tensor, Tensor, Tensor]:
        """The sample's prompt embedding ``(1, L, D)``, its references' latents ``(K, T, C)`` and the empty prompt's
        ``(1, L, D)``, after checking that the payload was made by this family for this run."""
        payload, policy = sample.conditioning, self.policy
        if not isinstance(payload, dict) or payload.get("family") != FAMILY:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was made for another model family "
                f"({payload.get('family', 'FLUX.1 Kontext') if isinstance(payload, dict) else 'unknown'}), "
                f"not FLUX.2 klein: set policy.text_encoders: true (klein then encodes every condition "
                f"itself and ignores it)"
            )
        missing = [k for k in PAYLOAD_FIELDS if k not in payload]
        want = {
            "resolution": resolution,
            "max_sequence_length": policy.max_sequence_length,
            "text_encoder_out_layers": list(policy.text_encoder_out_layers),
        }
        wrong = {k: payload[k] for k, v in want.items() if k in payload and payload[k] != v}
        if missing or wrong:
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning lacks {missing} / has {wrong}, this "
                f"run needs {want}; convert the shards again with `divrl data ... --precompute "
                f"{policy.model_id} --precompute-resolution {resolution} --max-sequence-length "
                f"{policy.max_sequence_length}`"
            )
        prompts = payload.get("prompts")
        rows = len(payload["prompt_embeds"])
        if not 0 <= sample.prompt_index < rows or (
            prompts is not None and (len(prompts) != rows or prompts[sample.prompt_index] != sample.prompt)
        ):
            raise ValueError(
                f"identity {sample.id!r}: its precomputed conditioning was computed for other prompts "
                f"({rows} rows; the one drawn is {sample.prompt!r}): rewrite the shards with --precompute"
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
        return payload["prompt_embeds"][index], payload["image_latents"], payload["negative_prompt_embeds"]

    @torch.no_grad()
    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        """The payload of ``record``: every prompt's embedding, the empty prompt's and every reference's packed latents
        at ``resolution``², in the policy's dtype, on the CPU (see the module docstring)."""
        embeds = self.encode_prompts(record.prompts)
        latents = torch.cat([self.encode_reference(r, resolution, resolution) for r in record.references])
        negative = self.negative_prompt()
        self.clear()  # every identity has its own prompts: keep host memory flat
        return {
            "family": FAMILY,
            "model": self.policy.model_id,
            "resolution": resolution,
            "prompts": list(record.prompts),
            "max_sequence_length": self.policy.max_sequence_length,
            "text_encoder_out_layers": list(self.policy.text_encoder_out_layers),
            "prompt_embeds": embeds.cpu().clone(),
            "negative_prompt_embeds": negative.cpu().clone(),
            "image_latents": latents.cpu().clone(),
        }
