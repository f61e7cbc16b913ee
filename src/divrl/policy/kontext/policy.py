"""``KontextPolicy``: FLUX.1 Kontext as the policy being trained (a :class:`~divrl.policy.Policy`).

The policy owns the pipeline's components (transformer, VAE, CLIP and T5 encoders and tokenizers) and implements the
family's part of the seam:

- :meth:`~KontextPolicy.encode` (and :meth:`~KontextPolicy.condition` for plain images and prompts): a
  :class:`~divrl.policy.kontext.Condition` (text embeddings, packed reference latents, position ids, guidance), each
  prompt and reference encoded once and repeated over the group (:class:`~divrl.policy.kontext.KontextEncoder`);
- :meth:`~KontextPolicy.initial_noise`: packed Gaussian latents, drawn exactly as diffusers draws them;
- :meth:`~KontextPolicy.velocity`: one transformer call, reference tokens appended and cut off again;
- :meth:`~KontextPolicy.sigmas`: FLUX's shifted schedule, read from the model's own scheduler configuration;
- :meth:`~KontextPolicy.decode`: packed latents → images in [0, 1].

The adapter (``FluxKontextPipeline.load_lora_weights`` reads its export), the KL reference and the attention kernels
come from :class:`~divrl.policy.Policy`. Build one with :meth:`~KontextPolicy.from_pretrained`,
:meth:`~KontextPolicy.from_pipeline` or :meth:`~KontextPolicy.tiny`, or from a run's :class:`~divrl.policy.KontextConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from divrl.images import ImageLike
from divrl.policy import lora as L
from divrl.policy.base import DEFAULT_SDPA_BACKENDS, Policy
from divrl.policy.compute import prepare_weights
from divrl.policy.flops import transformer_flops
from divrl.policy.gating import check_window, gated_velocity
from divrl.policy.kontext.encoder import POSITIONS, Condition, KontextEncoder
from divrl.policy.kontext.schedule import scheduler_shift, scheduler_sigmas
from divrl.policy.rows import PackedGrid

if TYPE_CHECKING:
    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import ConditionSample

__all__ = ["KontextPolicy"]


def _pipeline_class():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline


class KontextPolicy(PackedGrid, Policy):
    """FLUX.1 Kontext with an optional LoRA adapter, as a policy for on-policy RL.

    Build it with :meth:`from_pretrained` (Hub id or local folder), :meth:`from_pipeline` (an existing
    ``FluxKontextPipeline``) or :meth:`tiny` (small offline components for demos and tests).

    Args:
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler: the components of a
            ``FluxKontextPipeline``; the text encoders and tokenizers may be ``None`` when every condition comes
            precomputed. The scheduler's configuration defines :meth:`sigmas` (FLUX's when ``None``).
        lora: the adapter to add to the transformer, or ``None`` to train no adapter (full fine-tuning or pure
            inference).
        max_sequence_length: T5 tokens per prompt (DivRL: 128; diffusers' default 512).
        base_dtype: dtype of the frozen base weights (``"bfloat16"`` on GPUs; ``None`` keeps them as loaded).
            Trainable adapter weights are always float32.
        reference_positions: where several references of a condition sit in FLUX's position space: ``frame``
            (reference *i* is frame *i*) or ``stitch`` (side by side in frame 1); one reference is FLUX.1 Kontext's
            own either way (:func:`divrl.policy.kontext.encoder.reference_ids`).
        lora_compute_dtype: the dtype the trained weights compute in (``None``: the base's): the adapter's matmuls
            (its weights stay float32: :func:`divrl.policy.compute.cast_lora_compute`), or with full fine-tuning the
            network's, under autocast (float32 weights).
        prompt_cache_size: how many encoded prompts (and references) to keep (least recently used evicted).
        train_transformer: full fine-tuning: every transformer weight trains, in float32 (``lora`` must be ``None``).
        guidance: FLUX's distilled guidance scale of :meth:`encode` (DivRL: 2.5; not classifier-free guidance).
        model_id: the name the model was loaded by (written into precomputed payloads, compared when reading them).
        sdpa_backends: the attention kernels of :meth:`~divrl.policy.Policy.attention`.
        reference_window: identity gating (IdGlow's temporal gating): ``(low, high)``; the reference tokens join the
            transformer call only at noise levels ``low ≤ σ ≤ high``, elsewhere the network sees the prompt alone.
            ``None`` (the default): every call sees the references. Sampling and training both go through
            :meth:`velocity`, so both honour it.
    """

    lora_format = property(lambda self: _pipeline_class())  # the file FluxKontextPipeline.load_lora_weights reads

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer,
        text_encoder_2: nn.Module | None,
        tokenizer_2,
        scheduler=None,
        *,
        lora: L.LoRAConfig | None = None,
        max_sequence_length: int = 128,
        base_dtype: str | torch.dtype | None = None,
        prompt_cache_size: int = 256,
        train_transformer: bool = False,
        guidance: float = 2.5,
        model_id: str | None = None,
        sdpa_backends: Sequence[str] | None = DEFAULT_SDPA_BACKENDS,
        lora_compute_dtype: str | torch.dtype | None = None,
        reference_positions: str = "frame",
        reference_window: Sequence[float] | None = None,
    ):
        super().__init__(sdpa_backends=sdpa_backends)
        self.reference_window = check_window(reference_window)
        from diffusers import FlowMatchEulerDiscreteScheduler

        from divrl.policy.tiny import FLUX_SCHEDULER_CONFIG

        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler.config) if scheduler is not None else dict(FLUX_SCHEDULER_CONFIG)
        self.max_sequence_length = max_sequence_length
        self.guidance = guidance
        self.model_id = model_id
        modules = [m for m in (transformer, vae, text_encoder, text_encoder_2) if m is not None]
        prepare_weights(
            self,
            modules,
            lora=lora,
            base_dtype=base_dtype,
            lora_compute_dtype=lora_compute_dtype,
            train_transformer=train_transformer,
            who="KontextPolicy",
        )
        # A pipeline view on the same modules: diffusers' own prompt encoding and image preprocessing.
        self._pipe = _pipeline_class()(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        self._pipe.set_progress_bar_config(disable=True)
        if reference_positions not in POSITIONS:
            raise ValueError(
                f"KontextPolicy: reference_positions {reference_positions!r} is not one of {list(POSITIONS)}"
            )
        self.reference_positions = reference_positions
        self.encoder = KontextEncoder(self, prompt_cache_size)

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "black-forest-labs/FLUX.1-Kontext-dev",
        *,
        torch_dtype: str | torch.dtype | None = "auto",
        local_files_only: bool = False,
        revision: str | None = None,
        text_encoders: bool = True,
        **kwargs,
    ) -> KontextPolicy:
        """Load FLUX.1 Kontext from a Hub id or a local folder in diffusers' format
        (:func:`divrl.policy.kontext.builder.load_pipeline` says what each argument does; it raises
        :class:`~divrl.policy.ModelLoadError` with what to do when the model is missing, gated or offline).
        ``kwargs`` go to :class:`KontextPolicy` (``lora``, ``max_sequence_length``...)."""
        from divrl.policy.kontext.builder import load_pipeline

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
    def from_pipeline(cls, pipe, **kwargs) -> KontextPolicy:
        """Wrap an existing ``FluxKontextPipeline`` (its modules are shared, not copied)."""
        return cls(
            transformer=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            scheduler=pipe.scheduler,
            **kwargs,
        )

    @classmethod
    def tiny(cls, seed: int = 0, lora: L.LoRAConfig | None = None, **kwargs) -> KontextPolicy:
        """A tiny offline Kontext policy (see :mod:`divrl.policy.tiny`); LoRA rank 4, α 8 unless given (none with
        ``train_transformer=True``)."""
        from divrl.policy.tiny import tiny_kontext_components

        kwargs.setdefault("max_sequence_length", 32)
        kwargs.setdefault("model_id", "tiny")
        if lora is None and not kwargs.get("train_transformer"):
            lora = L.LoRAConfig(rank=4, alpha=8.0)
        return cls(**tiny_kontext_components(seed), lora=lora, **kwargs)

    def clear_caches(self) -> None:
        """Forget every cached prompt encoding and reference latent (to time encoding, or to bound host memory when
        every identity brings new prompts)."""
        self.encoder.clear()

    def drop_encoders(self) -> KontextPolicy:
        """Remove the text encoders and the VAE encoder (the decoder stays, for images to reward): for training on
        precomputed conditions only; :meth:`condition` then raises."""
        self.text_encoder = self.text_encoder_2 = None
        self._pipe.text_encoder = self._pipe.text_encoder_2 = None
        self.vae.encoder = None
        return self

    def pipeline(self):
        """A ``FluxKontextPipeline`` over this policy's modules (the adapter, when enabled, is active in it)."""
        return self._pipe

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in: that of the frozen base (read off the input projection, which carries no
        adapter; ``ModelMixin.dtype`` walks every module and is too slow for the per-step path)."""
        return self.transformer.x_embedder.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self._pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def num_image_tokens(self, height: int, width: int) -> int:
        """Packed latent tokens of a ``height × width`` image (1024 at 512², 4096 at 1024²)."""
        self.check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return (height // multiple) * (width // multiple)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (unpacked) latent height and width of a ``height × width`` image."""
        self.check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return 2 * (height // multiple), 2 * (width // multiple)

    # ------------------------------------------------------------------------------------------------ conditioning

    def encode(self, samples: Sequence[ConditionSample], height: int, width: int, group_size: int = 1) -> Condition:
        """The conditions of ``samples`` (from their precomputed payloads when every one has one, else encoded), each
        repeated ``group_size`` times, with :attr:`guidance`."""
        return self.encoder.encode(samples, height, width, self.guidance, group_size)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """T5 embeddings ``(B, L, D)``, CLIP pooled ``(B, D')`` and text ids ``(L, 3)``; each prompt encoded once."""
        return self.encoder.encode_prompts(prompts)

    def encode_reference(self, image: ImageLike, height: int, width: int, key: str | None = None) -> Tensor:
        """One reference image → packed latents ``(1, T_ref, 4·C)`` (see :meth:`KontextEncoder.encode_reference`)."""
        return self.encoder.encode_reference(image, height, width, key)

    def condition(
        self,
        references: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        height: int,
        width: int,
        guidance: float | None = None,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> Condition:
        """Conditions for ``len(prompts)`` (reference, prompt) pairs, each repeated ``group_size`` times.

        Args:
            references: one reference image per prompt (or one image shared by all prompts), or per prompt a list of
                its ``K`` references (the same ``K`` for every prompt; placed by :attr:`reference_positions`).
            prompts: the edit prompts.
            height, width: generated (and reference) size in pixels.
            guidance: FLUX's distilled guidance scale (default :attr:`guidance`, DivRL: 2.5).
            group_size: samples per condition (``G``).
            reference_keys: optional cache keys (identity ids) of the references.
        """
        guidance = self.guidance if guidance is None else guidance
        return self.encoder.condition(references, prompts, height, width, guidance, group_size, reference_keys)

    def condition_from_precomputed(
        self,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        image_latents: Tensor,
        height: int,
        width: int,
        guidance: float | None = None,
        group_size: int = 1,
    ) -> Condition:
        """Conditions from embeddings and reference latents computed earlier, without the text encoders or the VAE
        encoder; the same result as :meth:`condition` on the same inputs.

        Args:
            prompt_embeds: T5 embeddings ``(B, L, D)``; ``pooled_prompt_embeds``: CLIP pooled ``(B, D')``;
                ``image_latents``: packed reference latents ``(B, T_ref, 4·C)`` at ``height × width``.
        """
        guidance = self.guidance if guidance is None else guidance
        return self.encoder.condition_from_precomputed(
            prompt_embeds, pooled_prompt_embeds, image_latents, height, width, guidance, group_size
        )

    def precompute(self, record: IdentityRecord, resolution: int) -> dict:
        """The identity's precomputed payload (see :mod:`divrl.policy.kontext.encoder`)."""
        return self.encoder.precompute(record, resolution)

    # ------------------------------------------------------------------------------------------------ sampling

    def sigmas(self, num_steps: int, cond: Condition) -> Tensor:
        """FLUX's shifted schedule for ``num_steps`` steps at ``cond``'s image size, from the scheduler configuration
        of the loaded model (``FluxKontextPipeline``'s sigmas bit for bit), ending with 0."""
        return scheduler_sigmas(self.scheduler_config, num_steps, cond.num_tokens)

    def initial_noise(
        self, cond: Condition, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Packed Gaussian latents ``(B, T, 4·C)``, drawn exactly as ``FluxKontextPipeline.prepare_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        batch, (latent_h, latent_w) = cond.batch_size, self.latent_grid(cond.height, cond.width)
        shape = (batch, self.latent_channels, latent_h, latent_w)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self._pipe._pack_latents(noise, batch, self.latent_channels, latent_h, latent_w)

    def velocity(self, latents: Tensor, sigma: Tensor | float, cond: Condition) -> Tensor:
        """The transformer's velocity for noisy packed ``latents`` ``(B, T, 4·C)`` at noise level ``sigma``.

        The reference tokens are appended after the noisy ones (only inside :attr:`reference_window`, if set) and the
        output is cut back to the noisy tokens. ``sigma`` is a float or a ``(B,)`` tensor. Gradients flow to the
        trainable (adapter) weights when enabled.
        """
        batch = latents.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"velocity: condition has batch {cond.batch_size}, latents have {batch}")
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(batch)
        return gated_velocity(self._velocity, latents, sigma, cond, self.reference_window)

    def _velocity(self, latents: Tensor, sigma: Tensor, cond: Condition, references: bool) -> Tensor:
        """One transformer call, with the reference tokens appended (``references``) or without them."""
        # The pipeline passes timestep = (σ·1000 as float32, cast to the latent dtype) / 1000; mirror it exactly.
        timestep = (sigma * 1000).to(latents.dtype) / 1000
        hidden = (
            torch.cat([latents.to(self.dtype), cond.image_latents], dim=1) if references else latents.to(self.dtype)
        )
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=cond.guidance,
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=cond.img_ids if references else cond.img_ids[: latents.shape[1]],
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    def time_shift(self, cond: Condition) -> float:
        """FLUX's resolution-dependent shift ``exp(μ)`` at ``cond``'s token count, from the scheduler configuration."""
        return scheduler_shift(self.scheduler_config, cond.num_tokens)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageLike], height: int, width: int, keys: Sequence[str | None] | None = None
    ) -> Tensor:
        """Clean packed latents ``(B, T, 4·C)`` of ``images``, encoded as references are (the VAE's mode, shifted and
        scaled as the pipeline does; cached under ``keys``)."""
        keys = list(keys) if keys is not None else [None] * len(images)
        return torch.cat(
            [
                self.encoder.encode_reference(image, height, width, None if key is None else f"image/{key}")
                for image, key in zip(images, keys, strict=True)
            ]
        )

    @torch.no_grad()
    def decode(self, latents: Tensor, cond: Condition) -> Tensor:
        """Packed latents → images ``(B, 3, H, W)`` float32 in [0, 1]."""
        unpacked = self._pipe._unpack_latents(latents, cond.height, cond.width, self.vae_scale_factor)
        unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------ the seam

    def shard_units(self, network: nn.Module | None = None) -> list[nn.Module]:
        """The FLUX blocks of ``network`` (default: the transformer), double-stream blocks first."""
        network = self.transformer if network is None else network
        return [*getattr(network, "transformer_blocks", []), *getattr(network, "single_transformer_blocks", [])]

    def frozen_parts(self) -> list[nn.Module]:
        """The VAE and the text encoders that are loaded (every rank holds them whole)."""
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def flops_per_call(self, cond: Condition) -> float:
        """Analytic forward FLOPs of one transformer call for one sample (:func:`divrl.policy.flops.transformer_flops`):
        the noisy tokens, every reference token and the prompt tokens."""
        return transformer_flops(
            self.transformer.config, cond.num_tokens, cond.image_latents.shape[1], cond.prompt_embeds.shape[1]
        )
