"""Qwen-Image-Edit-Plus behind the Policy seam, against diffusers' own ``QwenImageEditPlusPipeline`` on tiny offline
components: the rollout with 1 and 2 references, with and without true CFG; the on-policy ratio and the KL under CFG;
the LoRA export loaded by the pipeline; loading from a saved folder; and the family's refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPlusPipeline

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
from divrl.examples import draw_subject
from divrl.grpo.sampler import rollout
from divrl.images import to_pil
from divrl.policy.qwen_image import QWEN_EDIT_LORA_TARGETS, QwenEditConfig, QwenEditPolicy
from divrl.policy.qwen_image.tiny import tiny_qwen_edit_components

PROMPT = "a photo of the red star toy on the beach"
AREA = 32 * 32  # the tiny policy's reference areas (condition and VAE): the pipeline's constants are set to them


def references(count: int, size: int = 48) -> list:
    """``count`` different subject photos (PIL), each ``size``²."""
    photos = []
    for i in range(count):
        image, _ = draw_subject(size=size)
        photos.append(to_pil(image.roll(shifts=7 * i, dims=-1) * (1 - 0.2 * i)))
    return photos


@pytest.fixture
def small_references(monkeypatch):
    """The pipeline reads references at the tiny policy's areas (its module constants; ~384² and ~1024² otherwise)."""
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", AREA)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", AREA)


def pipeline_trajectory(pipe, images, scale: float, steps: int, seed: int, group: int, size: int = 32):
    """The pipeline's packed latents after each step, and its decoded images in [0, 1]."""
    seen = []

    def keep(_pipe, _i, _t, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    images_out = pipe(prompt=PROMPT, image=images, negative_prompt=" " if scale > 1 else None, true_cfg_scale=scale,
                      height=size, width=size, num_inference_steps=steps, num_images_per_prompt=group,
                      generator=torch.Generator().manual_seed(seed), output_type="pt", callback_on_step_end=keep,
                      callback_on_step_end_tensor_inputs=["latents"]).images
    return torch.stack(seen, dim=1), images_out


def policy_of(pipe, **kwargs) -> QwenEditPolicy:
    kwargs.setdefault("lora", None)
    return QwenEditPolicy.from_pipeline(pipe, condition_image_size=AREA, vae_image_size=AREA, **kwargs)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ode_rollout_matches_the_pipeline(small_references, count, scale):
    pipe = QwenImageEditPlusPipeline(**tiny_qwen_edit_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    images = references(count)
    expected, decoded = pipeline_trajectory(pipe, images, scale, steps=4, seed=3, group=2)
    policy = policy_of(pipe, true_cfg_scale=scale)
    condition = policy.condition([images], [PROMPT], 32, 32, group_size=2)
    assert condition.num_references == count and (condition.negative_prompt_embeds is not None) == (scale > 1)
    traj = rollout(policy, condition, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(3))
    assert (traj.latents[:, 1:] - expected).abs().max() < 1e-5  # every step, float32 rounding
    assert (traj.images - decoded).abs().max() < 1e-5
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))
