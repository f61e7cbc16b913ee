"""KontextPolicy and the rollout against diffusers' own FluxKontextPipeline, on tiny offline components."""

import pytest
import torch
from diffusers import FluxKontextPipeline

from divrl.examples import draw_subject
from divrl.grpo import kl_divergence
from divrl.grpo.sampler import rollout, transition_log_prob
from divrl.policy import KontextPolicy, LoRAConfig, ModelLoadError
from divrl.policy.tiny import tiny_kontext_components

PROMPT = "a photo of the red star toy on the beach"


def reference(size_h, size_w):
    image, _ = draw_subject(size=max(size_h, size_w))
    return image[:, :size_h, :size_w].unsqueeze(0).contiguous()


def pipeline_latents(pipe, ref, prompt, height, width, steps, seed, group):
    return pipe(
        image=ref,
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        max_area=height * width,
        _auto_resize=False,
        max_sequence_length=32,
        num_images_per_prompt=group,
    ).images


@pytest.fixture(scope="module")
def tiny_policy():
    return KontextPolicy.tiny(seed=0)


@pytest.mark.parametrize("steps", [2, 6])
@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 80)])
def test_ode_rollout_matches_diffusers_pipeline(steps, height, width):
    components = tiny_kontext_components(seed=0)
    pipe = FluxKontextPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    policy = KontextPolicy.from_pipeline(pipe, lora=None, max_sequence_length=32)
    ref = reference(height, width)
    expected = pipeline_latents(pipe, ref, PROMPT, height, width, steps, seed=3, group=2)
    condition = policy.condition(ref, PROMPT, height, width, guidance=2.5, group_size=2)
    traj = rollout(
        policy, condition, num_steps=steps, noise_level=0.0, generator=torch.Generator().manual_seed(3), decode=False
    )
    assert traj.latents.shape == (2, steps + 1, *expected.shape[1:])
    assert torch.allclose(traj.latents[:, -1], expected, atol=1e-5, rtol=0)
    assert (traj.latents[:, -1] - expected).abs().max() < 1e-5
    assert torch.equal(traj.log_probs, torch.zeros(2, steps))


def test_decoded_images_match_pipeline_and_adapter_starts_neutral(tiny_policy):
    height = width = 64
    ref = reference(height, width)
    pipe = tiny_policy.pipeline()  # the adapter (fresh: B = 0) is active in it
    expected = pipe(
        image=ref,
        prompt=PROMPT,
        height=height,
        width=width,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_area=height * width,
        _auto_resize=False,
        max_sequence_length=32,
    ).images
    condition = tiny_policy.condition(ref, PROMPT, height, width)
    traj = rollout(tiny_policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert traj.images.shape == (1, 3, height, width)
    assert torch.allclose(traj.images, expected, atol=1e-5)
    with tiny_policy.adapter_disabled():
        base = rollout(tiny_policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(base.latents, traj.latents)  # gaussian init: B = 0, the adapter changes nothing yet


def test_batch_of_conditions_equals_separate_runs(tiny_policy):
    refs = [reference(32, 32), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    prompts = [PROMPT, "a sketch of a blue robot in the snow"]
    condition = tiny_policy.condition(refs, prompts, 32, 32, group_size=2)
    assert condition.batch_size == 4
    gens = [torch.Generator().manual_seed(10 + k) for k in range(4)]
    traj = rollout(tiny_policy, condition, num_steps=3, noise_level=0.7, generator=gens, decode=False)
    for c in range(2):
        single = tiny_policy.condition(refs[c], prompts[c], 32, 32, group_size=2)
        one = rollout(
            tiny_policy,
            single,
            num_steps=3,
            noise_level=0.7,
            generator=[torch.Generator().manual_seed(10 + 2 * c + k) for k in range(2)],
            decode=False,
        )
        assert torch.allclose(one.latents, traj.latents[2 * c : 2 * c + 2], atol=1e-5)
        assert torch.allclose(one.log_probs, traj.log_probs[2 * c : 2 * c + 2], atol=1e-5)
    micro = rollout(
        tiny_policy,
        condition,
        num_steps=3,
        noise_level=0.7,
        decode=False,
        generator=[torch.Generator().manual_seed(10 + k) for k in range(4)],
        micro_batch_size=3,
    )
    assert torch.allclose(micro.latents, traj.latents, atol=1e-5)


def test_on_policy_ratio_is_one_and_fresh_kl_is_zero(tiny_policy):
    condition = tiny_policy.condition(reference(32, 32), PROMPT, 32, 32, group_size=3)
    traj = rollout(
        tiny_policy, condition, num_steps=4, noise_level=0.9, generator=torch.Generator().manual_seed(0), decode=False
    )
    assert (traj.log_probs != 0).all()
    for step in range(4):
        out = transition_log_prob(tiny_policy, traj, step, condition)
        ratio = torch.exp(out.log_prob - traj.log_probs[:, step])
        assert (ratio - 1).abs().max().item() < 1e-6
        assert out.log_prob.requires_grad  # the training path carries gradients to the adapter
        part = transition_log_prob(tiny_policy, traj, step, condition, index=[2, 0])
        assert (torch.exp(part.log_prob - traj.log_probs[[2, 0], step]) - 1).abs().max().item() < 1e-6
        with torch.no_grad(), tiny_policy.adapter_disabled():
            ref_out = transition_log_prob(tiny_policy, traj, step, condition)
        assert torch.equal(kl_divergence(out.mean.detach(), ref_out.mean, out.std), torch.zeros(3))


def test_ode_step_cannot_be_trained(tiny_policy):
    condition = tiny_policy.condition(reference(32, 32), PROMPT, 32, 32)
    traj = rollout(tiny_policy, condition, num_steps=3, noise_level=0.9, sde_steps=[True, False, True], decode=False)
    assert traj.log_probs[:, 1].eq(0).all() and traj.log_probs[:, 0].ne(0).all()
    with pytest.raises(ValueError, match="deterministic"):
        transition_log_prob(tiny_policy, traj, 1, condition)


def test_lora_targets_dtypes_and_prompt_cache(tiny_policy):
    names = [n for n, p in tiny_policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in tiny_policy.trainable_parameters())
    targeted = {n.split(".lora_")[0].split("transformer_blocks.0.")[-1] for n in names}
    for target in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.0.proj", "proj_mlp"):
        assert any(t.endswith(target) for t in targeted), target
    frozen = [p for n, p in tiny_policy.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen)
    embeds, pooled, _ = tiny_policy.encode_prompts([PROMPT, "a dog", PROMPT])
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    assert list(tiny_policy.encoder.prompts)[-2:] == ["a dog", PROMPT]


def test_prompt_cache_smaller_than_a_call_still_encodes_every_prompt():
    small = KontextPolicy.tiny(seed=0, prompt_cache_size=2)
    prompts = ["a dog", "a cat", "a red star", "a dog"]
    small.encode_prompts(["a dog"])  # cached, then evicted while this call's new prompts are cached
    embeds, _, _ = small.encode_prompts(prompts)
    fresh = KontextPolicy.tiny(seed=0, prompt_cache_size=16).encode_prompts(prompts)[0]
    assert torch.equal(embeds, fresh) and len(small.encoder.prompts) == 2
    assert list(small.encoder.prompts) == ["a red star", "a dog"]


def test_saved_pipeline_loads_through_from_pretrained(tmp_path):
    components = tiny_kontext_components(seed=5)
    FluxKontextPipeline(**components).save_pretrained(tmp_path / "tiny-kontext")
    loaded = KontextPolicy.from_pretrained(
        tmp_path / "tiny-kontext", torch_dtype=None, max_sequence_length=32, lora=LoRAConfig(rank=4, alpha=8)
    )
    direct = KontextPolicy(**components, lora=None, max_sequence_length=32)
    ref = reference(32, 32)
    runs = []
    for policy in (loaded, direct):
        condition = policy.condition(ref, PROMPT, 32, 32)
        runs.append(
            rollout(
                policy,
                condition,
                num_steps=2,
                noise_level=0.0,
                generator=torch.Generator().manual_seed(0),
                decode=False,
            ).latents
        )
    assert torch.allclose(runs[0], runs[1], atol=1e-6)


def test_load_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        KontextPolicy.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        KontextPolicy.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="hf download"):
        KontextPolicy.from_pretrained("divrl-tests/no-such-model", local_files_only=True)

    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=401)
        raise GatedRepoError("401 Client Error: access to this model is restricted", response=response)

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", gated)
    with pytest.raises(ModelLoadError, match="hf auth login"):
        KontextPolicy.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev")


def test_saved_lora_loads_in_diffusers_and_reproduces_the_policy(tmp_path):
    policy = KontextPolicy.tiny(seed=1)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    path = policy.save_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    from safetensors.torch import load_file

    keys = list(load_file(path))
    assert keys and all(k.startswith("transformer.") and "lora_" in k for k in keys)

    pipe = FluxKontextPipeline(**tiny_kontext_components(seed=1))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    ref = reference(32, 32)
    expected = pipeline_latents(pipe, ref, PROMPT, 32, 32, steps=3, seed=0, group=1)
    condition = policy.condition(ref, PROMPT, 32, 32)
    traj = rollout(
        policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0), decode=False
    )
    assert torch.allclose(traj.latents[:, -1], expected, atol=1e-5)
    with policy.adapter_disabled():
        base = rollout(
            policy, condition, num_steps=3, noise_level=0.0, generator=torch.Generator().manual_seed(0), decode=False
        )
    assert (base.latents[:, -1] - expected).abs().max() > 1e-3  # the adapter really changed the model


def test_bad_sizes_and_mismatches(tiny_policy):
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_policy.condition(reference(32, 32), PROMPT, 30, 32)
    with pytest.raises(ValueError, match="2 references for 1 prompts"):
        tiny_policy.condition([reference(32, 32), reference(32, 32)], [PROMPT], 32, 32)


def test_a_missing_relative_model_folder_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model folder 'data/demo/tiny-kontext' does not exist \(relative paths"):
        KontextPolicy.from_pretrained("data/demo/tiny-kontext")


@pytest.mark.parametrize("overrides", [{}, {"max_shift": 1.5, "base_shift": 0.3}, {"shift_terminal": 0.05}])
def test_sigmas_follow_the_models_own_scheduler_config(overrides):
    """The sampler's sigmas are the loaded model's: its scheduler config, not FLUX's constants, sets the shift (here
    checked against diffusers' scheduler built from the same config, as FluxKontextPipeline uses it)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from divrl.policy.tiny import FLUX_SCHEDULER_CONFIG

    components = tiny_kontext_components(seed=0)
    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER_CONFIG, **overrides})
    assert all(scheduler.config[k] == v for k, v in overrides.items())
    policy = KontextPolicy(**{**components, "scheduler": scheduler}, lora=None, max_sequence_length=32)
    condition = policy.condition(reference(64, 48), PROMPT, 64, 48)
    c = scheduler.config
    mu = calculate_shift(condition.num_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    assert torch.equal(policy.sigmas(6, condition), scheduler.sigmas)
    default = KontextPolicy(**tiny_kontext_components(seed=0), lora=None, max_sequence_length=32)
    assert torch.equal(default.sigmas(6, condition), policy.sigmas(6, condition)) == (not overrides)


def test_a_scheduler_config_the_schedule_does_not_reproduce_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from divrl.policy.tiny import FLUX_SCHEDULER_CONFIG

    components = tiny_kontext_components(seed=0)
    for change, match in (
        ({"use_dynamic_shifting": False}, "use_dynamic_shifting"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ):
        scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER_CONFIG, **change})
        policy = KontextPolicy(**{**components, "scheduler": scheduler}, lora=None, max_sequence_length=32)
        with pytest.raises(ValueError, match=match):
            policy.sigmas(4, policy.condition(reference(32, 32), PROMPT, 32, 32))
