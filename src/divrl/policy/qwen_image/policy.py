"""``QwenEditPolicy``: Qwen-Image-Edit-Plus (2509 / 2511) as the policy being trained (a :class:`~divrl.policy.Policy`).

The family's part of the seam:

- :meth:`~QwenEditPolicy.encode`: a :class:`~divrl.policy.qwen_image.QwenEditCondition` (the VL encoder's reading of
  prompt and references, the negative prompt's with CFG, every reference's packed latents, the latent grids);
- :meth:`~QwenEditPolicy.initial_noise`: packed Gaussian latents, drawn exactly as the pipeline draws them;
- :meth:`~QwenEditPolicy.velocity`: the **guided** velocity of true CFG, ``neg + s·(cond − neg)`` rescaled per token to
  the conditional velocity's norm, as the pipeline does (two transformer calls per step; with ``s ≤ 1`` one). The SDE
  step, its log-probability, the KL term and every objective see this velocity;
- :meth:`~QwenEditPolicy.sigmas`: the pipeline's schedule (the shift ``μ`` for the image sequence length through the
  model's scheduler configuration);
- :meth:`~QwenEditPolicy.decode`: latents → images in [0, 1].
"""

from __future__ import annotations

import math
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
from divrl.policy.gating import check_window, gated_velocity
from divrl.policy.qwen_image.encoder import QwenEditCondition, QwenEditEncoder
from divrl.policy.rows import PackedGrid

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample
    from divrl.images import ImageLike

__all__ = ["QwenEditPolicy", "QWEN_EDIT_LORA_TARGETS", "qwen_edit_flops"]

QWEN_EDIT_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
"""The default LoRA targets: every attention projection of the dual-stream blocks (image ``to_*``, text ``add_*``) and
both streams' MLPs (``img_mlp`` / ``txt_mlp``); the modulation layers stay frozen."""


def _pipeline_class():
    from diffusers import QwenImageEditPlusPipeline

    return QwenImageEditPlusPipeline


def qwen_edit_flops(config, image_tokens: int, reference_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one transformer call for one sample (2 per multiply-add): per dual-stream block, each stream's
    QKV and output projections and its GELU MLP of ratio 4, and the joint attention over all tokens."""
    h = config["attention_head_dim"] * config["num_attention_heads"]
    image = image_tokens + reference_tokens
    total = image + text_tokens

    def stream(tokens: int) -> float:  # QKV, output projection, MLP h → 4h → h
        return 2 * tokens * (3 * h * h + h * h + 8 * h * h)

    return float(config["num_layers"] * (stream(image) + stream(text_tokens) + 2 * 2 * total * total * h))


class QwenEditPolicy(PackedGrid, Policy):
    """Qwen-Image-Edit-Plus with an optional LoRA adapter, as a policy for on-policy RL.

    Args:
        transformer, vae, text_encoder, tokenizer, processor, scheduler: the components of a
            ``QwenImageEditPlusPipeline``; the text encoder, tokenizer and processor may be ``None`` for inference on
            given conditions.
        lora: the adapter, or ``None``; FLUX.1's default targets are replaced by :data:`QWEN_EDIT_LORA_TARGETS`.
        true_cfg_scale: the true-CFG scale (the pipeline's default 4.0); ``1`` turns CFG off.
        negative_prompt: the negative prompt of CFG (Qwen's examples use ``" "``).
        condition_image_size: pixel area each reference is resized to for the VL encoder (the pipeline's 384²).
        vae_image_size: pixel area each reference is resized to for the VAE (the pipeline's 1024²).
        base_dtype, lora_compute_dtype, train_transformer, model_id, sdpa_backends, reference_window,
            prompt_cache_size: as for :class:`~divrl.policy.KontextPolicy`.
    """

    lora_format = property(lambda self: _pipeline_class())

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer=None,
        processor=None,
        scheduler=None,
        *,
        lora: L.LoRAConfig | None = None,
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        condition_image_size: int = 384 * 384,
        vae_image_size: int = 1024 * 1024,
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

        from divrl.policy.qwen_image.tiny import QWEN_SCHEDULER_CONFIG

        self.reference_window = check_window(reference_window)
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)
        self.scheduler_config = dict(scheduler.config)
        self.true_cfg_scale, self.negative_prompt = float(true_cfg_scale), negative_prompt
        self.condition_image_size, self.vae_image_size = int(condition_image_size), int(vae_image_size)
        self.model_id = model_id
        if lora is not None and tuple(lora.target_modules) == tuple(L.DEFAULT_LORA_TARGETS):
            lora = replace(lora, target_modules=QWEN_EDIT_LORA_TARGETS)
        modules = [m for m in (transformer, vae, text_encoder) if m is not None]
        prepare_weights(
            self,
            modules,
            lora=lora,
            base_dtype=base_dtype,
            lora_compute_dtype=lora_compute_dtype,
            train_transformer=train_transformer,
            who="QwenEditPolicy",
        )
        self._pipe = _pipeline_class()(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            processor=processor,
            transformer=transformer,
        )
        self._pipe.set_progress_bar_config(disable=True)
        self.encoder = QwenEditEncoder(self, prompt_cache_size)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "Qwen/Qwen-Image-Edit-2511",
        *,
        torch_dtype: str | torch.dtype | None = "auto",
        local_files_only: bool = False,
        revision: str | None = None,
        text_encoders: bool = True,
        **kwargs,
    ) -> QwenEditPolicy:
        """Load from a Hub id or a local folder in diffusers' format (errors say what to do); ``kwargs`` go to
        :class:`QwenEditPolicy`."""
        from divrl.policy.qwen_image.builder import load_pipeline

        pipe = load_pipeline(
            model,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
            revision=revision,
            text_encoders=text_encoders,
        )
        kwargs.setdefault("model_id", os.fspath(model))
        return cls.from_pipeline(pipe, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> QwenEditPolicy:
        """Wrap an existing ``QwenImageEditPlusPipeline`` (its modules are shared, not copied)."""
        return cls(
            transformer=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            processor=pipe.processor,
            scheduler=pipe.scheduler,
            **kwargs,
        )

    @classmethod
    def tiny(cls, seed: int = 0, lora: L.LoRAConfig | None = None, **kwargs) -> QwenEditPolicy:
        """A tiny offline policy (:mod:`divrl.policy.qwen_image.tiny`), references read at 32² for both encoders;
        LoRA rank 4, α 8 unless given."""
        from divrl.policy.qwen_image.tiny import tiny_qwen_edit_components

        kwargs.setdefault("condition_image_size", 32 * 32)
        kwargs.setdefault("vae_image_size", 32 * 32)
        kwargs.setdefault("model_id", "tiny-qwen-edit")
        if lora is None and not kwargs.get("train_transformer"):
            lora = L.LoRAConfig(rank=4, alpha=8.0)
        return cls(**tiny_qwen_edit_components(seed), lora=lora, **kwargs)

    def pipeline(self):
        """A ``QwenImageEditPlusPipeline`` over this policy's modules (the adapter, when enabled, is active in it)."""
        return self._pipe

    def clear_caches(self) -> None:
        self.encoder.clear()

    def drop_encoders(self) -> QwenEditPolicy:
        """Remove the VL text encoder, its processor and the VAE encoder (the decoder stays) for training on
        precomputed conditions."""
        self.text_encoder = self._pipe.text_encoder = self._pipe.processor = None
        self.vae.encoder = None
        return self

    def precompute(self, record, resolution: int) -> dict:
        return self.encoder.precompute(record, resolution)

    # ------------------------------------------------------------------------------------------------ sizes

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self._pipe.vae_scale_factor

    # ------------------------------------------------------------------------------------------------ conditioning

    def encode(
        self, samples: Sequence[ConditionSample], height: int, width: int, group_size: int = 1
    ) -> QwenEditCondition:
        return self.encoder.encode(samples, height, width, self.true_cfg_scale, group_size)

    def condition(
        self,
        references: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        height: int,
        width: int,
        true_cfg_scale: float | None = None,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> QwenEditCondition:
        """Conditions for ``len(prompts)`` prompts: ``references`` is one image per prompt, one image shared by all, or
        per prompt a list of its ``K`` references ("Picture 1" ... "Picture K" in the prompt template)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(references, Tensor) and references.dim() == 4:
            references = list(references)
        if not isinstance(references, (list, tuple)):
            references = [references] * len(prompts)
        per_prompt = [list(r) if isinstance(r, (list, tuple)) else [r] for r in references]
        scale = self.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        return self.encoder.condition(per_prompt, prompts, height, width, scale, group_size, reference_keys)

    # ------------------------------------------------------------------------------------------------ sampling

    def sigmas(self, num_steps: int, cond: QwenEditCondition) -> Tensor:
        """The pipeline's sigmas for ``num_steps`` steps at ``cond``'s size, ending with 0: ``linspace(1, 1/N, N)``
        shifted by ``μ = calculate_shift(T)`` through a scheduler built from the model's configuration."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            calculate_shift,
            retrieve_timesteps,
        )

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        config = scheduler.config
        mu = calculate_shift(
            cond.num_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.float().cpu()

    def time_shift(self, cond: QwenEditCondition) -> float:
        """The shift ``s = exp(μ)`` the pipeline's schedule applies at ``cond``'s token count (``σ' = s·σ / (1 + (s −
        1)·σ)``, before the scheduler's stretch to ``shift_terminal``), for training timesteps drawn like the
        sampler's."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

        config = self.scheduler_config
        if not config.get("use_dynamic_shifting") or config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(
                "objective.timesteps.distribution shifted: this model's scheduler configuration has no "
                "exponential, size-dependent shift; give objective.timesteps.shift, or use uniform or "
                "logit_normal"
            )
        return math.exp(
            calculate_shift(
                cond.num_tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        )

    def initial_noise(self, cond: QwenEditCondition, generator=None) -> Tensor:
        """Packed Gaussian latents ``(B, T, C)``, drawn exactly as ``QwenImageEditPlusPipeline.prepare_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        rows, cols = self.token_grid(cond.height, cond.width)
        channels = self.transformer.config.in_channels // 4
        shape = (cond.batch_size, 1, channels, 2 * rows, 2 * cols)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self._pipe._pack_latents(noise, cond.batch_size, channels, 2 * rows, 2 * cols)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: QwenEditCondition) -> Tensor:
        """The guided velocity for noisy packed ``latents`` ``(B, T, C)`` at noise level ``sigma`` (a float or
        ``(B,)``): true CFG rescaled to the conditional velocity's norm, or the conditional call alone without CFG."""
        batch = latents.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"velocity: condition has batch {cond.batch_size}, latents have {batch}")
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(batch)
        return gated_velocity(self._guided, latents, sigma, cond, self.reference_window)

    def _guided(self, latents: Tensor, sigma: Tensor, cond: QwenEditCondition, references: bool) -> Tensor:
        positive = self._call(latents, sigma, cond.prompt_embeds, cond.prompt_mask, cond, references)
        if cond.negative_prompt_embeds is None:
            return positive
        negative = self._call(latents, sigma, cond.negative_prompt_embeds, cond.negative_mask, cond, references)
        combined = negative + cond.true_cfg_scale * (positive - negative)
        return combined * (positive.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def _call(
        self,
        latents: Tensor,
        sigma: Tensor,
        text: Tensor,
        mask: Tensor | None,
        cond: QwenEditCondition,
        references: bool,
    ) -> Tensor:
        """One transformer call, with the reference tokens appended (``references``) or without them."""
        timestep = (sigma * 1000).to(latents.dtype) / 1000  # the pipeline's timestep, cast as it casts it
        hidden = latents.to(self.dtype)
        shapes = cond.img_shapes if references else cond.img_shapes[:1]
        if references:
            hidden = torch.cat([hidden, cond.image_latents], dim=1)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * len(hidden),
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    @torch.no_grad()
    def decode(self, latents: Tensor, cond: QwenEditCondition) -> Tensor:
        """Packed latents → images ``(B, 3, H, W)`` float32 in [0, 1], as the pipeline decodes them."""
        vae = self.vae
        grid = self._pipe._unpack_latents(latents, cond.height, cond.width, self.vae_scale_factor).to(vae.dtype)
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(grid.device, grid.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(grid.device, grid.dtype)
        images = vae.decode(grid / std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence, height: int, width: int, keys: Sequence[str | None] | None = None
    ) -> Tensor:
        """Clean latents ``(B, T, C)`` of ``images`` at ``height × width`` (targets: the generated size, not the
        references' VAE area), encoded and normalised as references are."""
        pipe = self._pipe
        if self.vae.encoder is None:
            raise RuntimeError(
                "this policy has no VAE encoder (policy.text_encoders: false drops the encoders); target "
                "images (SFT, DPO on shard pairs) need it: set policy.text_encoders: true"
            )
        rows = []
        for image in images:
            pixels = pipe.image_processor.preprocess(self.encoder._pil(image), height, width).unsqueeze(2)
            latents = pipe._encode_vae_image(pixels.to(device=self.device, dtype=self.vae.dtype), generator=None)
            rows.append(pipe._pack_latents(latents, 1, latents.shape[1], *latents.shape[3:]).to(self.dtype))
        return torch.cat(rows)

    # ------------------------------------------------------------------------------------------------ the seam

    def shard_units(self, network: nn.Module | None = None) -> list[nn.Module]:
        """The transformer's dual-stream blocks."""
        network = self.transformer if network is None else network
        return list(getattr(network, "transformer_blocks", []))

    def frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.text_encoder) if m is not None]

    def flops_per_call(self, cond: QwenEditCondition) -> float:
        """Forward FLOPs of one velocity for one sample: one transformer call, two with CFG (:func:`qwen_edit_flops`),
        each over its own text length."""
        texts = [cond.prompt_embeds] + ([] if cond.negative_prompt_embeds is None else [cond.negative_prompt_embeds])
        return sum(
            qwen_edit_flops(self.transformer.config, cond.num_tokens, cond.image_latents.shape[1], text.shape[1])
            for text in texts
        )
