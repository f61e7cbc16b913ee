"""Seconds, memory and achieved TFLOP/s of DivRL's rollout and training steps on the full-size FLUX.1 Kontext
transformer, with **random weights** built from the real configuration on the meta device (no download).

What one DivRL step does on one GPU, timed part by part with ``torch.cuda.synchronize``:

- **rollout**: ``G`` samples of one condition, ``num_steps`` SDE steps at ``resolution``², the transformer called on
  ``rollout_micro_batch`` samples at a time, then the VAE decode (random FLUX VAE);
- **training**: one micro-batch of ``micro_batch`` samples × one timestep: forward with gradients through the LoRA
  adapter (r 64 / α 128 on DivRL's targets), the GRPO loss, backward. A DivRL update accumulates
  ``micro_batches × trained_steps`` of these. ``--full-finetune`` trains every transformer weight instead (bf16
  weights and gradients here, so the 12B model fits one 80 GB GPU with ``--gradient-checkpointing``; training keeps
  fp32 master weights sharded by FSDP2, see benchmarks/memory_model.py); its backward also computes the weight
  gradients, about 3× the forward FLOPs instead of 2×.

Conditions are random tensors of the real shapes (T5 ``128 × 4096``, CLIP pooled 768, packed reference latents),
as with precomputed shards (``policy.text_encoders: false``). FLOPs are counted analytically (matmuls of every
block and the attention scores; see :func:`divrl.policy.flops.transformer_flops`) and MFU is relative to ``--peak-tflops``
(H100 SXM dense bf16: 989).

Usage::

    python benchmarks/gpu_step.py                      # full size on CUDA
    python benchmarks/gpu_step.py --gradient-checkpointing
    python benchmarks/gpu_step.py --full-finetune --gradient-checkpointing
    python benchmarks/gpu_step.py --smoke              # a tiny configuration on CPU (what the test suite runs)
"""

from __future__ import annotations

import argparse
import time

import torch

from divrl.policy.flops import FLUX_TRANSFORMER_CONFIG as FLUX_TRANSFORMER
from divrl.policy.flops import FLUX_VAE_CONFIG as FLUX_VAE
from divrl.policy.flops import transformer_flops

SMOKE_TRANSFORMER = dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                         axes_dims_rope=(4, 6, 6))
SMOKE_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)


def build_policy(smoke: bool, device: str, dtype: torch.dtype, lora_rank: int, full: bool = False):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from divrl.policy import KontextPolicy, LoRAConfig

    config = SMOKE_TRANSFORMER if smoke else FLUX_TRANSFORMER
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    transformer = transformer.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02, generator=generator)
            else:
                p.zero_() if "bias" in name else p.fill_(1.0)
        for buffer in transformer.buffers():
            buffer.zero_()
    vae = AutoencoderKL(**(SMOKE_VAE if smoke else FLUX_VAE)).to(device=device, dtype=dtype)
    lora = None if full else LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank)
    policy = KontextPolicy(transformer, vae, None, None, None, None, lora=lora, max_sequence_length=128,
                           train_transformer=full)
    if full:
        policy.transformer.to(dtype)  # bf16 weights and gradients (fp32 master weights live sharded in training)
    return policy, config


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run(args) -> dict[str, float]:
    from divrl.grpo import grpo_loss, rollout, transition_log_prob

    device, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    policy, config = build_policy(args.smoke, device, dtype, args.lora_rank, full=args.full_finetune)
    if args.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    res, text_len = args.resolution, 32 if args.smoke else 128
    tokens = policy.num_image_tokens(res, res)
    g = torch.Generator(device=device).manual_seed(1)
    condition = policy.condition_from_precomputed(
        torch.randn(1, text_len, config["joint_attention_dim"], generator=g, device=device),
        torch.randn(1, config["pooled_projection_dim"], generator=g, device=device),
        torch.randn(1, tokens, config["in_channels"], generator=g, device=device), res, res, group_size=args.group_size,
    )
    flops_call = transformer_flops(config, tokens, tokens, text_len)
    results: dict[str, float] = {"image_tokens": tokens, "gflops_per_sample_forward": flops_call / 1e9}

    def do_rollout():
        return rollout(policy, condition, num_steps=args.num_steps, noise_level=0.9,
                       generator=torch.Generator().manual_seed(0), micro_batch_size=args.rollout_micro_batch)

    with torch.no_grad():
        do_rollout() if not args.smoke else None  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trajectory, seconds = timed(do_rollout, device)
    results["rollout_s"] = seconds
    results["rollout_step_s"] = seconds / args.num_steps
    results["rollout_tflops"] = flops_call * args.group_size * args.num_steps / seconds / 1e12
    if device.startswith("cuda"):
        results["rollout_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9

    index = torch.arange(args.micro_batch, device=device)
    advantages = torch.randn(args.micro_batch, device=device)

    def train_once(step: int):
        out = transition_log_prob(policy, trajectory, step, condition, index)
        loss, _ = grpo_loss(out.log_prob, trajectory.log_probs[index, step], advantages, 1e-4)
        loss.backward()
        return loss

    train_once(0)  # warm-up
    policy.transformer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [timed(lambda: train_once(s % args.num_steps), device)[1] for s in range(args.train_repeats)]
    seconds = sorted(times)[len(times) // 2]
    results["train_microbatch_timestep_s"] = seconds
    # forward + backward of the activations (2x the forward FLOPs); full fine-tuning adds the weight gradients (3x)
    results["train_tflops"] = (3 if args.full_finetune else 2) * flops_call * args.micro_batch / seconds / 1e12
    if device.startswith("cuda"):
        results["train_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    trained_steps = max(1, int(args.num_steps * 0.99))
    micro_batches = -(-args.group_size // args.micro_batch)
    results["update_s"] = seconds * trained_steps * micro_batches
    results["trajectory_group_s"] = results["rollout_s"] + results["update_s"]
    for key in ("rollout_tflops", "train_tflops"):
        results[key.replace("tflops", "mfu")] = results[key] / args.peak_tflops
    results["trainable_params_m"] = sum(p.numel() for p in policy.trainable_parameters()) / 1e6
    results["transformer_params_b"] = sum(p.numel() for p in policy.transformer.parameters()) / 1e9
    return results


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (CPU-fast), for tests")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=21)
    parser.add_argument("--num-steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=3)
    parser.add_argument("--rollout-micro-batch", type=int, default=7)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--full-finetune", action="store_true", help="train every transformer weight, not a LoRA")
    parser.add_argument("--sdpa-backends", nargs="+", default=["flash", "efficient", "math"],
                        help="attention kernels allowed (training's default leaves cuDNN out)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolution, args.group_size, args.rollout_micro_batch, args.train_repeats = 32, 4, 2, 2
    from divrl.policy.base import sdpa_context

    with sdpa_context(args.sdpa_backends):  # the kernels training uses
        results = run(args)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:{width}s}  {value:.4g}")
    return results


if __name__ == "__main__":
    main()
