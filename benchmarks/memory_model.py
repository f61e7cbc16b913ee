"""Memory model: GPU bytes per rank for training FLUX.1 Kontext, from parameter counts on the meta device.

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
"""

from __future__ import annotations

import argparse

import torch

from divrl.policy.flops import FLUX_TRANSFORMER_CONFIG as FLUX_TRANSFORMER

from divrl.policy.kontext import DEFAULT_LORA_TARGETS

TEXT_ENCODER_PARAMS = 4.762e9 + 0.123e9  # T5 v1.1 XXL encoder + CLIP-L text (benchmarks/precompute.py)
VAE_PARAMS = 0.084e9
GB = 1e9


def parameter_counts(rank: int, config: dict = FLUX_TRANSFORMER) -> tuple[int, int]:
    """(transformer parameters, LoRA parameters at ``rank`` on DivRL's targets)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    total = sum(p.numel() for p in transformer.parameters())
    lora = sum(
        rank * (m.in_features + m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in DEFAULT_LORA_TARGETS)
    )
    return total, lora


STRATEGIES = {"ddp": "DDP", "fsdp1": "FSDP1", "fsdp2": "FSDP2"}


def per_gpu_bytes(params: int, trainable: int, gpus: int, *, full: bool, strategy: str, eightbit: bool,
                  text_encoders: bool, reference_copy: bool) -> float:
    """Bytes on one GPU (no activations) for ``strategy`` in :data:`STRATEGIES` over ``gpus`` ranks."""
    if strategy not in STRATEGIES or (full and strategy == "fsdp1"):
        raise ValueError(f"strategy {strategy!r}: choose from {sorted(STRATEGIES)} (full fine-tuning: ddp or fsdp2)")
    base = 0 if full else 2 * params  # frozen bf16 base (full fine-tuning trains it: counted as trainable)
    state = trainable * (4 + 4 + (2 if eightbit else 8))
    base /= 1 if strategy == "ddp" else gpus
    state /= gpus if strategy == "fsdp2" else 1
    fixed = 2 * VAE_PARAMS + (2 * TEXT_ENCODER_PARAMS if text_encoders else 0)
    reference = 4 * params / gpus if (full and reference_copy and strategy == "fsdp2") else 0  # else on the CPU
    return base + state + fixed + reference


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--text-encoders", action="store_true", help="count T5 + CLIP (not precomputed)")
    args = parser.parse_args(argv)
    params, lora = parameter_counts(args.lora_rank)
    print(f"FLUX.1 Kontext transformer: {params / 1e9:.3f} B parameters; LoRA r {args.lora_rank}: {lora / 1e6:.1f} M "
          f"({100 * lora / params:.2f}%)")
    print(f"per-GPU GB without activations ({'with' if args.text_encoders else 'without'} text encoders on the GPU)\n")
    rows = []
    header = "| setup | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in args.gpus) + " |"
    print(header)
    print("| --- |" + " --- |" * len(args.gpus))
    for full in (False, True):
        for strategy in ("ddp", "fsdp2") if full else STRATEGIES:
            for eightbit in (False, True):
                label = (f"{'full FT' if full else f'LoRA r{args.lora_rank}'}, {STRATEGIES[strategy]}, "
                         f"{'8-bit' if eightbit else 'fp32'} AdamW")
                values = [per_gpu_bytes(params, params if full else lora, n, full=full, strategy=strategy,
                                        eightbit=eightbit, text_encoders=args.text_encoders,
                                        reference_copy=False) / GB for n in args.gpus]
                rows.append({"setup": label, **{str(n): v for n, v in zip(args.gpus, values)}})
                print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    print("\nfull fine-tuning with kl_beta > 0 adds a frozen fp32 reference copy: under FSDP2 "
          f"{4 * params / GB:.1f} GB / number of shards per GPU; without sharding it stays in CPU memory")
    return rows


if __name__ == "__main__":
    main()
