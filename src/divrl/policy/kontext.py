"""``KontextPolicy``: FLUX.1 Kontext as the policy being trained.

The policy owns the pipeline's components (transformer, VAE, CLIP and T5 encoders and tokenizers) and exposes
what a rollout and a GRPO update need, nothing more:

- :meth:`~KontextPolicy.condition`: prompts and reference images → a :class:`Condition` (text embeddings, packed
  reference latents, position ids, guidance), each prompt and reference encoded once and repeated over the group;
- :meth:`~KontextPolicy.initial_noise`: packed Gaussian latents, drawn exactly as diffusers draws them;
- :meth:`~KontextPolicy.velocity`: one transformer call, reference tokens appended and cut off again;
- :meth:`~KontextPolicy.decode`: packed latents → images in [0, 1];
- :meth:`~KontextPolicy.adapter_disabled`: the reference policy (same network, LoRA off);
- :meth:`~KontextPolicy.save_lora`: the adapter in diffusers' format (``pytorch_lora_weights.safetensors``),
  loadable with ``FluxKontextPipeline.load_lora_weights``.

Prompt encoding and reference preprocessing go through diffusers' own ``FluxKontextPipeline`` methods on the same
components, so tokenisation, truncation and VAE scaling match the pipeline by construction.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from torch import Tensor, nn

from divrl.images import ImageLike, to_image_batch
from divrl.policy.sharding import clean_name, full_tensor, unwrapped
from divrl.utils import parse_dtype

__all__ = ["LoRAConfig", "Condition", "KontextPolicy", "DEFAULT_LORA_TARGETS", "ModelLoadError"]

DEFAULT_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)
"""The published DivRL run's LoRA targets (REFERENCE.md): every attention and MLP projection of the FLUX blocks."""


class ModelLoadError(OSError):
    """A model could not be loaded (missing, gated, or offline); the message says what to do."""


@dataclass
class LoRAConfig:
    """LoRA adapter on the Kontext transformer (peft).

    Attributes:
        rank: adapter rank ``r`` (DivRL: 64).
        alpha: scaling numerator ``α``; the update is scaled by ``α / r`` (DivRL: 128).
        target_modules: module-name suffixes that get an adapter (DivRL's list by default).
        init: peft ``init_lora_weights``: ``"gaussian"`` (DivRL) draws A from a Gaussian and sets B = 0, so a fresh
            adapter leaves the model unchanged (KL to the reference policy is 0).
        dropout: LoRA dropout (0 in DivRL; non-zero makes rollout and training log-probs differ).
    """

    rank: int = 64
    alpha: float = 128.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    init: str = "gaussian"
    dropout: float = 0.0

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            init_lora_weights=self.init if self.init != "default" else True,
            lora_dropout=self.dropout,
        )


@dataclass
class Condition:
    """Everything the transformer needs besides the noisy latents, for a batch of samples.

    Batch tensors have the samples along dim 0 (a group of ``G`` samples of one condition repeats its row ``G``
    times); ``text_ids`` and ``img_ids`` are shared by the batch.

    Attributes:
        prompt_embeds: T5 token embeddings ``(B, L, D)``.
        pooled_prompt_embeds: CLIP pooled embedding ``(B, D')``.
        text_ids: text position ids ``(L, 3)`` (zeros, as in FLUX).
        image_latents: packed reference latents ``(B, T_ref, 4·C)``.
        img_ids: position ids of the noisy tokens followed by the reference tokens ``(T + T_ref, 3)``; reference
            ids have first channel 1.
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

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def select(self, index: Tensor | Sequence[int] | slice) -> Condition:
        """The conditions of a subset of samples (a micro-batch)."""
        if isinstance(index, slice):
            return self._map_batch(lambda t: t[index])
        return self._map_batch(lambda t: t[torch.as_tensor(index, device=t.device)])

    def repeat_interleave(self, repeats: int) -> Condition:
        """Each row repeated ``repeats`` times in place (condition i → rows i·G ... i·G + G − 1)."""
        return self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn) -> Condition:
        """Apply ``fn`` to every per-sample tensor (the shared position ids are left as they are)."""
        return replace(
            self,
            prompt_embeds=fn(self.prompt_embeds),
            pooled_prompt_embeds=fn(self.pooled_prompt_embeds),
            image_latents=fn(self.image_latents),
            guidance=None if self.guidance is None else fn(self.guidance),
        )


class KontextPolicy(nn.Module):
    """FLUX.1 Kontext with an optional LoRA adapter, as a policy for on-policy RL.

    Build it with :meth:`from_pretrained` (Hub id or local folder), :meth:`from_pipeline` (an existing
    ``FluxKontextPipeline``) or :meth:`tiny` (small offline components for demos and tests).

    Args:
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler: the components of a
            ``FluxKontextPipeline``; the text encoders and tokenizers may be ``None`` when every condition comes
            precomputed (:meth:`condition_from_precomputed`).
        lora: the adapter to add to the transformer, or ``None`` to train no adapter (full fine-tuning or pure
            inference).
        max_sequence_length: T5 tokens per prompt (DivRL: 128; diffusers' default 512).
        base_dtype: dtype of the frozen base weights (``"bfloat16"`` on GPUs; ``None`` keeps them as loaded).
            Trainable adapter weights are always float32.
        prompt_cache_size: how many encoded prompts (and references) to keep (least recently used evicted).
        train_transformer: full fine-tuning: every transformer weight trains, in float32 (``lora`` must be ``None``).
    """

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
        lora: LoRAConfig | None = None,
        max_sequence_length: int = 128,
        base_dtype: str | torch.dtype | None = None,
        prompt_cache_size: int = 256,
        train_transformer: bool = False,
    ):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

        from divrl.policy.tiny import FLUX_SCHEDULER_CONFIG

        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler.config) if scheduler is not None else dict(FLUX_SCHEDULER_CONFIG)
        self.max_sequence_length = max_sequence_length
        self.lora_config = lora
        modules = [m for m in (transformer, vae, text_encoder, text_encoder_2) if m is not None]
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        dtype = parse_dtype(base_dtype, "KontextPolicy")
        if dtype is not None:
            for module in modules:
                module.to(dtype)
        if train_transformer:
            if lora is not None:
                raise ValueError("KontextPolicy: train_transformer (full fine-tuning) needs lora=None")
            transformer.float().requires_grad_(True)
        self.train_transformer = train_transformer
        if lora is not None:
            transformer.add_adapter(lora.to_peft())
            for name, parameter in transformer.named_parameters():
                if "lora_" in name:
                    parameter.data = parameter.data.float()
                    parameter.requires_grad_(True)
        # A pipeline view on the same modules: diffusers' own prompt encoding and image preprocessing.
        self._pipe = FluxKontextPipeline(
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
        self._pipe.set_progress_bar_config(disable=True)
        self._reference: tuple[nn.Module] | None = None  # full fine-tuning's KL reference (keep_reference)
        self._reference_offloaded = False
        self._prompt_cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._reference_cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size

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
        """Load FLUX.1 Kontext from a Hub id or a local folder in diffusers' format.

        Args:
            model: Hub id (``black-forest-labs/FLUX.1-Kontext-dev``, gated: accept its licence on the Hub and log
                in) or a folder written by ``FluxKontextPipeline.save_pretrained``.
            torch_dtype: dtype of the frozen weights: ``"auto"`` = bfloat16 when CUDA is available, else float32 (CPU
                kernels for bf16 are slow); ``None`` = as stored; or an explicit dtype name.
            local_files_only: never contact the Hub (offline machines with a populated cache).
            revision: Hub revision (branch, tag or commit).
            text_encoders: load the CLIP and T5 encoders; ``False`` skips them (9.8 GB in bf16 for FLUX.1 Kontext:
                T5-XXL 9.52 GB + CLIP-L 0.25 GB, benchmarks/precompute.py) when every condition comes precomputed.
            **kwargs: forwarded to :class:`KontextPolicy` (``lora``, ``max_sequence_length``...).

        Raises:
            ModelLoadError: the model is missing, gated, or not reachable; the message says what to do.
        """
        from diffusers import FluxKontextPipeline

        name = os.fspath(model)
        local = Path(name).expanduser()
        if local.is_dir():
            name = str(local)
            if not (local / "model_index.json").is_file():
                raise ModelLoadError(
                    f"KontextPolicy: {name!r} has no model_index.json; it is not a diffusers pipeline folder. Save one "
                    f"with FluxKontextPipeline.save_pretrained(folder), or pass a Hub id"
                )
        elif name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a Hub id has exactly one "/"
            raise ModelLoadError(
                f"KontextPolicy: model folder {name!r} does not exist (relative paths start at {os.getcwd()!r}; run "
                f"from the repository root for the shipped configs); pass an existing folder or a Hub id"
            )
        if torch_dtype == "auto":
            torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        try:
            dtype = parse_dtype(torch_dtype, "KontextPolicy")
            skip = {} if text_encoders else dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
            pipe = FluxKontextPipeline.from_pretrained(
                name, dtype=dtype, local_files_only=local_files_only, revision=revision, **skip
            )
        except Exception as err:  # noqa: BLE001 - re-raised with instructions, original chained
            if isinstance(err, (OSError, ValueError)) or type(err).__name__.endswith(("RepoError", "HTTPError")):
                raise ModelLoadError(_load_hint(name, err)) from err
            raise
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
    def tiny(cls, seed: int = 0, lora: LoRAConfig | None = None, **kwargs) -> KontextPolicy:
        """A tiny offline Kontext policy (see :mod:`divrl.policy.tiny`); LoRA rank 4, α 8 unless given (none with
        ``train_transformer=True``)."""
        from divrl.policy.tiny import tiny_kontext_components

        kwargs.setdefault("max_sequence_length", 32)
        if lora is None and not kwargs.get("train_transformer"):
            lora = LoRAConfig(rank=4, alpha=8.0)
        return cls(**tiny_kontext_components(seed), lora=lora, **kwargs)

    def clear_caches(self) -> None:
        """Forget every cached prompt encoding and reference latent (to time encoding, or to bound host memory when
        every identity brings new prompts)."""
        self._prompt_cache.clear()
        self._reference_cache.clear()

    def drop_encoders(self) -> KontextPolicy:
        """Remove the text encoders and the VAE encoder (the decoder stays, for images to reward): for training on
        precomputed conditions only (:meth:`condition_from_precomputed`); :meth:`condition` then raises."""
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
        self._check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return (height // multiple) * (width // multiple)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """T5 embeddings ``(B, L, D)``, CLIP pooled ``(B, D')`` and text ids ``(L, 3)``; each prompt encoded once."""
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError(
                "this policy was loaded without text encoders (policy.text_encoders: false), so every condition must "
                "come precomputed: convert the shards with `divrl data ... --precompute MODEL`"
            )
        unique = list(dict.fromkeys(prompts))
        # Collect this call's encodings first: caching new prompts may evict ones this call still needs.
        found = {p: self._prompt_cache[p] for p in unique if p in self._prompt_cache}
        missing = [p for p in unique if p not in found]
        if missing:
            embeds, pooled, _ = self._pipe.encode_prompt(
                prompt=missing, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            for k, prompt in enumerate(missing):
                found[prompt] = (embeds[k : k + 1], pooled[k : k + 1])
        for prompt in prompts:
            self._remember(self._prompt_cache, prompt, found[prompt])  # (re)inserted as most recently used
        embeds = torch.cat([found[p][0] for p in prompts])
        pooled = torch.cat([found[p][1] for p in prompts])
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        return embeds, pooled, text_ids

    @torch.no_grad()
    def encode_reference(self, image: ImageLike, height: int, width: int, key: str | None = None) -> Tensor:
        """VAE-encode one reference image at ``height × width`` → packed latents ``(1, T_ref, 4·C)``.

        The image is resized (aspect not kept, as in DivRL's 512×512 training) and normalised by diffusers'
        ``VaeImageProcessor``; the latent is the distribution's mode, shifted and scaled as the pipeline does.
        ``key`` (e.g. the identity id) enables caching across groups.
        """
        cache_key = None if key is None else (key, height, width)
        if cache_key is not None and cache_key in self._reference_cache:
            self._reference_cache.move_to_end(cache_key)
            return self._reference_cache[cache_key]
        self._check_size(height, width)
        if self.vae.encoder is None:
            raise RuntimeError(
                "this policy has no VAE encoder (policy.text_encoders: false drops the encoders), so every condition "
                "must come precomputed: convert the shards with `divrl data ... --precompute MODEL`"
            )
        pixels = to_image_batch(image, "reference")
        if pixels.shape[0] != 1:
            raise ValueError(f"encode_reference: expected one image, got {pixels.shape[0]}")
        processor = self._pipe.image_processor
        pixels = processor.preprocess(processor.resize(pixels, height, width), height, width)
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        packed = self._pipe._pack_latents(latents, 1, latents.shape[1], latents.shape[2], latents.shape[3])
        packed = packed.to(self.dtype)
        if cache_key is not None:
            self._remember(self._reference_cache, cache_key, packed)
        return packed

    def condition(
        self,
        references: Sequence[ImageLike] | ImageLike,
        prompts: Sequence[str] | str,
        height: int,
        width: int,
        guidance: float = 2.5,
        group_size: int = 1,
        reference_keys: Sequence[str | None] | None = None,
    ) -> Condition:
        """Conditions for ``len(prompts)`` (reference, prompt) pairs, each repeated ``group_size`` times.

        Args:
            references: one reference image per prompt (or one image shared by all prompts).
            prompts: the edit prompts.
            height, width: generated (and reference) size in pixels.
            guidance: FLUX's distilled guidance scale (DivRL: 2.5); not classifier-free guidance.
            group_size: samples per condition (``G``).
            reference_keys: optional cache keys (identity ids) of the references.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(references, Tensor):
            references = list(references) if references.dim() == 4 else [references] * len(prompts)
        elif isinstance(references, (str, os.PathLike)) or not isinstance(references, Sequence):
            references = [references] * len(prompts)
        if len(references) != len(prompts):
            raise ValueError(f"condition: {len(references)} references for {len(prompts)} prompts; give one per prompt")
        keys = list(reference_keys) if reference_keys is not None else [None] * len(prompts)
        embeds, pooled, _ = self.encode_prompts(prompts)
        image_latents = torch.cat([self.encode_reference(r, height, width, k) for r, k in zip(references, keys)])
        return self.condition_from_precomputed(embeds, pooled, image_latents, height, width, guidance, group_size)

    def condition_from_precomputed(
        self,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        image_latents: Tensor,
        height: int,
        width: int,
        guidance: float = 2.5,
        group_size: int = 1,
    ) -> Condition:
        """Conditions from embeddings and reference latents computed earlier (``divrl data --precompute``), without
        the text encoders or the VAE encoder; the same result as :meth:`condition` on the same inputs.

        Args:
            prompt_embeds: T5 embeddings ``(B, L, D)``; ``pooled_prompt_embeds``: CLIP pooled ``(B, D')``;
                ``image_latents``: packed reference latents ``(B, T_ref, 4·C)`` at ``height × width``.
        """
        batch = prompt_embeds.shape[0]
        if pooled_prompt_embeds.shape[0] != batch or image_latents.shape[0] != batch:
            raise ValueError(
                f"condition_from_precomputed: batch sizes differ: prompt_embeds {batch}, pooled "
                f"{pooled_prompt_embeds.shape[0]}, image_latents {image_latents.shape[0]}"
            )
        latent_h, latent_w = self._latent_grid(height, width)
        expected = (latent_h // 2) * (latent_w // 2)
        if image_latents.shape[1] != expected:
            raise ValueError(
                f"condition_from_precomputed: reference latents have {image_latents.shape[1]} tokens, a {height}x{width} "
                f"image has {expected}; precompute at the training resolution"
            )
        embeds = prompt_embeds.to(device=self.device, dtype=self.dtype)
        pooled = pooled_prompt_embeds.to(device=self.device, dtype=self.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
        latent_ids = self._pipe._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, self.device, self.dtype)
        image_ids = latent_ids.clone()
        image_ids[..., 0] = 1
        guidance_t = None
        if self.transformer.config.guidance_embeds:
            guidance_t = torch.full((batch,), guidance, device=self.device, dtype=torch.float32)
        condition = Condition(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            text_ids=text_ids,
            image_latents=image_latents.to(device=self.device, dtype=self.dtype),
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            guidance=guidance_t,
            height=height,
            width=width,
            num_tokens=latent_ids.shape[0],
        )
        return condition.repeat_interleave(group_size) if group_size > 1 else condition

    # ------------------------------------------------------------------------------------------------ sampling

    def initial_noise(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Packed Gaussian latents ``(B, T, 4·C)``, drawn exactly as ``FluxKontextPipeline.prepare_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        latent_h, latent_w = self._latent_grid(height, width)
        shape = (batch_size, self.latent_channels, latent_h, latent_w)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return self._pipe._pack_latents(noise, batch_size, self.latent_channels, latent_h, latent_w)

    def velocity(self, latents: Tensor, sigma: Tensor | float, condition: Condition) -> Tensor:
        """The transformer's velocity for noisy packed ``latents`` ``(B, T, 4·C)`` at noise level ``sigma``.

        The reference tokens are appended after the noisy ones and the output is cut back to the noisy tokens.
        ``sigma`` is a float or a ``(B,)`` tensor. Gradients flow to the trainable (adapter) weights when enabled.
        """
        batch = latents.shape[0]
        if condition.batch_size != batch:
            raise ValueError(f"velocity: condition has batch {condition.batch_size}, latents have {batch}")
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).expand(batch)
        # The pipeline passes timestep = (σ·1000 as float32, cast to the latent dtype) / 1000; mirror it exactly.
        timestep = (sigma * 1000).to(latents.dtype) / 1000
        hidden = torch.cat([latents.to(self.dtype), condition.image_latents], dim=1)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=condition.guidance,
            pooled_projections=condition.pooled_prompt_embeds,
            encoder_hidden_states=condition.prompt_embeds,
            txt_ids=condition.text_ids,
            img_ids=condition.img_ids,
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    @torch.no_grad()
    def decode(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Packed latents → images ``(B, 3, H, W)`` float32 in [0, 1]."""
        unpacked = self._pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------------ adapter

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy of the KL term, for the duration of the block: with a LoRA, the same network with
        the adapter off (no weight copy); with full fine-tuning, the frozen copy made by :meth:`keep_reference`."""
        if self.lora_config is not None:
            with self.adapter_disabled():
                yield
            return
        if self._reference is None:
            raise RuntimeError(
                "reference: full fine-tuning has no reference policy; call keep_reference() before training (the "
                "training module does when grpo.kl_beta > 0)"
            )
        trained, frozen = self.transformer, self._reference[0]
        self.transformer = frozen  # nn.Module.__setattr__ re-registers it under the same name
        try:
            with _streamed(frozen, trained.x_embedder.weight.device) if self._reference_offloaded else contextlib.nullcontext():
                yield
        finally:
            self.transformer = trained

    def keep_reference(self, offload: bool = False) -> nn.Module:
        """Full fine-tuning: keep a frozen copy of the transformer as it is now (the initial policy) as the
        reference of the KL term, in the trained weights' dtype (so the first update's KL is exactly 0).

        It is *not* a registered submodule: it is never trained, saved in checkpoints, or moved by ``.to()``.
        ``offload=True`` keeps it on the CPU and streams it through the GPU block by block during the reference
        forward (GPU memory: one block); under FSDP2 shard it instead (:func:`divrl.policy.sharding.shard_transformer`
        on the returned module: 1/world of it per GPU).
        """
        if self.lora_config is not None:
            raise RuntimeError("keep_reference: a LoRA policy's reference is the adapter switched off; no copy needed")
        frozen = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        if offload:
            frozen.to("cpu")
            if torch.cuda.is_available():  # pinned pages: the per-block copies to the GPU run asynchronously
                for t in [*frozen.parameters(), *frozen.buffers()]:
                    t.data = t.data.pin_memory()
        self._reference = (frozen,)  # a tuple hides it from nn.Module's registration
        self._reference_offloaded = offload
        return frozen

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The reference policy: the same transformer with the LoRA adapter switched off (no weight copy)."""
        if self.lora_config is None:
            raise RuntimeError("adapter_disabled: this policy has no LoRA adapter (lora=None)")
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapter weights with peft's names (``...lora_A.weight``), whole and on the CPU. With a sharded
        (FSDP2) transformer the shards are gathered: a collective, every rank must call it. Under FSDP1 the adapter
        is unwrapped (whole on every rank) and nothing is gathered."""
        if self.lora_config is None:
            raise RuntimeError("lora_state_dict: this policy has no LoRA adapter (lora=None)")
        return {k: full_tensor(v.detach()).cpu() for k, v in self._adapter_state().items()}

    def _adapter_state(self) -> dict[str, Tensor]:
        """peft's adapter state dict read from the parameters (``state_dict()`` on an FSDP1-wrapped transformer would
        gather every block's frozen weights to pick out the adapter's), by their unwrapped names."""
        transformer = unwrapped(self.transformer)  # peft matches its layers' module names against these keys
        state = get_peft_model_state_dict(transformer, state_dict=dict(transformer.named_parameters()))
        return {clean_name(k): v for k, v in state.items()}

    def save_lora(self, directory: str | os.PathLike, state: dict[str, Tensor] | None = None) -> Path:
        """Write the adapter in diffusers' format: ``<directory>/pytorch_lora_weights.safetensors``.

        Load it with ``FluxKontextPipeline.load_lora_weights(directory)``; the adapter's rank, alpha and targets are
        stored in the file's metadata, so the loaded scale ``alpha / rank`` matches training. ``state``: the weights
        to write (default: :meth:`lora_state_dict`; a sharded policy gathers them on every rank first and passes
        them here on the writing rank).
        """
        from diffusers import FluxKontextPipeline

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.lora_config is None:
            raise RuntimeError("save_lora: this policy has no LoRA adapter (lora=None)")
        FluxKontextPipeline.save_lora_weights(
            directory,
            transformer_lora_layers=state if state is not None else self.lora_state_dict(),
            # rank, alpha and targets travel in the file's metadata: without them diffusers assumes alpha = rank
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        return directory / "pytorch_lora_weights.safetensors"

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load adapter weights written by :meth:`save_lora` (a folder or the ``.safetensors`` file) into this
        policy's adapter; the rank and targets must match (the error says what differs)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.lora_config is None:
            raise RuntimeError("load_lora: this policy has no LoRA adapter; set policy.lora to the trained rank/alpha")
        file = Path(path)
        if file.is_dir():
            file = file / "pytorch_lora_weights.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"load_lora: {str(file)!r} does not exist; pass a folder written by save_lora")
        state = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items()}
        ours = self._adapter_state()
        expected = set(ours)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"load_lora: {file} does not fit this adapter ({len(missing)} missing keys e.g. {missing[:2]}, "
                f"{len(extra)} unexpected e.g. {extra[:2]}); use the same lora target_modules as the run that wrote it"
            )
        shapes = [k for k in state if state[k].shape != ours[k].shape]
        if shapes:
            raise ValueError(
                f"load_lora: {file} has rank {state[shapes[0]].shape} where this adapter has {ours[shapes[0]].shape} "
                f"({shapes[0]}); set policy.lora.rank to the trained rank"
            )
        set_peft_model_state_dict(self.transformer, state)

    # ------------------------------------------------------------------------------------------------ helpers

    def _latent_grid(self, height: int, width: int) -> tuple[int, int]:
        self._check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return 2 * (height // multiple), 2 * (width // multiple)

    def _check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of {multiple} (VAE factor "
                f"{self.vae_scale_factor} x 2 for packing); e.g. 512x512"
            )

    def _remember(self, cache: OrderedDict, key, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.prompt_cache_size:
            cache.popitem(last=False)


def _load_hint(name: str, err: Exception) -> str:
    text = str(err)
    gated = "gated" in text.lower() or "401" in text or "403" in text or type(err).__name__ == "GatedRepoError"
    if gated:
        what = (
            f"{name!r} is gated: accept its licence on the model's Hub page, then log in with `huggingface-cli login` "
            f"(or set HF_TOKEN)"
        )
    else:
        what = (
            f"{name!r} is neither a local diffusers folder nor reachable on the Hugging Face Hub (offline, or a wrong "
            f"id). Download it once (`huggingface-cli download {name}`) and pass local_files_only=True, or pass the "
            f"path of a folder written by FluxKontextPipeline.save_pretrained"
        )
    return f"KontextPolicy: cannot load {what}. Original error: {type(err).__name__}: {text[:300]}"


@contextlib.contextmanager
def _streamed(transformer: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a CPU-resident transformer on ``device``: its small top-level parts move for the duration of the block,
    each transformer block only for its own forward (hooks), so the device holds one block at a time. A block's
    weights are copied to the device before its forward and simply dropped after it (the CPU copies stay where they
    are: nothing is copied back), also when the forward raises."""
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    block_ids = {id(b) for b in blocks}
    rest = [m for m in transformer.children() if not isinstance(m, nn.ModuleList) and id(m) not in block_ids]
    on_cpu: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def arrive(module: nn.Module, args) -> None:
        tensors = [*module.parameters(), *module.buffers()]
        on_cpu[id(module)] = [(t, t.data) for t in tensors]
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True)

    def leave(module: nn.Module, args=None, output=None) -> None:
        for t, data in on_cpu.pop(id(module), []):
            t.data = data

    hooks = [hook for block in blocks for hook in (block.register_forward_pre_hook(arrive),
                                                   block.register_forward_hook(leave))]  # fmt: skip
    for module in rest:
        module.to(device)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for block in blocks:  # a forward that raised left its block on the device
            leave(block)
        for module in rest:
            module.to("cpu")
