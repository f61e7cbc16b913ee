"""Typed, documented configuration of a DivRL run: the policy to load and the Flow-GRPO hyperparameters.

Defaults are the published DivRL run (``REFERENCE.md``, "The published DivRL run") unless a field says otherwise.
Every field is a YAML key under ``model.init_args.policy`` or ``model.init_args.grpo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from divrl.policy.kontext import KontextPolicy, LoRAConfig

__all__ = ["GRPOConfig", "PolicyConfig"]

TINY = "tiny"


@dataclass
class PolicyConfig:
    """Which Kontext model to train and how.

    Attributes:
        model: a Hub id (``black-forest-labs/FLUX.1-Kontext-dev``, gated: accept the licence and log in), a local
            diffusers folder, or ``"tiny"`` for the built-in offline tiny model (demo and tests).
        lora: the LoRA adapter (paper: rank 64, alpha 128, gaussian init, DivRL's target list); ``null`` trains no
            adapter.
        torch_dtype: dtype of the frozen base: ``"auto"`` (bfloat16 with CUDA, float32 on CPU), ``"bfloat16"``,
            ``"float32"``... Adapter weights are always float32.
        max_sequence_length: T5 tokens per prompt (paper: 128).
        local_files_only: never contact the Hub (offline clusters with a pre-filled cache).
        revision: Hub revision (branch, tag or commit) for reproducibility.
        tiny_seed: weight seed of the tiny model (``model: tiny`` only).
        text_encoders: load the CLIP and T5 text encoders (and keep the VAE encoder). ``false`` skips them (T5-XXL + CLIP-L: 9.8 GB in bf16
            for FLUX.1 Kontext, benchmarks/precompute.py) and requires shards converted with ``divrl data ... --precompute MODEL``.
        train_transformer: full fine-tuning instead of LoRA (set ``lora: null``): every transformer weight trains in
            float32. With ``grpo.kl_beta > 0`` the KL reference is a frozen copy of the initial transformer that does
            not double GPU memory: sharded like the policy under FSDP2 (1/world per GPU), else kept on the CPU and
            streamed through the GPU block by block. Memory per GPU: benchmarks/memory_model.py (FSDP2 needed at
            full size).
        gradient_checkpointing: recompute the transformer blocks' activations in the backward pass. On an H100 at 512²
            with micro-batches of 3 (benchmarks/gpu_step.py): peak 29.4 GB instead of 78.8 GB, each micro-batch 1.43×
            slower. Needed to train FLUX.1 Kontext on 80 GB GPUs with room to spare.
        sdpa_backends: the attention kernels PyTorch may use (``flash``, ``efficient``, ``cudnn``, ``math``), for
            rollouts and updates alike (the same kernel on both paths keeps the on-policy ratio at 1). cuDNN is left
            out by default: its bf16 backward returns NaN gradients on H100 with torch 2.11 (measured on the tiny
            model: every update non-finite; pytorch/pytorch#196678). ``null`` lets PyTorch choose.
    """

    model: str = "black-forest-labs/FLUX.1-Kontext-dev"
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)
    torch_dtype: str = "auto"
    max_sequence_length: int = 128
    local_files_only: bool = False
    revision: str | None = None
    tiny_seed: int = 0
    text_encoders: bool = True
    train_transformer: bool = False
    gradient_checkpointing: bool = False
    sdpa_backends: list[str] | None = field(default_factory=lambda: ["flash", "efficient", "math"])

    def attention(self):
        """A context manager restricting scaled-dot-product attention to ``sdpa_backends``."""
        import contextlib

        from torch.nn.attention import SDPBackend, sdpa_kernel

        if self.sdpa_backends is None:
            return contextlib.nullcontext()
        names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
        unknown = [b for b in self.sdpa_backends if b not in names]
        if unknown or not self.sdpa_backends:
            raise ValueError(f"policy.sdpa_backends: unknown {unknown or 'empty list'}; choose from {sorted(names)}")
        return sdpa_kernel([names[b] for b in self.sdpa_backends])

    def build(self) -> KontextPolicy:
        """Load (or build) the policy."""
        policy = self._load()
        if self.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        return policy if self.text_encoders else policy.drop_encoders()

    def _load(self) -> KontextPolicy:
        if self.model == TINY:
            dtype = None if self.torch_dtype == "auto" else self.torch_dtype
            from divrl.policy.tiny import tiny_kontext_components

            return KontextPolicy(**tiny_kontext_components(self.tiny_seed), lora=self.lora, base_dtype=dtype,
                                 max_sequence_length=self.max_sequence_length,
                                 train_transformer=self.train_transformer)  # fmt: skip
        return KontextPolicy.from_pretrained(
            self.model,
            torch_dtype=self.torch_dtype,
            local_files_only=self.local_files_only,
            revision=self.revision,
            text_encoders=self.text_encoders,
            lora=self.lora,
            max_sequence_length=self.max_sequence_length,
            train_transformer=self.train_transformer,
        )


@dataclass
class GRPOConfig:
    """Flow-GRPO hyperparameters (names follow trl's GRPOConfig where one exists).

    Attributes:
        group_size: samples per (identity, prompt) condition, ``G`` (paper: 21).
        num_steps: denoising steps of a training rollout (paper: 6).
        noise_level: SDE noise level ``a`` (paper: 0.9); 0 is the deterministic sampler (nothing to train).
        guidance: FLUX's distilled guidance scale (paper: 2.5; not classifier-free guidance).
        resolution: generated (and reference) image side in pixels (paper: 512).
        clip_range: PPO clip ``ε`` on the ratio (Flow-GRPO for FLUX: 1e-4).
        adv_clip: advantages are clipped to ``±adv_clip`` (paper: 5).
        adv_scope: ``"group"`` standardises rewards within each condition's ``G`` samples (the GRPO definition and
            our default); ``"batch"`` over the whole rollout batch of all ranks (the official code's choice).
        kl_beta: weight ``β`` of the KL to the reference policy (the adapter switched off; with full fine-tuning,
            a frozen copy of the initial transformer). The official code uses 0
            (the paper text says 0.1); 0 skips the reference forward entirely.
        ppo_epochs: passes over each rollout batch (paper: 1).
        updates_per_epoch: optimizer steps per pass: the rollout batch is shuffled and split into this many parts,
            each part one accumulated update (the official run: 2 per epoch). ``global_step`` counts these updates.
        micro_batch_size: samples per forward/backward in the update; gradients are accumulated over micro-batches
            and trained timesteps (paper: 3).
        rollout_micro_batch_size: samples per transformer call during rollouts (``None``: the whole batch).
        rollout_keep_gathered: under FSDP2, gather each transformer block's shards once per rollout and keep them for
            every denoising step (one all-gather per block per rollout instead of per step), at the cost of the
            whole transformer on each GPU during the rollout, in its parameter dtype: FLUX.1 Kontext with a LoRA
            (bf16 base) 23.8 GB; full fine-tuning (fp32) 47.6 GB, so turn it off there on 80 GB GPUs. ``false``
            re-gathers block by block at every step (ZeRO-3 memory). Ignored without sharding and under FSDP1 (whose
            units re-gather at every step under ``FULL_SHARD``; its ``SHARD_GRAD_OP`` keeps them gathered).
        timestep_fraction: train the first ``int(num_steps · fraction)`` steps (paper: 0.99 → steps 0..4 of 6).
            Exclusive with ``sde_window``.
        sde_window: ``[start, size]``: only these steps are stochastic and trained, the others use the ODE
            (Flow-GRPO-Fast / MixGRPO style); ``None``: every step is stochastic.
        max_grad_norm: gradient-norm clip (paper: 1.0); ``None`` disables clipping.
        seed: seeds the rollout noise (combined with the rank and the rollout index, so a resumed run draws the same
            noise as an uninterrupted one).
        val_group_size: samples per validation condition (deterministic sampler, fixed seeds).
        max_consecutive_skips: stop with an error after this many updates in a row were skipped for a non-finite
            loss or gradient.
    """

    group_size: int = 21
    num_steps: int = 6
    noise_level: float = 0.9
    guidance: float = 2.5
    resolution: int = 512
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_scope: str = "group"
    kl_beta: float = 0.0
    ppo_epochs: int = 1
    updates_per_epoch: int = 1
    micro_batch_size: int = 3
    rollout_micro_batch_size: int | None = None
    rollout_keep_gathered: bool = True
    timestep_fraction: float | None = 0.99
    sde_window: tuple[int, int] | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 42
    val_group_size: int = 4
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        positive = ("group_size", "num_steps", "ppo_epochs", "updates_per_epoch", "micro_batch_size", "resolution",
                    "val_group_size", "max_consecutive_skips")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if not self.noise_level > 0:
            raise ValueError(f"grpo.noise_level must be > 0 to train (got {self.noise_level}); 0 is the ODE sampler")
        if not self.clip_range > 0:
            raise ValueError(f"grpo.clip_range must be > 0, got {self.clip_range}")
        if self.kl_beta < 0:
            raise ValueError(f"grpo.kl_beta must be >= 0, got {self.kl_beta}")
        if self.adv_scope not in ("group", "batch"):
            raise ValueError(f"grpo.adv_scope must be 'group' or 'batch', got {self.adv_scope!r}")
        if self.sde_window is not None:
            self.sde_window = tuple(self.sde_window)
            if self.timestep_fraction is not None:
                raise ValueError("grpo: set either timestep_fraction or sde_window (and timestep_fraction: null)")
