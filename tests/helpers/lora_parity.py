"""An exported LoRA in diffusers' own pipeline against the policy that trained it."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxKontextPipeline

from divrl.grpo import rollout
from divrl.policy import KontextConfig
from divrl.policy.tiny import tiny_kontext_components

ROOT = Path(__file__).resolve().parents[2]


def base_pipeline(config: KontextConfig) -> FluxKontextPipeline:
    """diffusers' ``FluxKontextPipeline`` of ``config.model`` (the tiny random one for ``tiny``), float32."""
    if config.model == "tiny":
        pipe = FluxKontextPipeline(**tiny_kontext_components(config.tiny_seed))
    else:
        pipe = FluxKontextPipeline.from_pretrained(ROOT / config.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_lora_reproduced_by_diffusers(config: KontextConfig, lora: Path, prompt: str, min_change: float) -> None:
    """Load ``lora`` into diffusers' pipeline and into ``config``'s policy: the adapter changes diffusers' latents (by
    more than ``min_change``), and a deterministic 4-step sample of one 32 × 32 reference equals ours to 1e-5."""
    pipe = base_pipeline(config)
    ref = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        image=ref,
        prompt=prompt,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=2.5,
        output_type="latent",
        max_area=32 * 32,
        _auto_resize=False,
        max_sequence_length=32,
    )
    base = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe.load_lora_weights(lora)
    tuned = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert (tuned - base).abs().max() > min_change

    policy = config.build()
    policy.load_lora(lora)
    condition = policy.condition(ref, prompt, 32, 32)
    ours = rollout(
        policy, condition, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(1), decode=False
    ).latents[:, -1]
    assert torch.allclose(ours, tuned, atol=1e-5)
