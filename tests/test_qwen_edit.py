"""Qwen-Image-Edit-Plus behind the Policy seam, against diffusers' own ``QwenImageEditPlusPipeline`` on tiny offline
components: the rollout with 1 and 2 references, with and without true CFG; the on-policy ratio and the KL under CFG;
the LoRA export loaded by the pipeline; loading from a saved folder; and the family's refusals."""

from __future__ import annotations

import json

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline

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

    images_out = pipe(
        prompt=PROMPT,
        image=images,
        negative_prompt=" " if scale > 1 else None,
        true_cfg_scale=scale,
        height=size,
        width=size,
        num_inference_steps=steps,
        num_images_per_prompt=group,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
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


def test_non_square_references_and_output_at_other_areas_match_the_pipeline(monkeypatch):
    """References of other aspect ratios read at different areas by the VL encoder (32²) and the VAE (64²), a
    non-square output, and 2511's ``zero_cond_t`` transformer: still the pipeline's trajectory."""
    from diffusers import QwenImageTransformer2DModel
    from PIL import Image

    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    components = tiny_qwen_edit_components(seed=1)
    torch.manual_seed(5)
    components["transformer"] = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
        zero_cond_t=True,
    ).eval()
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    images = [
        references(1, 96)[0].resize((96, 48)),
        Image.fromarray((torch.rand(80, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()),
    ]
    seen = []
    pipe(
        prompt=PROMPT,
        image=images,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=32,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(2),
        output_type="pt",
        callback_on_step_end=lambda _p, _i, _t, tensors: seen.append(tensors["latents"].clone()) or {},
        callback_on_step_end_tensor_inputs=["latents"],
    )
    policy = QwenEditPolicy.from_pipeline(pipe, lora=None, condition_image_size=32 * 32, vae_image_size=64 * 64)
    condition = policy.condition([images], [PROMPT], 32, 64)
    assert condition.img_shapes == [(1, 8, 16), (1, 8, 24), (1, 24, 8)]  # output 32x64; references 96x32, 32x96 px
    traj = rollout(
        policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(2), decode=False
    )
    assert (traj.latents[:, 1:] - torch.stack(seen, dim=1)).abs().max() < 1e-5


def transformer_velocity(policy, latents, sigma, condition, text, mask=None) -> torch.Tensor:
    """One plain transformer call as the pipeline makes it (reference tokens appended, output cut)."""
    hidden = torch.cat([latents, condition.image_latents], dim=1)
    timestep = torch.full((len(latents),), sigma * 1000, dtype=torch.float32) / 1000
    out = policy.transformer(
        hidden_states=hidden,
        timestep=timestep,
        guidance=None,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        img_shapes=[condition.img_shapes] * len(latents),
        return_dict=False,
    )[0]
    return out[:, : latents.shape[1]]


def test_on_policy_ratio_is_one_with_cfg_and_the_kl_is_computed_from_the_guided_velocities():
    from divrl.grpo import kl_divergence
    from divrl.grpo.sampler import transition_log_prob
    from divrl.grpo.sde import sde_step

    policy = QwenEditPolicy.tiny(seed=0, true_cfg_scale=4.0)
    condition = policy.condition([references(2)], [PROMPT], 32, 32, group_size=3)
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

        def guided() -> torch.Tensor:  # neg + s·(pos − neg), rescaled per token to the conditional norm, by hand
            pos = transformer_velocity(policy, x, sigmas[1], condition, condition.prompt_embeds)
            neg = transformer_velocity(policy, x, sigmas[1], condition, condition.negative_prompt_embeds)
            mixed = neg + 4.0 * (pos - neg)
            return mixed * pos.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True)

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


def test_a_trained_lora_loads_in_the_pipeline_with_the_same_samples(small_references, tmp_path):
    policy = QwenEditPolicy.tiny(seed=0, true_cfg_scale=4.0)
    images = references(2)
    condition = policy.condition([images], [PROMPT], 32, 32)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    noise = policy.initial_noise(condition, torch.Generator().manual_seed(1))
    for _ in range(2):  # two updates
        optimizer.zero_grad()
        policy.velocity(noise, 0.8, condition).square().mean().backward()
        optimizer.step()
    policy.save_lora(tmp_path / "lora")
    pipe = QwenImageEditPlusPipeline(**tiny_qwen_edit_components(seed=0))
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


def test_default_lora_targets_cover_both_streams_and_flops_count_both_cfg_calls():
    from divrl.policy import LoRAConfig

    policy = QwenEditPolicy.tiny(seed=0, lora=LoRAConfig(rank=2, alpha=2.0))  # FLUX.1's default names → the family's
    adapted = {name.split(".lora_A")[0] for name, _ in policy.transformer.named_parameters() if ".lora_A" in name}
    assert adapted == {f"transformer_blocks.{b}.{t}" for b in range(2) for t in QWEN_EDIT_LORA_TARGETS}
    assert len(policy.shard_units()) == 2 and policy.frozen_parts() == [policy.vae, policy.text_encoder]
    with_cfg = policy.condition([references(1)], [PROMPT], 32, 32)
    without = policy.condition([references(1)], [PROMPT], 32, 32, true_cfg_scale=1.0)
    h, layers = 16, 2  # the tiny transformer: 2 heads of 8, 2 blocks
    text, negative = with_cfg.prompt_embeds.shape[1], with_cfg.negative_prompt_embeds.shape[1]

    def by_hand(t: int) -> float:  # image + reference tokens (64 + 64), text t; per block both streams + attention
        return layers * (2 * 128 * 12 * h * h + 2 * t * 12 * h * h + 4 * (128 + t) ** 2 * h)

    assert policy.flops_per_call(without) == by_hand(text)
    assert policy.flops_per_call(with_cfg) == by_hand(text) + by_hand(negative)


def test_a_saved_model_loads_through_the_config_in_the_released_format(tmp_path):
    from divrl.policy import LoRAConfig
    from divrl.policy.qwen_image.builder import save_pipeline

    folder = tmp_path / "tiny-qwen-edit"
    save_pipeline(QwenImageEditPlusPipeline(**tiny_qwen_edit_components(seed=2)), folder)
    assert json.loads((folder / "model_index.json").read_text())["processor"] == ["transformers", "Qwen2VLProcessor"]
    config = QwenEditConfig(
        model=str(folder),
        torch_dtype="float32",
        true_cfg_scale=2.0,
        condition_image_size=AREA,
        vae_image_size=AREA,
        lora=LoRAConfig(rank=2, alpha=2.0),
    )
    loaded = config.build()
    built = QwenEditPolicy.tiny(seed=2, true_cfg_scale=2.0, lora=LoRAConfig(rank=2, alpha=2.0))
    condition = built.condition([references(2)], [PROMPT], 32, 32)
    again = loaded.condition([references(2)], [PROMPT], 32, 32)
    assert torch.equal(again.prompt_embeds, condition.prompt_embeds)  # tokenizer, processor and VL encoder round-trip
    noise = built.initial_noise(condition, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.velocity(noise, 0.5, again), built.velocity(noise, 0.5, condition))


def test_another_familys_folder_is_refused_by_name(tmp_path):
    from diffusers import FluxKontextPipeline

    from divrl.policy import KontextConfig, ModelLoadError
    from divrl.policy.qwen_image.builder import save_pipeline
    from divrl.policy.tiny import tiny_kontext_components

    FluxKontextPipeline(**tiny_kontext_components(seed=0)).save_pretrained(tmp_path / "kontext")
    save_pipeline(QwenImageEditPlusPipeline(**tiny_qwen_edit_components(seed=0)), tmp_path / "qwen")
    with pytest.raises(
        ModelLoadError,
        match=r"is a FluxKontextPipeline folder \(FLUX.1 Kontext\), and this config "
        r"trains Qwen-Image-Edit-Plus.*class_path: divrl.policy.KontextConfig",
    ):
        QwenEditConfig(model=str(tmp_path / "kontext"), lora=None).build()
    with pytest.raises(
        ModelLoadError,
        match=r"is a QwenImageEditPlusPipeline folder \(Qwen-Image-Edit-Plus\).*"
        r"class_path: divrl.policy.qwen_image.QwenEditConfig",
    ):
        KontextConfig(model=str(tmp_path / "qwen"), lora=None).build()
    with pytest.raises(ValueError, match=r"policy.true_cfg_scale must be a finite number >= 0"):
        QwenEditConfig(model="tiny", true_cfg_scale=float("nan"))
    with pytest.raises(ValueError, match=r"policy.vae_image_size must be a pixel area >= 1024"):
        QwenEditConfig(model="tiny", vae_image_size=16)


def test_precomputed_conditioning_equals_encoding_at_run_time(tmp_path):
    """The payload (prompts read with their references, the negative prompt's, the references' latents and grids)
    through `divrl data`'s shard writer and reader gives the conditions the encoders compute, with the encoders
    dropped; another family's payload is refused without them."""
    import dataclasses

    from divrl.data import converters as C
    from divrl.data.schema import IdentityRecord
    from divrl.data.stream import SkipCounter, read_identities, to_condition
    from divrl.policy.loading import family_config
    from divrl.policy.qwen_image.builder import save_pipeline

    policy = QwenEditPolicy.tiny(seed=0, true_cfg_scale=3.0)
    record = IdentityRecord(
        id="pair", references=references(2), masks=[None, None], prompts=[PROMPT, "both of them in the snow"]
    )
    C.convert([record], tmp_path / "shards", resolution=48, precompute=C.Precompute(policy, 32))
    (stored,) = list(read_identities(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), SkipCounter(5)))
    payload = stored.conditioning
    assert payload["family"] == "qwen-image-edit" and payload["image_shapes"] == [[1, 8, 8], [1, 8, 8]]
    samples = [to_condition(stored, i) for i in (0, 1)]
    live = policy.encode([dataclasses.replace(s, conditioning=None) for s in samples], 32, 32, group_size=2)
    lean = QwenEditPolicy.tiny(seed=0, true_cfg_scale=3.0).drop_encoders()
    read = lean.encode(samples, 32, 32, group_size=2)
    for name in ("prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_mask", "image_latents"):
        a, b = getattr(live, name), getattr(read, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert read.img_shapes == live.img_shapes and read.prompt_mask is not None  # two prompt lengths: padded, masked
    with pytest.raises(ValueError, match=r"made for another model family \(flux2-klein\), not Qwen-Image-Edit"):
        lean.encode([dataclasses.replace(samples[0], conditioning={"family": "flux2-klein"})], 32, 32)
    other_area = QwenEditPolicy.tiny(seed=0, true_cfg_scale=3.0, vae_image_size=64 * 64)  # encoders loaded
    with pytest.raises(
        ValueError,
        match=r"has \{'vae_image_size': 1024\}, this run needs .*'vae_image_size': 4096.*"
        r"or drop the precomputed entries",
    ):
        other_area.encode(samples, 32, 32)
    save_pipeline(QwenImageEditPlusPipeline(**tiny_qwen_edit_components(seed=0)), tmp_path / "qwen")
    assert family_config(tmp_path / "qwen") is QwenEditConfig  # `divrl data --precompute FOLDER` builds this family
    processor = json.loads((tmp_path / "qwen/processor/processor_config.json").read_text())
    assert processor.get("processor_class", "Qwen2VLProcessor") == "Qwen2VLProcessor"  # as the released folders


def test_a_batch_of_prompts_of_different_lengths_gives_each_row_its_own_velocity():
    """Shorter prompts are padded and masked (as the pipeline stacks prompts): each row's guided velocity is the one
    its condition gives alone."""
    policy = QwenEditPolicy.tiny(seed=0, true_cfg_scale=3.0)
    rows = [references(1), references(2)[1:]]  # each row its own reference
    prompts = [PROMPT, "a dog"]
    batch = policy.condition(rows, prompts, 32, 32)
    assert batch.prompt_mask is not None and batch.prompt_mask.sum(1).tolist()[0] > batch.prompt_mask.sum(1).tolist()[1]
    noise = policy.initial_noise(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = policy.velocity(noise, 0.6, batch)
        for row, (images, prompt) in enumerate(zip(rows, prompts)):
            alone = policy.velocity(noise[row : row + 1], 0.6, policy.condition([images], [prompt], 32, 32))
            assert (together[row : row + 1] - alone).abs().max() < 1e-5, prompt
        assert (together[0] - together[1]).abs().max() > 1e-3  # the rows differ: not a vacuous match


def test_references_of_other_aspect_ratios_in_one_batch_are_refused_and_no_encoders_are_named():
    from PIL import Image

    policy = QwenEditPolicy.tiny(seed=0, true_cfg_scale=1.0, vae_image_size=64 * 64)
    square, wide = references(1)[0], Image.new("RGB", (64, 32), (200, 30, 30))
    with pytest.raises(ValueError, match=r"latent grids .* give references of one aspect ratio per batch"):
        policy.condition([[square], [wide]], [PROMPT, PROMPT], 32, 32)
    wide_alone = policy.condition([[wide]], [PROMPT], 32, 32)  # alone it conditions, on its own grid: 96 x 32 px
    assert wide_alone.img_shapes[1] == (1, 8, 24) and policy.condition([[square]], [PROMPT], 32, 32).img_shapes[1] == (
        1,
        16,
        16,
    )
    with pytest.raises(ValueError, match=r"a 256x16 reference resized to a 4096-pixel area .* rounds to 0"):
        policy.condition([[Image.new("RGB", (256, 16))]], [PROMPT], 32, 32)
    lean = QwenEditPolicy.tiny(seed=0).drop_encoders()
    with pytest.raises(RuntimeError, match=r"must come precomputed: convert the shards with `divrl data"):
        lean.condition([[square]], [PROMPT], 32, 32)
    with pytest.raises(RuntimeError, match=r"target images .* need it: set policy.text_encoders: true"):
        lean.encode_images([square], 32, 32)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(mode):
    """The dual-stream blocks are the checkpointing units: full and selective recomputation give the gradients of no
    checkpointing; a bf16 base trains the fp32 adapter with finite gradients."""
    from divrl.policy import LoRAConfig
    from divrl.policy.compute import UnitForward

    def gradients(**settings) -> dict:
        policy = QwenEditConfig(
            model="tiny", true_cfg_scale=2.0, lora=LoRAConfig(rank=2, alpha=2.0), **settings
        ).build()
        wrapped = {isinstance(block.forward, UnitForward) for block in policy.shard_units()}
        assert wrapped == {"gradient_checkpointing" in settings}  # every dual-stream block, or none
        condition = policy.condition([references(2)], [PROMPT], 32, 32, group_size=2)
        noise = policy.initial_noise(condition, torch.Generator().manual_seed(0))
        policy.train()
        policy.velocity(noise, 0.7, condition).float().square().mean().backward()
        return {n: p.grad.float() for n, p in policy.transformer.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(), gradients(gradient_checkpointing=mode)
    assert plain.keys() == recomputed.keys() and len(plain) > len(QWEN_EDIT_LORA_TARGETS)  # the last block's text
    # stream feeds nothing: its adapters get no gradient, in every mode
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)
    assert any(v.abs().max() > 0 for v in plain.values())
    bf16 = gradients(torch_dtype="bfloat16")
    assert all(torch.isfinite(v).all() for v in bf16.values()) and any(v.abs().max() > 0 for v in bf16.values())


def test_the_time_shift_is_the_one_the_schedule_applies():
    """Without the stretch to ``shift_terminal``, the pipeline's sigmas are ``s·σ / (1 + (s − 1)·σ)`` of the uniform
    grid with ``s = time_shift``: training timesteps drawn with it land where the sampler spends its steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from divrl.policy.qwen_image.tiny import QWEN_SCHEDULER_CONFIG

    def tiny_with(**config) -> QwenEditPolicy:
        components = tiny_qwen_edit_components(seed=0)
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(**{**QWEN_SCHEDULER_CONFIG, **config})
        return QwenEditPolicy(
            **components, lora=None, true_cfg_scale=1.0, condition_image_size=AREA, vae_image_size=AREA
        )

    policy = tiny_with(shift_terminal=None)
    condition = policy.condition([references(1)], [PROMPT], 64, 64)
    s = policy.time_shift(condition)
    uniform = torch.linspace(1.0, 1 / 8, 8, dtype=torch.float64)
    assert s > 1 and torch.allclose(
        policy.sigmas(8, condition)[:-1].double(), s * uniform / (1 + (s - 1) * uniform), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"no exponential, size-dependent shift; give objective.timesteps.shift"):
        tiny_with(time_shift_type="linear").time_shift(condition)
