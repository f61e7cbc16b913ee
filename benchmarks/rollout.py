"""Rollout overhead: divrl's deterministic rollout vs the family's diffusers pipeline, side by side.

``--family kontext`` (default): ``FluxKontextPipeline``; ``--family klein``: ``Flux2KleinPipeline`` with
classifier-free guidance (scale 4, the base models' default), where divrl's rollout is also timed with the two halves
of CFG batched into one transformer call (``policy.cfg_batched``); ``--family qwen``: ``QwenImageEditPlusPipeline``
with true CFG (scale 4). Both run the same tiny components, reference,
prompt, seed, steps and guidance, end to end
(prompt encoding, reference VAE encoding, noise, the denoising loop, VAE decoding). Caches are cleared before every
divrl run so it pays for encoding too. The ratio shows what our log-prob bookkeeping costs (goal <= 1.05). Then a
stochastic rollout (noise level 0.9) is broken down per step: transformer, SDE step (sampling + log-prob), and
the rest (bookkeeping). Last, the on-policy check: the training path's log-prob of every recorded transition,
recomputed for the whole batch and for micro-batches of 1, gives ratio exp(logp - logp_old) = 1 up to the printed
deviation (in the chosen dtype; exactly 1 is expected when the kernels do not depend on the batch size).

Run:  python benchmarks/rollout.py [--family kontext|klein|qwen] [--size 64] [--group 4] [--steps 6] [--repeats 7]
                                  [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import divrl.grpo.sampler as sampler_module
from divrl.examples import draw_subject
from divrl.grpo import rollout, transition_log_prob
from divrl.policy import KontextPolicy

PROMPT = "a photo of the star toy on the beach"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kontext(args):
    """FLUX.1 Kontext: the policy, divrl's and the pipeline's end-to-end generation, and a condition."""
    policy = KontextPolicy.tiny(seed=0, base_dtype=args.dtype).to(args.device)
    pipe = policy.pipeline()
    reference = draw_subject(args.size)[0].unsqueeze(0)
    h = w = args.size

    def ours():
        policy.clear_caches()
        condition = policy.condition(reference, PROMPT, h, w, guidance=2.5, group_size=args.group)
        return rollout(
            policy, condition, num_steps=args.steps, noise_level=0.0, generator=torch.Generator().manual_seed(0)
        ).images

    def theirs():
        return pipe(
            image=reference,
            prompt=PROMPT,
            height=h,
            width=w,
            num_inference_steps=args.steps,
            guidance_scale=2.5,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            max_area=h * w,
            _auto_resize=False,
            max_sequence_length=policy.max_sequence_length,
            num_images_per_prompt=args.group,
        ).images

    return (
        policy,
        ours,
        theirs,
        lambda: policy.condition(reference, PROMPT, h, w, guidance=2.5, group_size=args.group),
        "FluxKontextPipeline",
    )


def klein(args):
    """FLUX.2 [klein] with CFG (scale 4): the same, for ``Flux2KleinPipeline`` (references of at least 64 px)."""
    from divrl.images import to_pil
    from divrl.policy.flux2 import Flux2KleinPolicy
    from divrl.policy.flux2.tiny import TINY_TEXT_LAYERS

    policy = Flux2KleinPolicy.tiny(seed=0, base_dtype=args.dtype, guidance_scale=4.0).to(args.device)
    pipe = policy.pipeline()
    reference = to_pil(draw_subject(args.size)[0])
    h = w = args.size

    def ours():
        policy.clear_caches()
        condition = policy.condition([[reference]], [PROMPT], h, w, group_size=args.group)
        return rollout(
            policy, condition, num_steps=args.steps, noise_level=0.0, generator=torch.Generator().manual_seed(0)
        ).images

    def theirs():
        return pipe(
            image=[reference],
            prompt=PROMPT,
            height=h,
            width=w,
            num_inference_steps=args.steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            text_encoder_out_layers=TINY_TEXT_LAYERS,
            max_sequence_length=policy.max_sequence_length,
            num_images_per_prompt=args.group,
        ).images

    return (
        policy,
        ours,
        theirs,
        lambda: policy.condition([[reference]], [PROMPT], h, w, group_size=args.group),
        "Flux2KleinPipeline",
    )


def qwen(args):
    """Qwen-Image-Edit-Plus with true CFG (scale 4, negative prompt " "): the same, for ``QwenImageEditPlusPipeline``,
    whose reference sizes (module constants, ~384² and ~1024²) are set to the policy's (the generated size)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    from divrl.images import to_pil
    from divrl.policy.qwen_image import QwenEditPolicy

    area = args.size * args.size
    edit_plus.CONDITION_IMAGE_SIZE = edit_plus.VAE_IMAGE_SIZE = area
    policy = QwenEditPolicy.tiny(
        seed=0, base_dtype=args.dtype, true_cfg_scale=4.0, condition_image_size=area, vae_image_size=area
    ).to(args.device)
    pipe = policy.pipeline()
    reference = to_pil(draw_subject(args.size)[0])
    h = w = args.size

    def ours():
        policy.clear_caches()
        condition = policy.condition([[reference]], [PROMPT], h, w, group_size=args.group)
        return rollout(
            policy, condition, num_steps=args.steps, noise_level=0.0, generator=torch.Generator().manual_seed(0)
        ).images

    def theirs():
        return pipe(
            image=[reference],
            prompt=PROMPT,
            negative_prompt=" ",
            true_cfg_scale=4.0,
            height=h,
            width=w,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            num_images_per_prompt=args.group,
        ).images

    return (
        policy,
        ours,
        theirs,
        lambda: policy.condition([[reference]], [PROMPT], h, w, group_size=args.group),
        "QwenImageEditPlusPipeline",
    )


FAMILIES = {"kontext": kontext, "klein": klein, "qwen": qwen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="kontext")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="frozen base dtype (bfloat16 on GPUs); default float32")
    args = parser.parse_args()

    policy, ours, theirs, condition_of, pipeline_name = FAMILIES[args.family](args)
    with torch.no_grad():
        difference = (ours().cpu() - theirs().cpu()).abs().max().item()
        assert difference < (1e-4 if args.dtype in (None, "float32") else 5e-2), f"outputs differ by {difference}"
        variants = [("divrl", ours), ("diffusers", theirs)]
        if hasattr(policy, "cfg_batched"):  # klein: also CFG's two halves as one batched transformer call

            def batched():
                policy.cfg_batched = True
                try:
                    return ours()
                finally:
                    policy.cfg_batched = False

            variants.append(("divrl, CFG batched", batched))
        times = {name: [] for name, _ in variants}
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits every variant alike
            for name, fn in variants:
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["divrl"]), statistics.median(times["diffusers"])
    h = w = args.size
    print(
        f"tiny {args.family}, {h}x{w}, G={args.group}, {args.steps} steps, device={args.device}, "
        f"dtype={policy.dtype}, median of {args.repeats}; max |image difference| {difference:.2e}"
    )
    print(f"  diffusers {pipeline_name + ':':<22s} {theirs_s * 1e3:8.2f} ms")
    print(f"  divrl rollout (noise level 0):   {ours_s * 1e3:8.2f} ms   ratio {ours_s / theirs_s:.3f} (goal <= 1.05)")
    if "divrl, CFG batched" in times:
        batched_s = statistics.median(times["divrl, CFG batched"])
        print(
            f"  divrl rollout, CFG batched:      {batched_s * 1e3:8.2f} ms   ratio {batched_s / theirs_s:.3f}; one "
            f"batched call vs two calls: {batched_s / ours_s:.3f}x the time"
        )

    # Per-step breakdown of a stochastic rollout.
    spent = {"transformer": 0.0, "sde_step": 0.0}
    velocity, sde_step = policy.velocity, sampler_module.sde_step

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(args.device)
            start = time.perf_counter()
            out = fn(*a, **k)
            sync(args.device)
            spent[name] += time.perf_counter() - start
            return out

        return wrapper

    condition = condition_of()
    policy.velocity = timed("transformer", velocity)
    sampler_module.sde_step = timed("sde_step", sde_step)
    try:
        totals = []
        for _ in range(args.repeats):
            spent.update(transformer=0.0, sde_step=0.0)
            sync(args.device)
            start = time.perf_counter()
            rollout(
                policy,
                condition,
                num_steps=args.steps,
                noise_level=0.9,
                generator=torch.Generator().manual_seed(0),
                decode=False,
            )
            sync(args.device)
            totals.append((time.perf_counter() - start, dict(spent)))
    finally:
        del policy.velocity
        sampler_module.sde_step = sde_step
    total, parts = sorted(totals, key=lambda t: t[0])[len(totals) // 2]
    rest = total - parts["transformer"] - parts["sde_step"]
    print(f"stochastic rollout (noise 0.9, no decode), per step of {args.steps}:")
    for name, value in (
        ("transformer", parts["transformer"]),
        ("sde_step (sample + log-prob)", parts["sde_step"]),
        ("bookkeeping", rest),
    ):
        print(f"  {name:<30s} {value / args.steps * 1e3:8.3f} ms  ({100 * value / total:5.1f}%)")

    traj = rollout(
        policy,
        condition,
        num_steps=args.steps,
        noise_level=0.9,
        generator=torch.Generator().manual_seed(1),
        decode=False,
    )
    deviation = {"whole batch": 0.0, "micro-batches of 1": 0.0}
    with torch.no_grad():
        for step in range(args.steps - 1):
            whole = transition_log_prob(policy, traj, step, condition).log_prob
            deviation["whole batch"] = max(
                deviation["whole batch"], (whole - traj.log_probs[:, step]).exp().sub(1).abs().max().item()
            )
            for k in range(args.group):
                one = transition_log_prob(policy, traj, step, condition, index=[k]).log_prob
                deviation["micro-batches of 1"] = max(
                    deviation["micro-batches of 1"], abs((one - traj.log_probs[k, step]).exp().item() - 1)
                )
    print(
        "on-policy ratio, max |r - 1| over the trained steps: "
        + ", ".join(f"{k} {v:.2e}" for k, v in deviation.items())
    )


if __name__ == "__main__":
    main()
