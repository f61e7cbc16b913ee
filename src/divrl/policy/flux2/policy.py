"""``Flux2KleinPolicy``: FLUX.2 [klein] as the policy being trained (a :class:`~divrl.policy.Policy`).

The family's part of the seam:

- :meth:`~Flux2KleinPolicy.encode`: a :class:`~divrl.policy.flux2.KleinCondition` (prompt embeddings, the empty
  negative prompt's when classifier-free guidance is on, every reference's packed latents, 4-axis position ids);
- :meth:`~Flux2KleinPolicy.initial_noise`: patchified Gaussian latents, drawn exactly as the pipeline draws them;
- :meth:`~Flux2KleinPolicy.velocity`: the **guided** velocity ``neg + s·(cond − neg)`` (two transformer calls per step,
  or one with the two halves batched: :attr:`~Flux2KleinPolicy.cfg_batched`); with ``s ≤ 1`` (the distilled models)
  one call. The SDE step, its log-probability, the KL term and every objective see this velocity, so the on-policy
  ratio of the first update stays exactly 1;
- :meth:`~Flux2KleinPolicy.sigmas`: the pipeline's own schedule (``compute_empirical_mu`` for the image sequence
  length and the step count, through the model's scheduler configuration);
- :meth:`~Flux2KleinPolicy.decode`: latents → images in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from divrl.policy import lora as L
from divrl.policy.base import DEFAULT_SDPA_BACKENDS, Policy
from divrl.policy.compute import prepare_weights
from divrl.policy.flux2.encoder import KleinCondition, KleinEncoder
from divrl.policy.gating import check_window, gated_velocity
from divrl.policy.rows import PackedGrid

if TYPE_CHECKING:
    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import ConditionSample
    from divrl.images import ImageLike

__all__ = ["Flux2KleinPolicy", "KLEIN_LORA_TARGETS", "klein_flops"]

KLEIN_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
    "attn.to_out",
)
"""klein's default LoRA targets: every attention and MLP projection of both block kinds: the double-stream blocks'
(``attn.to_*``, ``attn.add_*``, the SwiGLU ``ff`` / ``ff_context``) and the single-stream blocks' fused
``attn.to_qkv_mlp_proj`` and output ``attn.to_out`` (in the double-stream blocks ``attn.to_out`` is a list, whose
Linear is ``attn.to_out.0``: :func:`divrl.policy.lora.add_adapter` adapts the Linear layers a suffix names)."""


def _pipeline_class():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def klein_flops(config, image_tokens: int, reference_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one klein transformer call for one sample (2 per multiply-add), like
    :func:`divrl.policy.flops.transformer_flops` for klein's blocks: SwiGLU MLPs of ratio ``r = mlp_ratio`` (in: ``h →
    2rh``, out: ``rh → h``); single blocks with the fused ``h → 3h + 2rh`` projection and the ``(1 + r)h → h`` output."""
    h = config["attention_head_dim"] * config["num_attention_heads"]
    r = config.get("mlp_ratio", 3.0)
    image = image_tokens + reference_tokens
    total = image + text_tokens
    attention = 2 * 2 * total * total * h

    def stream(tokens: int) -> float:  # QKV, output projection, SwiGLU in and out
        return 2 * tokens * (3 * h * h + h * h + 2 * r * h * h + r * h * h)

    double = stream(image) + stream(text_tokens) + attention
    single = 2 * total * ((3 + 2 * r) * h * h + (1 + r) * h * h) + attention
    return float(config["num_layers"] * double + config["num_single_layers"] * single)


class Flux2KleinPolicy(PackedGrid, Policy):
    """FLUX.2 [klein] (4B or 9B, base or distilled) with an optional LoRA adapter, as a policy for on-policy RL.

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the components of a ``Flux2KleinPipeline``; the text
            encoder and tokenizer may be ``None`` when every condition comes precomputed.
        lora: the adapter, or ``None``. Its default targets (:data:`~divrl.policy.DEFAULT_LORA_TARGETS`, FLUX.1's) are
            replaced by :data:`KLEIN_LORA_TARGETS`.
        guidance_scale: the CFG scale of the base models (the pipeline's default 4.0); ``1`` turns CFG off.
        is_distilled: a step-distilled model (the pipeline's ``is_distilled``): a ``guidance_scale`` above 1 is refused.
        cfg_batched: make the conditional and the unconditional call one batched call (``2B`` rows) instead of two.
        max_sequence_length: text tokens per prompt (the pipeline's default 512).
        text_encoder_out_layers: the text encoder's hidden layers stacked into the embedding (klein: 9, 18, 27).
        base_dtype, lora_compute_dtype, train_transformer, model_id, sdpa_backends, reference_window,
            prompt_cache_size: as for :class:`~divrl.policy.KontextPolicy`.
    """

    lora_format = property(lambda self: _pipeline_class())

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer,
        scheduler=None,
        *,
        lora: L.LoRAConfig | None = None,
        guidance_scale: float = 4.0,
        is_distilled: bool = False,
        cfg_batched: bool = False,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (9, 18, 27),
        base_dtype: str | torch.dtype | None = None,
        lora_compute_dtype: str | torch.dtype | None = None,
        train_transformer: bool = False,
        model_id: str | None = None,
        sdpa_backends: Sequence[str] | None = DEFAULT_SDPA_BACKENDS,
        reference_window: Sequence[float] | None = None,
        prompt_cache_size: int = 256,
    ):
        super().__init__(sdpa_backends=sdpa_backends)
        from diffusers import FlowMatchEulerDiscreteScheduler

        from divrl.policy.flux2.tiny import KLEIN_SCHEDULER_CONFIG

        if is_distilled and guidance_scale > 1:
            raise ValueError(
                f"policy.guidance_scale {guidance_scale}: {model_id or 'this model'} is step-distilled "
                f"(is_distilled in its model_index.json), it takes no classifier-free guidance; set "
                f"policy.guidance_scale: 1, or train a base (undistilled) klein"
            )
        self.reference_window = check_window(reference_window)
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG)
        self.scheduler_config = dict(scheduler.config)
        self.guidance_scale, self.is_distilled, self.cfg_batched = float(guidance_scale), is_distilled, cfg_batched
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.model_id = model_id
        if lora is not None and tuple(lora.target_modules) == tuple(L.DEFAULT_LORA_TARGETS):
            lora = replace(lora, target_modules=KLEIN_LORA_TARGETS)  # FLUX.1's names: klein's blocks name theirs
        modules = [m for m in (transformer, vae, text_encoder) if m is not None]
        prepare_weights(
            self,
            modules,
            lora=lora,
            base_dtype=base_dtype,
            lora_compute_dtype=lora_compute_dtype,
            train_transformer=train_transformer,
            who="Flux2KleinPolicy",
        )
        self._pipe = _pipeline_class()(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
        self._pipe.set_progress_bar_config(disable=True)
        self.encoder = KleinEncoder(self, prompt_cache_size)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "black-forest-labs/FLUX.2-klein-base-4B",
        *,
        torch_dtype: str | torch.dtype | None = "auto",
        local_files_only: bool = False,
        revision: str | None = None,
        text_encoders: bool = True,
        **kwargs,
    ) -> Flux2KleinPolicy:
        """Load klein from a Hub id or a local folder in diffusers' format (errors say what to do); ``kwargs`` go to
        :class:`Flux2KleinPolicy`."""
        from divrl.policy.flux2.builder import load_pipeline

        pipe = load_pipeline(
            model,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
            revision=revision,
            text_encoders=text_encoders,
        )
        kwargs.setdefault("model_id", os.fspath(model))
        kwargs.setdefault("is_distilled", bool(pipe.config.get("is_distilled", False)))
        return cls.from_pipeline(pipe, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> Flux2KleinPolicy:
        """Wrap an existing ``Flux2KleinPipeline`` (its modules are shared, not copied)."""
        kwargs.setdefault("is_distilled", bool(pipe.config.get("is_distilled", False)))
        return cls(
            transformer=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler,
            **kwargs,
        )

    @classmethod
    def tiny(cls, seed: int = 0, lora: L.LoRAConfig | None = None, **kwargs) -> Flux2KleinPolicy:
        """A tiny offline klein policy (:mod:`divrl.policy.flux2.tiny`); LoRA rank 4, α 8 unless given."""
        from divrl.policy.flux2.tiny import TINY_TEXT_LAYERS, tiny_klein_components

        kwargs.setdefault("max_sequence_length", 32)
        kwargs.setdefault("text_encoder_out_layers", TINY_TEXT_LAYERS)
        kwargs.setdefault("model_id", "tiny-klein")
        if lora is None and not kwargs.get("train_transformer"):
            lora = L.LoRAConfig(rank=4, alpha=8.0)
        return cls(**tiny_klein_components(seed), lora=lora, **kwargs)

    def pipeline(self):
        """A ``Flux2KleinPipeline`` over this policy's modules (the adapter, when enabled, is active in it)."""
        return self._pipe

    def clear_caches(self) -> None:
        self.encoder.clear()

    def drop_encoders(self) -> Flux2KleinPolicy:
        """Remove the text encoder and the VAE encoder (the decoder stays) for training on precomputed conditions."""
        self.text_encoder = self._pipe.text_encoder = None
        self.vae.encoder = None
        return self

    # ------------------------------------------------------------------------------------------------ sizes

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self._pipe.vae_scale_factor

    # ------------------------------------------------------------------------------------------------ conditioning

    def encode(
        self, samples: Sequence[ConditionSample], height: int, width: int, group_size: int = 1
    ) -> KleinCondition:
        return self.encoder.encode(samples, height, width, self.guidance_scale, group_size)

    def condition(
        self,
        references: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        height: int,
        width: int,
        guidance_scale: float | None = None,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> KleinCondition:
        """Conditions for ``len(prompts)`` prompts: ``references`` is one image per prompt, one image shared by all, or
        per prompt a list of its ``K`` references (reference *i* on time coordinate ``10·(i + 1)``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(references, Tensor) and references.dim() == 4:  # a batch: one reference per prompt
            references = list(references)
        if not isinstance(references, (list, tuple)):
            references = [references] * len(prompts)
        per_prompt = [list(r) if isinstance(r, (list, tuple)) else [r] for r in references]
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return self.encoder.condition(per_prompt, prompts, height, width, scale, group_size, reference_keys)

    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        return self.encoder.precompute(record, resolution)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence, height: int, width: int, keys: Sequence[str | None] | None = None
    ) -> Tensor:
        """Clean latents ``(B, T, C)`` of ``images``, encoded as references are (cached under ``keys``)."""
        keys = list(keys) if keys is not None else [None] * len(images)
        return torch.cat(
            [
                self.encoder.encode_reference(image, height, width, None if key is None else f"image/{key}")
                for image, key in zip(images, keys, strict=True)
            ]
        )

    # ------------------------------------------------------------------------------------------------ sampling

    def sigmas(self, num_steps: int, cond: KleinCondition) -> Tensor:
        """The pipeline's sigmas for ``num_steps`` steps at ``cond``'s size, ending with 0: ``linspace(1, 1/N, N)``
        shifted by ``μ = compute_empirical_mu(T, N)`` through a scheduler built from the model's configuration."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2_klein import (
            compute_empirical_mu,
            retrieve_timesteps,
        )

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        retrieve_timesteps(
            scheduler,
            num_steps,
            "cpu",
            sigmas=sigmas,
            mu=compute_empirical_mu(image_seq_len=cond.num_tokens, num_steps=num_steps),
        )
        return scheduler.sigmas.float().cpu()

    def time_shift(self, cond: KleinCondition) -> float:
        """Not defined: klein's shift ``μ`` depends on the sampler's step count as well as the image size."""
        raise ValueError(
            "objective.timesteps.distribution shifted: FLUX.2 klein's time shift depends on the step count "
            "(compute_empirical_mu), so it has no single value; give objective.timesteps.shift (e.g. 3.0), "
            "or use distribution uniform or logit_normal"
        )

    def initial_noise(self, cond: KleinCondition, generator=None) -> Tensor:
        """Packed Gaussian latents ``(B, T, C)``, drawn exactly as ``Flux2KleinPipeline.prepare_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        rows, cols = self.token_grid(cond.height, cond.width)
        shape = (cond.batch_size, self.transformer.config.in_channels, rows, cols)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self._pipe._pack_latents(noise)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: KleinCondition) -> Tensor:
        """The guided velocity for noisy packed ``latents`` ``(B, T, C)`` at noise level ``sigma`` (a float or ``(B,)``):
        ``neg + s·(cond − neg)`` with CFG, the conditional call alone without. Gradients flow to the trainable weights."""
        batch = latents.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"velocity: condition has batch {cond.batch_size}, latents have {batch}")
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(batch)
        return gated_velocity(self._guided, latents, sigma, cond, self.reference_window)

    def _guided(self, latents: Tensor, sigma: Tensor, cond: KleinCondition, references: bool) -> Tensor:
        if cond.negative_prompt_embeds is None:
            return self._call(latents, sigma, cond.prompt_embeds, cond, references)
        if self.cfg_batched:
            both = self._call(
                torch.cat([latents, latents]),
                torch.cat([sigma, sigma]),
                torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds]),
                cond,
                references,
            )
            positive, negative = both.chunk(2)
        else:
            positive = self._call(latents, sigma, cond.prompt_embeds, cond, references)
            negative = self._call(latents, sigma, cond.negative_prompt_embeds, cond, references)
        return negative + cond.guidance_scale * (positive - negative)

    def _call(self, latents: Tensor, sigma: Tensor, text: Tensor, cond: KleinCondition, references: bool) -> Tensor:
        """One transformer call, with the reference tokens appended (``references``) or without them."""
        timestep = (sigma * 1000).to(latents.dtype) / 1000  # the pipeline's timestep, cast as it casts it
        hidden = latents.to(self.dtype)
        if references:
            image_latents = (
                cond.image_latents
                if len(text) == len(cond.image_latents)
                else cond.image_latents.repeat(len(text) // len(cond.image_latents), 1, 1)
            )
            hidden = torch.cat([hidden, image_latents], dim=1)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=cond.text_ids,
            img_ids=cond.img_ids if references else cond.img_ids[: cond.num_tokens],
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    @torch.no_grad()
    def decode(self, latents: Tensor, cond: KleinCondition) -> Tensor:
        """Packed latents → images ``(B, 3, H, W)`` float32 in [0, 1], as the pipeline decodes them."""
        pipe, vae = self._pipe, self.vae
        rows, cols = self.token_grid(cond.height, cond.width)
        ids = cond.img_ids[: cond.num_tokens].unsqueeze(0).expand(latents.shape[0], -1, -1)
        grid = pipe._unpack_latents_with_ids(latents, ids, rows, cols)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid.device, grid.dtype)
        unpatched = pipe._unpatchify_latents(grid * std + mean)
        images = vae.decode(unpatched.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------ the seam

    def shard_units(self, network: nn.Module | None = None) -> list[nn.Module]:
        """The klein blocks of ``network`` (default: the transformer), double-stream blocks first."""
        network = self.transformer if network is None else network
        return [*getattr(network, "transformer_blocks", []), *getattr(network, "single_transformer_blocks", [])]

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.text_encoder) if m is not None]

    def flops_per_call(self, cond: KleinCondition) -> float:
        """Forward FLOPs of one velocity for one sample: one transformer call, two with CFG (:func:`klein_flops`)."""
        calls = 1 if cond.negative_prompt_embeds is None else 2
        return calls * klein_flops(
            self.transformer.config, cond.num_tokens, cond.image_latents.shape[1], cond.prompt_embeds.shape[1]
        )
