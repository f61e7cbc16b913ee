"""Seconds, memory and achieved TFLOP/s of DivRL's rollout and training steps on the full-size FLUX.1 Kontext
transformer, with **random weights** built from the real configuration on the meta device (no download), and the
speed levers of ``divrl.policy.compute`` compared side by side.

What one DivRL step does on one GPU, timed part by part with ``torch.cuda.synchronize``:

- **rollout**: ``G`` samples of one condition, ``num_steps`` SDE steps at ``resolution``², the transformer called on
  ``rollout_micro_batch`` samples at a time (the VAE decode is not timed: it is the same in every setting);
- **training**: one micro-batch of ``micro_batch`` samples × one timestep: forward with gradients through the LoRA
  adapter (r 64 / α 128 on DivRL's targets), the GRPO loss, backward. A DivRL update accumulates
  ``micro_batches × trained_steps`` of these. ``--full-finetune`` trains every transformer weight instead (bf16
  weights and gradients here, so the 12B model fits one GPU; training keeps fp32 master weights sharded by FSDP2, see
  benchmarks/memory_model.py); its backward also computes the weight gradients, about 3× the forward FLOPs instead
  of 2×.
- **on-policy check**: each training micro-batch recomputes the log-probabilities of transitions the rollout
  recorded; ``max_ratio_dev`` is the largest ``|r − 1|`` (0 when both phases run one compute path).

The levers (``policy.*`` settings of a run): ``lora_compute_dtype`` (bf16 adapter matmuls, fp32 master weights),
``compile`` (each FLUX block compiled), ``gradient_checkpointing`` (``none | full | selective``), ``tf32`` and
``attention_backend`` (diffusers'; flash-attn 3 or 2 when installed). ``--compare`` runs, in one process on one
model: today's path (fp32 adapter compute, eager, full checkpointing, no TF32, SDPA), then each lever alone on top of
it, then all of them together, and prints one table. ``--profile`` prints the top 20 kernels (by self time) of one
rollout transformer call and one training micro-batch.

Conditions are random tensors of the real shapes (T5 ``128 × 4096``, CLIP pooled 768, packed reference latents),
as with precomputed shards (``policy.text_encoders: false``). FLOPs are counted analytically (matmuls of every
block and the attention scores; see :func:`divrl.policy.flops.transformer_flops`) and MFU is relative to ``--peak-tflops``
(H100 SXM dense bf16: 989; the H200 has the same compute).

Usage::

    python benchmarks/gpu_step.py --compare --json out.json   # every lever, full size, on CUDA
    python benchmarks/gpu_step.py --lora-compute-dtype bfloat16 --compile --gradient-checkpointing selective
    python benchmarks/gpu_step.py --profile
    python benchmarks/gpu_step.py --full-finetune --gradient-checkpointing full
    python benchmarks/gpu_step.py --smoke              # a tiny configuration on CPU (what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from divrl.policy.flops import FLUX_TRANSFORMER_CONFIG as FLUX_TRANSFORMER
from divrl.policy.flops import FLUX_VAE_CONFIG as FLUX_VAE
from divrl.policy.flops import transformer_flops

SMOKE_TRANSFORMER = dict(
    FLUX_TRANSFORMER,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)
SMOKE_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)


@dataclass(frozen=True)
class Levers:
    """One setting of the speed levers (the ``policy.*`` fields of the same names)."""

    lora_compute_dtype: str = "float32"
    compile: bool = False
    gradient_checkpointing: str = "full"
    tf32: bool = False
    attention_backend: str = "native"


TODAY = Levers()
"""The path before the levers existed: fp32 adapter compute on the bf16 base, eager, full checkpointing, no TF32."""


def installed_flash_backend() -> str | None:
    """diffusers' name of the fastest flash attention installed (flash-attn 3, then 2), or ``None``."""
    import importlib.util

    if importlib.util.find_spec("flash_attn_interface"):
        return "_flash_3"
    if importlib.util.find_spec("flash_attn"):
        return "flash"
    return None


def comparison(device: str) -> dict[str, Levers]:
    """Today's path, each lever alone on top of it, then all together."""
    flash = installed_flash_backend() if device.startswith("cuda") else None
    fast = dict(
        lora_compute_dtype="bfloat16",
        compile=True,
        gradient_checkpointing="selective",
        tf32=True,
        attention_backend=flash or "native",
    )
    settings = {
        "today": TODAY,
        "lora-bf16": replace(TODAY, lora_compute_dtype="bfloat16"),
        "compile": replace(TODAY, compile=True),
        "selective": replace(TODAY, gradient_checkpointing="selective"),
        "no-checkpointing": replace(TODAY, gradient_checkpointing="none"),
        "tf32": replace(TODAY, tf32=True),
    }
    if flash:
        settings[flash.strip("_")] = replace(TODAY, attention_backend=flash)
    settings["all"] = Levers(**fast)
    settings["all-no-checkpointing"] = Levers(**dict(fast, gradient_checkpointing="none"))
    return settings


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
    policy = KontextPolicy(
        transformer,
        vae,
        None,
        None,
        None,
        None,
        lora=lora,
        max_sequence_length=128,
        train_transformer=full,
        lora_compute_dtype="float32",
    )
    if full:
        policy.transformer.to(dtype)  # bf16 weights and gradients (fp32 master weights live sharded in training)
    return policy, config


def apply(policy, levers: Levers) -> None:
    """Put ``levers`` on the policy (any previous setting is replaced)."""
    from divrl.policy.compute import cast_lora_compute, configure_units, set_attention_backend

    if policy.lora_config is not None:
        cast_lora_compute(policy.transformer, getattr(torch, levers.lora_compute_dtype))
    configure_units(policy.shard_units(), levers.gradient_checkpointing, levers.compile)
    set_attention_backend(policy.transformer, levers.attention_backend)
    if torch.cuda.is_available():  # the legacy API, as divrl.policy.compute.enable_tf32 (inductor reads it)
        torch.set_float32_matmul_precision("high" if levers.tf32 else "highest")


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def make_condition(policy, config, args):
    device, res, text_len = args.device, args.resolution, 32 if args.smoke else 128
    tokens = policy.num_image_tokens(res, res)
    g = torch.Generator(device=device).manual_seed(1)
    condition = policy.condition_from_precomputed(
        torch.randn(1, text_len, config["joint_attention_dim"], generator=g, device=device),
        torch.randn(1, config["pooled_projection_dim"], generator=g, device=device),
        torch.randn(1, tokens, config["in_channels"], generator=g, device=device),
        res,
        res,
        group_size=args.group_size,
    )
    return condition, transformer_flops(config, tokens, tokens, text_len)


def measure(policy, config, args) -> dict[str, float]:
    """Time one rollout and training micro-batches with the policy as it is configured now."""
    from divrl.grpo import grpo_loss, rollout, transition_log_prob
    from divrl.policy.compute import compile_seconds

    device = args.device
    condition, flops_call = make_condition(policy, config, args)
    results: dict[str, float] = {
        "image_tokens": policy.num_image_tokens(args.resolution, args.resolution),
        "gflops_per_sample_forward": flops_call / 1e9,
    }
    compiling = compile_seconds()

    def do_rollout():
        return rollout(
            policy,
            condition,
            num_steps=args.num_steps,
            noise_level=0.9,
            generator=torch.Generator().manual_seed(0),
            micro_batch_size=args.rollout_micro_batch,
            decode=False,
        )

    with torch.no_grad():
        do_rollout()  # warm-up (compilation, kernels, allocator)
    reset_peak(device)
    trajectory, seconds = timed(do_rollout, device)
    results["rollout_s"] = seconds
    results["rollout_step_s"] = seconds / args.num_steps
    results["rollout_tflops"] = flops_call * args.group_size * args.num_steps / seconds / 1e12
    results["rollout_peak_gb"] = peak_gb(device)

    index = torch.arange(args.micro_batch, device=device)
    advantages = torch.randn(args.micro_batch, device=device)
    deviation = [0.0]

    def train_once(step: int):
        out = transition_log_prob(policy, trajectory, step, condition, index)
        old = trajectory.log_probs[index, step]
        deviation[0] = max(deviation[0], (out.log_prob.detach() - old).exp().sub(1).abs().max().item())
        loss, _ = grpo_loss(out.log_prob, old, advantages, 1e-4)
        loss.backward()
        return loss

    train_once(0)  # warm-up
    policy.transformer.zero_grad(set_to_none=True)
    reset_peak(device)
    times = [timed(lambda s=s: train_once(s % args.num_steps), device)[1] for s in range(args.train_repeats)]
    policy.transformer.zero_grad(set_to_none=True)
    seconds = sorted(times)[len(times) // 2]
    results["train_microbatch_timestep_s"] = seconds
    # forward + backward of the activations (2x the forward FLOPs); full fine-tuning adds the weight gradients (3x)
    results["train_tflops"] = (3 if args.full_finetune else 2) * flops_call * args.micro_batch / seconds / 1e12
    results["train_peak_gb"] = peak_gb(device)
    trained_steps = max(1, int(args.num_steps * 0.99))
    micro_batches = -(-args.group_size // args.micro_batch)
    results["update_s"] = seconds * trained_steps * micro_batches
    results["trajectory_group_s"] = results["rollout_s"] + results["update_s"]
    results["trajectory_s"] = results["trajectory_group_s"] / args.group_size
    for key in ("rollout_tflops", "train_tflops"):
        results[key.replace("tflops", "mfu")] = results[key] / args.peak_tflops
    results["max_ratio_dev"] = deviation[0]
    results["compile_s"] = compile_seconds() - compiling
    results["trainable_params_m"] = sum(p.numel() for p in policy.trainable_parameters()) / 1e6
    results["transformer_params_b"] = sum(p.numel() for p in policy.transformer.parameters()) / 1e9
    return {k: v for k, v in results.items() if v is not None}


def profile(policy, config, args) -> None:
    """The top 20 kernels by self time of one rollout transformer call and of one training micro-batch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from divrl.grpo import transition_log_prob

    condition, _ = make_condition(policy, config, args)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    rows = condition.select(torch.arange(args.rollout_micro_batch))
    x = policy.initial_noise(rows, torch.Generator(device=args.device).manual_seed(0))
    from divrl.grpo import rollout

    trajectory = rollout(
        policy,
        condition.select(torch.arange(args.micro_batch)),
        num_steps=args.num_steps,
        noise_level=0.9,
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    phases = {
        "rollout transformer call": lambda: torch.no_grad()(policy.velocity)(x, 0.5, rows),
        "training micro-batch": lambda: (
            transition_log_prob(policy, trajectory, 0, condition.select(torch.arange(args.micro_batch)))
            .log_prob.sum()
            .backward()
        ),
    }
    for name, fn in phases.items():
        fn()  # warm-up
        with torch_profile(activities=activities) as prof:
            timed(fn, args.device)
        print(f"\n== {name}: top 20 kernels by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=20))
        policy.transformer.zero_grad(set_to_none=True)


COLUMNS = [
    ("rollout_s", "rollout s"),
    ("rollout_tflops", "TFLOP/s"),
    ("rollout_mfu", "MFU"),
    ("rollout_peak_gb", "peak GB"),
    ("train_microbatch_timestep_s", "train s"),
    ("train_tflops", "TFLOP/s"),
    ("train_mfu", "MFU"),
    ("train_peak_gb", "peak GB"),
    ("trajectory_s", "s/trajectory"),
    ("max_ratio_dev", "max|r-1|"),
    ("compile_s", "compile s"),
]


def print_table(rows: dict[str, dict[str, float]]) -> None:
    width = max(map(len, rows)) + 2
    print("setting".ljust(width) + "".join(f"{title:>13s}" for _, title in COLUMNS))
    for name, result in rows.items():
        cells = [result.get(key) for key, _ in COLUMNS]
        print(name.ljust(width) + "".join(f"{'-' if v is None else f'{v:.4g}':>13s}" for v in cells))


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default=None, help="cuda (default) or cpu (say it: the full model on a CPU takes ~48 GB and hours)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (CPU-fast), for tests")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=21)
    parser.add_argument("--num-steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=3)
    parser.add_argument("--rollout-micro-batch", type=int, default=7)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--train-repeats", type=int, default=5)
    parser.add_argument("--lora-compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="compile each FLUX block")
    parser.add_argument(
        "--gradient-checkpointing", nargs="?", const="full", default="none", choices=["none", "full", "selective"]
    )
    parser.add_argument("--tf32", action="store_true", help="TF32 for float32 matmuls on CUDA")
    parser.add_argument("--attention-backend", default="native", help="diffusers' attention backend")
    parser.add_argument(
        "--compare",
        nargs="*",
        metavar="SETTING",
        default=None,
        help="compare today's path, each lever and all together (or the named settings)",
    )
    parser.add_argument("--profile", action="store_true", help="print the top 20 kernels of each phase")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--full-finetune", action="store_true", help="train every transformer weight, not a LoRA")
    parser.add_argument(
        "--sdpa-backends",
        nargs="+",
        default=["flash", "efficient", "math"],
        help="attention kernels allowed (training's default leaves cuDNN out)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    args = parser.parse_args(argv)
    if args.device is None:
        if torch.cuda.is_available():
            args.device = "cuda"
        elif args.smoke:
            args.device = "cpu"
        else:
            parser.exit(
                2,
                "gpu_step.py: no CUDA GPU here. The full-size model needs one (on a CPU it would build "
                "11.9B float32 weights, ~48 GB); pass --smoke for the tiny CPU configuration, or "
                "--device cpu if you mean it\n",
            )
    if args.smoke:
        args.resolution, args.group_size, args.rollout_micro_batch, args.train_repeats = 32, 4, 2, 2
    return args


def main(argv=None):
    from divrl.policy.base import sdpa_context

    args = parse(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    policy, config = build_policy(args.smoke, args.device, dtype, args.lora_rank, full=args.full_finetune)
    single = Levers(
        args.lora_compute_dtype, args.compile, args.gradient_checkpointing, args.tf32, args.attention_backend
    )
    with sdpa_context(args.sdpa_backends):  # the kernels training uses
        if args.compare is None:
            apply(policy, single)
            if args.profile:
                profile(policy, config, args)
            results = measure(policy, config, args)
            width = max(map(len, results))
            for key, value in results.items():
                print(f"{key:{width}s}  {value:.4g}")
            out = results
        else:
            settings = comparison(args.device)
            unknown = sorted(set(args.compare) - set(settings))
            if unknown:
                sys.exit(f"gpu_step.py --compare: unknown settings {unknown}; choose from {list(settings)}")
            out = {}
            for name, levers in settings.items():
                if args.compare and name not in args.compare:
                    continue
                apply(policy, levers)
                out[name] = {**asdict(levers), **measure(policy, config, args)}
                print(f"{name}: {out[name]}", flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print_table(out)
            if args.profile:
                apply(policy, settings["all"])
                profile(policy, config, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
