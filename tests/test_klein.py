"""FLUX.2 [klein] behind the Policy seam, against diffusers' own ``Flux2KleinPipeline`` on tiny offline components:
the rollout with 1 and 3 references, with and without classifier-free guidance; the on-policy ratio and the KL under
CFG; the LoRA export loaded by the pipeline; loading from a saved folder; and the family's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline

from divrl.examples import draw_subject
from divrl.grpo import kl_divergence
from divrl.grpo.sampler import rollout, transition_log_prob
from divrl.grpo.sde import sde_step
from divrl.images import to_pil
from divrl.policy import KontextPolicy, LoRAConfig, ModelLoadError
from divrl.policy.flux2 import KLEIN_LORA_TARGETS, Flux2KleinConfig, Flux2KleinPolicy, klein_flops
from divrl.policy.flux2.tiny import TINY_TEXT_LAYERS, tiny_klein_components
from divrl.policy.tiny import tiny_kontext_components

PROMPT = "a photo of the red star toy on the beach"


def references(count: int, size: int = 64) -> list:
    """``count`` different subject photos (PIL), each ``size``² (the pipeline refuses references under 64 px)."""
    photos = []
    for i in range(count):
        image, _ = draw_subject(size=size)
        photos.append(to_pil(image.roll(shifts=7 * i, dims=-1) * (1 - 0.2 * i)))
    return photos


def pipeline_trajectory(pipe, images, scale: float, steps: int, seed: int, group: int, size: int = 64):
    """The pipeline's packed latents after each step, and its decoded images in [0, 1]."""
    seen = []

    def keep(_pipe, _i, _t, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    images_out = pipe(
        prompt=PROMPT,
        image=images,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(seed),
        num_images_per_prompt=group,
        text_encoder_out_layers=TINY_TEXT_LAYERS,
        max_sequence_length=32,
        output_type="pt",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    return torch.stack(seen, dim=1), images_out


def policy_of(pipe, **kwargs) -> Flux2KleinPolicy:
    kwargs.setdefault("lora", None)
    return Flux2KleinPolicy.from_pipeline(
        pipe, max_sequence_length=32, text_encoder_out_layers=TINY_TEXT_LAYERS, **kwargs
    )


@pytest.fixture(scope="module")
def tiny():
    return Flux2KleinPolicy.tiny(seed=0, guidance_scale=4.0)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ode_rollout_matches_the_pipeline(count, scale):
    pipe = Flux2KleinPipeline(**tiny_klein_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    images = references(count)
    expected, decoded = pipeline_trajectory(pipe, images, scale, steps=4, seed=3, group=2)
    policy = policy_of(pipe, guidance_scale=scale)
    condition = policy.condition([images], [PROMPT], 64, 64, group_size=2)
    assert condition.num_references == count and (condition.negative_prompt_embeds is not None) == (scale > 1)
    traj = rollout(policy, condition, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(3))
    assert (traj.latents[:, 1:] - expected).abs().max() < 1e-5  # every step, float32 rounding
    assert (traj.images - decoded).abs().max() < 1e-5
    assert torch.equal(traj.log_probs, torch.zeros(2, 4))


def test_reference_positions_follow_the_pipeline():
    policy = Flux2KleinPolicy.tiny(seed=0, lora=None, guidance_scale=1.0)
    condition = policy.condition([references(3, 32)], [PROMPT], 32, 32)
    tokens = condition.num_tokens
    assert condition.img_ids.shape == (4 * tokens, 4)
    assert condition.img_ids[:tokens, 0].eq(0).all()  # the generated image: time 0
    for i in range(3):  # reference i: time 10·(i + 1), its rows and columns from 0
        block = condition.img_ids[tokens * (i + 1) : tokens * (i + 2)]
        assert block[:, 0].eq(10 * (i + 1)).all() and torch.equal(block[:, 1:], condition.img_ids[:tokens, 1:])


def test_batched_cfg_gives_the_two_call_velocity(tiny):
    condition = tiny.condition([references(2, 32)] * 2, [PROMPT, "a dog in the snow"], 32, 32, group_size=2)
    latents = tiny.initial_noise(condition, torch.Generator().manual_seed(0))
    with torch.no_grad():
        two = tiny.velocity(latents, 0.7, condition)
        tiny.cfg_batched = True
        try:
            one = tiny.velocity(latents, 0.7, condition)
        finally:
            tiny.cfg_batched = False
    assert (one - two).abs().max() < 1e-5 and not torch.equal(two, torch.zeros_like(two))


def transformer_velocity(policy, latents, sigma, condition, text) -> torch.Tensor:
    """One plain transformer call as the pipeline makes it (reference tokens appended, output cut)."""
    hidden = torch.cat([latents, condition.image_latents], dim=1)
    timestep = torch.full((len(latents),), sigma * 1000, dtype=torch.float32) / 1000
    out = policy.transformer(
        hidden_states=hidden,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states=text,
        txt_ids=condition.text_ids,
        img_ids=condition.img_ids,
        return_dict=False,
    )[0]
    return out[:, : latents.shape[1]]


def test_on_policy_ratio_is_one_with_cfg_and_the_kl_is_computed_from_the_guided_velocities():
    policy = Flux2KleinPolicy.tiny(seed=0, guidance_scale=4.0)
    condition = policy.condition([references(2, 32)], [PROMPT], 32, 32, group_size=3)
    traj = rollout(
        policy, condition, num_steps=3, noise_level=0.9, generator=torch.Generator().manual_seed(0), decode=False
    )
    for step in range(3):
        out = transition_log_prob(policy, traj, step, condition)
        assert (torch.exp(out.log_prob - traj.log_probs[:, step]) - 1).abs().max() <= 1e-6
        with torch.no_grad(), policy.adapter_disabled():
            reference = transition_log_prob(policy, traj, step, condition)
        assert torch.equal(kl_divergence(out.mean.detach(), reference.mean, out.std), torch.zeros(3))
    with torch.no_grad():  # move the adapter: the KL is now the guided velocities' difference through the SDE mean
        for name, parameter in policy.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        sigmas, x = policy.sigmas(3, condition).tolist(), traj.latents[:, 1]

        def guided() -> torch.Tensor:  # neg + s·(pos − neg), from two plain transformer calls
            pos = transformer_velocity(policy, x, sigmas[1], condition, condition.prompt_embeds)
            neg = transformer_velocity(policy, x, sigmas[1], condition, condition.negative_prompt_embeds)
            return neg + 4.0 * (pos - neg)

        moved = guided()
        with policy.adapter_disabled():
            initial = guided()
        mine, base = (
            sde_step(v, x, sigmas[1], sigmas[2], 0.9, sigma_max=sigmas[1], prev_sample=traj.latents[:, 2])
            for v in (moved, initial)
        )
        by_hand = ((mine.mean.double() - base.mean.double()) ** 2 / (2 * mine.std.double() ** 2)).mean(dim=(1, 2))
        out = transition_log_prob(policy, traj, 1, condition)
        with policy.adapter_disabled():
            reference = transition_log_prob(policy, traj, 1, condition)
        kl = kl_divergence(out.mean, reference.mean, out.std)
    assert (by_hand > 1e-6).all() and torch.allclose(kl.double(), by_hand, rtol=1e-4, atol=0)


def test_a_trained_lora_loads_in_the_pipeline_with_the_same_samples(tmp_path):
    policy = Flux2KleinPolicy.tiny(seed=0, guidance_scale=4.0, max_sequence_length=32)
    images = references(2)
    condition = policy.condition([images], [PROMPT], 64, 64)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    noise = policy.initial_noise(condition, torch.Generator().manual_seed(1))
    for _ in range(2):  # two updates
        optimizer.zero_grad()
        policy.velocity(noise, 0.8, condition).square().mean().backward()
        optimizer.step()
    policy.save_lora(tmp_path / "lora")
    pipe = Flux2KleinPipeline(**tiny_klein_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    expected, _ = pipeline_trajectory(pipe, images, 4.0, steps=3, seed=5, group=1)
    traj = rollout(
        policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(5), decode=False
    )
    with policy.adapter_disabled():
        base = rollout(
            policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(5), decode=False
        )
    assert (traj.latents[:, 1:] - expected).abs().max() < 1e-5
    assert (base.latents[:, -1] - expected[:, -1]).abs().max() > 1e-3  # the adapter moved: not a vacuous match


def test_default_lora_targets_cover_both_block_kinds(tiny):
    adapted = {name.split(".lora_A")[0] for name, _ in tiny.transformer.named_parameters() if ".lora_A" in name}
    assert adapted == {
        *(f"transformer_blocks.0.{t}" for t in KLEIN_LORA_TARGETS[:12]),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    }
    assert all(p.dtype == torch.float32 and p.requires_grad for p in tiny.trainable_parameters())


def test_a_saved_klein_loads_through_the_config(tmp_path):
    folder = tmp_path / "tiny-klein"
    Flux2KleinPipeline(**tiny_klein_components(seed=2)).save_pretrained(folder)
    config = Flux2KleinConfig(
        model=str(folder),
        torch_dtype="float32",
        guidance_scale=2.0,
        max_sequence_length=32,
        text_encoder_out_layers=TINY_TEXT_LAYERS,
        lora=LoRAConfig(rank=2, alpha=2.0),
    )
    loaded = config.build()
    built = Flux2KleinPolicy.tiny(seed=2, guidance_scale=2.0, lora=LoRAConfig(rank=2, alpha=2.0))
    condition = built.condition([references(1, 32)], [PROMPT], 32, 32)
    noise = built.initial_noise(condition, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            loaded.velocity(noise, 0.5, loaded.condition([references(1, 32)], [PROMPT], 32, 32)),
            built.velocity(noise, 0.5, condition),
        )
    with pytest.raises(ValueError, match=r"text_encoder_out_layers \[9, 18, 27\]: the text encoder of .* has 4 layers"):
        Flux2KleinConfig(model=str(folder), lora=None).build()


def test_another_familys_folder_is_refused_by_name(tmp_path):
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline(**tiny_kontext_components(seed=0)).save_pretrained(tmp_path / "kontext")
    Flux2KleinPipeline(**tiny_klein_components(seed=0)).save_pretrained(tmp_path / "klein")
    with pytest.raises(
        ModelLoadError,
        match=r"is a FluxKontextPipeline folder \(FLUX.1 Kontext\), and this config "
        r"trains FLUX.2 \[klein\].*class_path: divrl.policy.KontextConfig",
    ):
        Flux2KleinConfig(model=str(tmp_path / "kontext")).build()
    with pytest.raises(
        ModelLoadError,
        match=r"is a Flux2KleinPipeline folder \(FLUX.2 \[klein\]\).*class_path: "
        r"divrl.policy.flux2.Flux2KleinConfig",
    ):
        KontextPolicy.from_pretrained(tmp_path / "klein")


def test_a_distilled_model_refuses_guidance(tmp_path):
    Flux2KleinPipeline(**tiny_klein_components(seed=0), is_distilled=True).save_pretrained(tmp_path / "distilled")
    config = dict(model=str(tmp_path / "distilled"), text_encoder_out_layers=TINY_TEXT_LAYERS, lora=None)
    with pytest.raises(
        ValueError,
        match=r"policy.guidance_scale 4.0: .*distilled is step-distilled .* set "
        r"policy.guidance_scale: 1",
    ):
        Flux2KleinConfig(**config).build()
    policy = Flux2KleinConfig(**config, guidance_scale=1.0).build()
    assert (
        policy.is_distilled and policy.condition([references(1, 32)], [PROMPT], 32, 32).negative_prompt_embeds is None
    )
    assert json.loads((tmp_path / "distilled" / "model_index.json").read_text())["is_distilled"] is True


def test_a_batch_mixing_reference_counts_is_refused(tiny):
    with pytest.raises(ValueError, match=r"the prompts of one batch have \[1, 2\] references"):
        tiny.condition([references(1, 32), references(2, 32)], [PROMPT, PROMPT], 32, 32)


def test_flops_count_the_real_matmuls_and_cfg_counts_twice(tiny):
    """The analytic count equals every block's Linear FLOPs, measured by hooks, plus the attention term (QKᵀ and PV:
    ``2·2·T²·h`` per block), as the FLUX.1 count is checked (tests/test_gpu_benchmark.py)."""
    from torch import nn

    condition = tiny.condition([references(2, 32)], [PROMPT], 32, 32)
    latents = tiny.initial_noise(condition, torch.Generator().manual_seed(0))
    counted = []

    def hook(module, inputs, output):
        counted.append(2 * inputs[0].numel() // module.in_features * module.in_features * module.out_features)

    handles = [
        module.register_forward_hook(hook)
        for name, module in tiny.transformer.named_modules()
        if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and isinstance(module, nn.Linear)
        and "lora_" not in name
    ]
    try:
        with torch.no_grad(), tiny.adapter_disabled():
            transformer_velocity(tiny, latents, 0.5, condition, condition.prompt_embeds)
    finally:
        for handle in handles:
            handle.remove()
    config, text = tiny.transformer.config, condition.prompt_embeds.shape[1]
    h = config["attention_head_dim"] * config["num_attention_heads"]
    total = condition.num_tokens + condition.image_latents.shape[1] + text
    attention = (config["num_layers"] + config["num_single_layers"]) * 4 * total * total * h
    counted_flops = klein_flops(config, condition.num_tokens, condition.image_latents.shape[1], text)
    assert sum(counted) + attention == counted_flops
    assert tiny.flops_per_call(condition) == 2 * counted_flops  # CFG: two calls per velocity


def test_a_shifted_timestep_distribution_needs_its_shift_on_klein(tiny):
    from divrl.objectives.flow import TimestepSampling, draw

    condition = tiny.condition([references(1, 32)], [PROMPT], 32, 32)
    like = torch.zeros(2, condition.num_tokens, 16)
    with pytest.raises(ValueError, match=r"depends on the step count .* give objective.timesteps.shift"):
        draw(
            TimestepSampling(distribution="shifted"),
            2,
            1,
            like,
            torch.Generator().manual_seed(0),
            policy=tiny,
            condition=condition,
        )
    _, sigmas = draw(
        TimestepSampling(distribution="shifted", shift=3.0),
        2,
        1,
        like,
        torch.Generator().manual_seed(0),
        policy=tiny,
        condition=condition,
    )
    plain = TimestepSampling(distribution="uniform").sample(2, torch.Generator().manual_seed(0))
    assert torch.allclose(sigmas.flatten(), 3 * plain / (1 + 2 * plain))  # the given shift, applied


def test_review_fixes_targets_guards_and_batches(tiny):
    """Targets that name no adaptable layer are still refused; a distilled policy refuses guidance per call too;
    full fine-tuning refuses float16 autocast; a (B, 3, H, W) batch is one reference per prompt, as for Kontext."""
    with pytest.raises(ValueError, match=r"target_modules \['ff'\] match no Linear layer"):
        Flux2KleinPolicy.tiny(seed=0, lora=LoRAConfig(rank=2, alpha=2.0, target_modules=("attn.to_q", "ff")))
    distilled = Flux2KleinPolicy.tiny(seed=0, lora=None, guidance_scale=1.0, is_distilled=True)
    with pytest.raises(ValueError, match="is step-distilled and takes no classifier-free guidance"):
        distilled.condition([references(1, 32)], [PROMPT], 32, 32, guidance_scale=4.0)
    with pytest.raises(ValueError, match="full fine-tuning under float16 autocast"):
        Flux2KleinPolicy.tiny(seed=0, lora=None, train_transformer=True, lora_compute_dtype="float16")
    batch = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    together = tiny.condition(batch, [PROMPT, "a dog"], 32, 32)
    apart = tiny.condition([batch[1]], ["a dog"], 32, 32)
    assert together.batch_size == 2 and torch.equal(together.image_latents[1:], apart.image_latents)
    assert Flux2KleinConfig().lora.target_modules == KLEIN_LORA_TARGETS  # recorded in the run's settings as trained


def test_shards_precomputed_for_kontext_are_encoded_live_or_refused_without_encoders():
    from divrl.data.stream import ConditionSample

    policy = Flux2KleinPolicy.tiny(seed=0, guidance_scale=2.0)
    photo = references(1, 32)[0]
    kontext_payload = {"model": "tiny", "resolution": 32, "prompt_embeds": torch.zeros(1, 4, 8)}
    sample = ConditionSample(
        id="dog", prompt=PROMPT, references=[photo], masks=[None], conditioning=kontext_payload, prompt_index=0
    )
    live = policy.encode([sample], 32, 32)
    expected = policy.condition([[photo]], [PROMPT], 32, 32)
    assert torch.equal(live.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(live.image_latents, expected.image_latents)
    policy.drop_encoders()
    with pytest.raises(ValueError, match="made for another model family .* not FLUX.2 klein: set policy.text_encoders"):
        policy.encode([sample], 32, 32)


def test_the_cards_snippet_says_where_the_pipeline_cannot_read_the_reference_as_divrl_does():
    """klein's pipeline refuses references under 64 pixels a side and shrinks those above 1024² pixels, where divrl
    reads the reference at the sample's size: the snippet then keeps the photo as it is, and the card says why."""
    config = Flux2KleinConfig(model="tiny")
    assert config.pipeline_differences(512, 512) == [] and "resize(pixels, 512, 768)" in config.pipeline_reference(
        512, 768
    )
    assert config.pipeline_reference(32, 32) is None
    assert "refuses references under 64 pixels" in config.pipeline_differences(32, 32)[0]
    assert "shrinks references above 1048576 pixels" in config.pipeline_differences(1024, 1536)[0]
    gated = Flux2KleinConfig(model="tiny", reference_window=(0.3, 0.6)).pipeline_differences(512, 512)
    assert gated == ["policy.reference_window [0.3, 0.6] (identity gating) is divrl's own sampler's"]
