"""Memory model: GPU bytes per rank for training FLUX.1 Kontext or Qwen-Image-Edit-2511 (``--family qwen``, 20B), from
parameter counts on the meta device.

Counts the real transformer (built from its configuration on the meta device, no download) and DivRL's LoRA
(r 64 on the official targets), then adds up what each rank holds for LoRA or full fine-tuning under DDP, FSDP1
(``FSDP1Strategy``: the frozen base sharded, the LoRA weights and their states whole on every rank; LoRA only) or
FSDP2 (``FSDP2Strategy``: weights, gradients and optimizer states all sharded), fp32 AdamW or 8-bit AdamW states,
on 1, 8 and 64 GPUs:

- frozen base weights: bf16, 2 bytes per parameter (sharded under FSDP1 and FSDP2);
- trainable weights: fp32 (4 B), their gradients fp32 (4 B), AdamW moments fp32 (8 B) or 8-bit (2 B; the block-wise
  absmax scales are under 1%); sharded under FSDP2 only;
- the VAE (bf16, replicated); the text encoders unless conditions are precomputed (``policy.text_encoders: false``);
- full fine-tuning with ``kl_beta > 0`` keeps a frozen reference copy in the trained weights' dtype (fp32, so the
  first update's KL is exactly 0): sharded like the policy under FSDP2, in CPU memory (0 on the GPU) otherwise.

Activations are not modelled; measured on an H100 at 512², micro-batch 3 (``benchmarks/gpu_step.py``): about 5 GB
with gradient checkpointing, about 54 GB without.

Usage::

    python benchmarks/memory_model.py
    python benchmarks/memory_model.py --gpus 1 8 64 256 --lora-rank 32
    python benchmarks/memory_model.py --family qwen --gpus 8 --text-encoders   # 20B, 8 x 80 GB: what fits
"""

from __future__ import annotations

import argparse

import torch

from divrl.policy.flops import FLUX_TRANSFORMER_CONFIG as FLUX_TRANSFORMER
from divrl.policy.kontext import DEFAULT_LORA_TARGETS

TEXT_ENCODER_PARAMS = 4.762e9 + 0.123e9  # T5 v1.1 XXL encoder + CLIP-L text (benchmarks/precompute.py)
VAE_PARAMS = 0.084e9
GB = 1e9

QWEN_EDIT_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
    zero_cond_t=True,
)
"""Qwen-Image-Edit-2511's ``transformer/config.json``."""

FAMILIES = {
    "kontext": ("FLUX.1 Kontext", "FluxTransformer2DModel", FLUX_TRANSFORMER, TEXT_ENCODER_PARAMS, VAE_PARAMS),
    "qwen": (
        "Qwen-Image-Edit-2511",
        "QwenImageTransformer2DModel",
        QWEN_EDIT_TRANSFORMER,
        8.292e9,  # Qwen2.5-VL-7B-Instruct: the language model and its vision tower
        0.127e9,
    ),  # the Qwen-Image VAE (Wan 2.1's)
}
"""family → (name, diffusers transformer class, its configuration, text encoder parameters, VAE parameters)."""


def parameter_counts(rank: int, config: dict = FLUX_TRANSFORMER, family: str = "kontext") -> tuple[int, int]:
    """(transformer parameters, LoRA parameters at ``rank`` on the family's default targets)."""
    import diffusers

    from divrl.policy.qwen_image import QWEN_EDIT_LORA_TARGETS

    targets = QWEN_EDIT_LORA_TARGETS if family == "qwen" else DEFAULT_LORA_TARGETS
    with torch.device("meta"):
        transformer = getattr(diffusers, FAMILIES[family][1])(**config)
    total = sum(p.numel() for p in transformer.parameters())
    lora = sum(
        rank * (m.in_features + m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in targets)
    )
    return total, lora


STRATEGIES = {"ddp": "DDP", "fsdp1": "FSDP1", "fsdp2": "FSDP2"}


def per_gpu_bytes(
    params: int,
    trainable: int,
    gpus: int,
    *,
    full: bool,
    strategy: str,
    eightbit: bool,
    text_encoders: bool,
    reference_copy: bool,
    text_params: float = TEXT_ENCODER_PARAMS,
    vae_params: float = VAE_PARAMS,
) -> float:
    """Bytes on one GPU (no activations) for ``strategy`` in :data:`STRATEGIES` over ``gpus`` ranks."""
    if strategy not in STRATEGIES or (full and strategy == "fsdp1"):
        raise ValueError(f"strategy {strategy!r}: choose from {sorted(STRATEGIES)} (full fine-tuning: ddp or fsdp2)")
    base = 0 if full else 2 * params  # frozen bf16 base (full fine-tuning trains it: counted as trainable)
    state = trainable * (4 + 4 + (2 if eightbit else 8))
    base /= 1 if strategy == "ddp" else gpus
    state /= gpus if strategy == "fsdp2" else 1
    fixed = 2 * vae_params + (2 * text_params if text_encoders else 0)
    reference = 4 * params / gpus if (full and reference_copy and strategy == "fsdp2") else 0  # else on the CPU
    return base + state + fixed + reference


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--text-encoders", action="store_true", help="count the text encoders (not precomputed)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="kontext")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory for the 'fits' column (default 80)")
    args = parser.parse_args(argv)
    name, _, config, text_params, vae_params = FAMILIES[args.family]
    params, lora = parameter_counts(args.lora_rank, config, args.family)
    print(
        f"{name} transformer: {params / 1e9:.3f} B parameters; LoRA r {args.lora_rank}: {lora / 1e6:.1f} M "
        f"({100 * lora / params:.2f}%)"
    )
    print(f"per-GPU GB without activations ({'with' if args.text_encoders else 'without'} text encoders on the GPU)\n")
    rows = []
    header = "| setup | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in args.gpus) + " |"
    print(header[:-2] + f" | fits {args.gpu_gb:.0f} GB on {args.gpus[-1]} |")
    print("| --- |" + " --- |" * (len(args.gpus) + 1))
    for full in (False, True):
        for strategy in ("ddp", "fsdp2") if full else STRATEGIES:
            for eightbit in (False, True):
                label = (
                    f"{'full FT' if full else f'LoRA r{args.lora_rank}'}, {STRATEGIES[strategy]}, "
                    f"{'8-bit' if eightbit else 'fp32'} AdamW"
                )
                values = [
                    per_gpu_bytes(
                        params,
                        params if full else lora,
                        n,
                        full=full,
                        strategy=strategy,
                        eightbit=eightbit,
                        text_encoders=args.text_encoders,
                        reference_copy=False,
                        text_params=text_params,
                        vae_params=vae_params,
                    )
                    / GB
                    for n in args.gpus
                ]
                rows.append({"setup": label, **{str(n): v for n, v in zip(args.gpus, values)}})
                fits = "yes" if values[-1] < args.gpu_gb else "no"  # before activations: leave them room
                print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {fits} |")
    print(
        "\nfull fine-tuning with kl_beta > 0 adds a frozen fp32 reference copy: under FSDP2 "
        f"{4 * params / GB:.1f} GB / number of shards per GPU; without sharding it stays in CPU memory"
    )
    return rows


if __name__ == "__main__":
    main()
