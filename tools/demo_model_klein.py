"""``python tools/make_demo_model.py --family klein``: ``data/demo/tiny-klein``, a tiny *pretrained* FLUX.2 [klein] that
copies its reference, the policy of ``configs/demo_klein.yaml``.

Built like the Kontext demo model (``tools/make_demo_model.py``'s docstring; the same data, the same copying
paradox, the same evaluation), with klein's classes at toy size and klein's conditioning:

1. **Components.** ``Flux2Transformer2DModel`` with 2 double-stream + 2 single-stream blocks, 2 heads of width 32 and
   4 rotary axes of 8 (time, row, column, text position; rope θ 2000 as klein); the VAE (``AutoencoderKLFlux2``) and
   the byte-level BPE Qwen tokenizer with its chat template of :func:`divrl.policy.flux2.tiny.tiny_klein_components`;
   a frozen, random ``Qwen3ForCausalLM`` of width 16 with **28 layers**, so the model is read at klein's own hidden
   layers 9, 18 and 27 (the config default: no setting differs from the real models).
2. **VAE.** Trained as an autoencoder on 32 × 32 renders (``make_demo_model.train_vae``); its batch-norm latent
   statistics (``bn.running_mean`` / ``running_var``, which the pipeline normalises the patchified latents with) are
   then set from the patchified latents of the training references, as FLUX.2's VAE carries them.
3. **Transformer.** All weights, rectified-flow matching through ``Flux2KleinPolicy.velocity`` without guidance
   (48 text tokens: the chat template makes the demo's prompts up to 43), ``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε −
   x0``, ``σ ~ U(0, 1)``; the target is the reference with probability 0.75 and the identity in another pose
   otherwise. The prompt is replaced by the empty prompt in 10 % of the batches' rows, so that the unconditional
   velocity that classifier-free guidance subtracts is one the model has learnt (the demo samples with CFG 2.0).
4. **Save and check.** ``Flux2KleinPipeline.save_pretrained`` (safetensors, float32; ``is_distilled: false``: a base
   model), reloaded with ``Flux2KleinPolicy.from_pretrained`` and measured on the reloaded model.

Measured on the 8 held-out identities, as for the Kontext model (first prompt each, ``rollout(num_steps=4, seed 0)``
at 32 × 32, the demo reward; mean over the 64 samples)::

    images                                     nSSM    VSM
    pretrained, ODE, CFG 1.0                  0.538  0.798
    pretrained, ODE, CFG 2.0                  0.530  0.785   (the demo's guidance)
    pretrained, ODE, CFG 4.0                  0.518  0.776
    pretrained, SDE 0.9, CFG 2.0              0.732  0.816
    random tiny, ODE (noise 0.0)              0.920  0.193   (Flux2KleinPolicy.tiny(): noise)
    random tiny, SDE (noise 0.9)              0.977  0.195
    truth: same identity, other pose          0.924  0.937
    truth: the reference (32 px)              0.210  0.968
    truth: the reference, VAE round trip      0.470  0.791

The klein model copies its reference as the Kontext one does (nSSM near the VAE round trip, VSM near the VAE's
ceiling). Its SDE samples at noise 0.9 are more varied than Kontext's (0.732 against 0.587): klein's schedule for 64
image tokens and 4 steps (``compute_empirical_mu``) spends more of the steps at high noise. CFG changes little here:
the prompt only names the subject the reference already shows. Run time 435 s on a 2-core CPU (VAE 145 s,
transformer 254 s); the folder is 2.1 MiB and bit-identical between runs (a rebuild under load, 1153 s, gave the same
bytes).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import make_demo_model as kontext
import torch
from torch import Tensor

from divrl.data.synthetic import random_pose
from divrl.grpo import rollout
from divrl.policy.flux2 import Flux2KleinPolicy
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor

RESOLUTION = kontext.RESOLUTION  # 32 × 32: latents 4 × 16 × 16, patchified to 8 × 8 tokens of 16 channels
MAX_SEQUENCE_LENGTH = 48  # Qwen tokens per prompt (chat template included), as in configs/demo_klein.yaml
GUIDANCE_SCALE = 2.0  # the demo's classifier-free guidance
UNCONDITIONAL_PROBABILITY = 0.1  # rows trained on the empty prompt (the CFG negative)
TEXT_LAYERS = 28  # klein reads layers 9, 18, 27


def build_components(seed: int) -> dict:
    """The tiny klein components with the demo's larger transformer and a 28-layer text encoder."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from divrl.policy.flux2.tiny import tiny_klein_components

    components = tiny_klein_components(seed)
    torch.manual_seed(seed + 10)
    components["transformer"] = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    ).eval()
    torch.manual_seed(seed + 12)
    components["text_encoder"] = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(components["tokenizer"]),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    ).eval()
    return components


@torch.no_grad()
def patchified(policy: Flux2KleinPolicy, pixels: Tensor, chunk: int = 256) -> Tensor:
    """The VAE's posterior modes of ``pixels``, patchified ``(B, 16, 8, 8)``, before the batch-norm normalisation."""
    pipe = policy.pipeline()
    return torch.cat(
        [pipe._patchify_latents(policy.vae.encode(part).latent_dist.mode()) for part in pixels.split(chunk)]
    )


def calibrate_vae(vae, latents: Tensor) -> None:
    """FLUX.2-style latent normalisation: the batch-norm statistics are the per-channel mean and variance."""
    with torch.no_grad():
        vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def pack(policy: Flux2KleinPolicy, latents: Tensor) -> Tensor:
    """Patchified latents → the normalised, packed ``(B, 64, 16)`` tokens of ``encode_reference``."""
    vae = policy.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return policy.pipeline()._pack_latents((latents - mean) / std)


@torch.no_grad()
def prompt_table(policy: Flux2KleinPolicy, prompts: list[list[str]], chunk: int = 256) -> Tensor:
    """Every prompt's embedding, ``(N, P, L, D)``."""
    flat = [p for group in prompts for p in group]
    embeds = torch.cat([policy.encoder.encode_prompts(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])
    policy.encoder.clear()
    return embeds.view(len(prompts), len(prompts[0]), *embeds.shape[1:])


@torch.no_grad()
def sample_group(policy, reference, prompt: str, noise_level: float, guidance: float, group_size: int = 8) -> Tensor:
    """``group_size`` decoded samples of one condition, as the demo's rollouts draw them, at CFG scale ``guidance``
    (klein's ``guidance_scale``, Qwen-Image-Edit's ``true_cfg_scale``: ``condition``'s fifth argument)."""
    condition = policy.condition([reference], [prompt], RESOLUTION, RESOLUTION, guidance, group_size=group_size)
    return rollout(
        policy, condition, num_steps=4, noise_level=noise_level, generator=torch.Generator().manual_seed(0)
    ).images


def evaluate(
    trained, random_policy, subjects, *, guidance: float = GUIDANCE_SCALE, to_pixels=kontext.to_pixels, roundtrip=None
) -> tuple[dict, Tensor]:
    """Mean nSSM and VSM per image source over the held-out subjects, and a grid of references and samples, for a
    family sampled with CFG (klein; Qwen-Image-Edit passes its ``to_pixels`` and ``roundtrip``)."""
    roundtrip = roundtrip or (
        lambda policy, ref32, condition: policy.decode(pack(policy, patchified(policy, ref32 * 2 - 1)), condition)
    )
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=2))
    rng = random.Random(1234)
    scores: dict[str, list[Tensor]] = {}
    rows = []
    for reference, mask, identity, prompts in zip(
        subjects.references, subjects.masks, subjects.identities, subjects.prompts
    ):
        ref32 = (to_pixels(trained, [reference]) + 1) / 2
        other32 = (to_pixels(trained, [kontext.render_pil(identity, random_pose(rng)) for _ in range(8)]) + 1) / 2
        condition = trained.condition([reference], prompts[:1], RESOLUTION, RESOLUTION, 1.0)
        groups = {
            f"pretrained, ODE, CFG {s}": sample_group(trained, reference, prompts[0], 0.0, s)
            for s in (1.0, guidance, 4.0)
        }
        groups |= {
            f"pretrained, SDE 0.9, CFG {guidance}": sample_group(trained, reference, prompts[0], 0.9, guidance),
            "random tiny, ODE (noise 0.0)": sample_group(random_policy, reference, prompts[0], 0.0, 1.0),
            "random tiny, SDE (noise 0.9)": sample_group(random_policy, reference, prompts[0], 0.9, 1.0),
            "truth: same identity, other pose": other32,
            "truth: the reference (32 px)": ref32,
            "truth: the reference, VAE round trip": roundtrip(trained, ref32, condition),
        }
        kontext.add_scores(scores, reward, reference, mask, groups)
        rows.append(
            torch.cat(
                [
                    ref32,
                    groups[f"pretrained, ODE, CFG {guidance}"][:4],
                    groups[f"pretrained, SDE 0.9, CFG {guidance}"][:4],
                    groups["random tiny, SDE (noise 0.9)"][:2],
                    other32[:2],
                ]
            )
        )
    table = {name: torch.stack(values).mean(0).tolist() for name, values in scores.items()}
    return table, torch.stack(rows)


def main_klein(args) -> None:
    """Build, train, save, reload and evaluate ``data/demo/tiny-klein``."""
    start = time.time()
    held_out, train, others = kontext.training_data(args.seed)
    policy = Flux2KleinPolicy(
        **build_components(args.seed),
        lora=None,
        guidance_scale=1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        prompt_cache_size=10**6,
    )
    reference_pixels = kontext.to_pixels(policy, train.references)
    other_pixels = kontext.to_pixels(policy, others)
    print(
        f"{len(train.references)} training references, {len(others)} other-pose renders "
        f"({time.time() - start:.0f} s)\n1/3 VAE",
        flush=True,
    )

    t = time.time()
    kontext.train_vae(policy.vae, torch.cat([reference_pixels, other_pixels]), args.vae_steps, seed=args.seed)
    reference_raw = patchified(policy, reference_pixels)
    calibrate_vae(policy.vae, reference_raw)
    vae_time = time.time() - t
    print(
        f"  latent mean {policy.vae.bn.running_mean.abs().mean():.3f}, var {policy.vae.bn.running_var.mean():.3f} "
        f"({vae_time:.0f} s)",
        flush=True,
    )

    references = pack(policy, reference_raw)
    other_latents = pack(policy, patchified(policy, other_pixels)).view(len(references), kontext.OTHER_POSES, 64, -1)
    check = policy.encoder.encode_reference(train.references[0], RESOLUTION, RESOLUTION)
    assert torch.allclose(references[:1], check, atol=1e-5), "batched encoding differs from encode_reference"
    prompt_embeds = prompt_table(policy, train.prompts)
    negative = policy.encoder.negative_prompt()
    template = policy.condition(train.references[:1], train.prompts[0][:1], RESOLUTION, RESOLUTION, guidance_scale=1.0)
    dropout = torch.Generator().manual_seed(args.seed + 1)  # its own stream: the shared trainer's draws are unchanged

    def make_condition(batch_condition, index: Tensor, prompt: Tensor):
        embeds = prompt_embeds[index, prompt]
        empty = torch.rand(len(index), generator=dropout) < UNCONDITIONAL_PROBABILITY
        embeds = torch.where(empty[:, None, None], negative.expand_as(embeds), embeds)
        return kontext.replace(batch_condition, prompt_embeds=embeds, image_latents=references[index])

    print("2/3 transformer", flush=True)
    t = time.time()
    kontext.train_transformer(
        policy,
        references,
        other_latents,
        prompt_embeds,
        None,
        template,
        args.transformer_steps,
        lr=args.lr,
        seed=args.seed,
        make_condition=make_condition,
    )
    transformer_time = time.time() - t

    out = Path(args.out)
    policy.pipeline().save_pretrained(out, safe_serialization=True)
    kontext.write_demo_card(
        out, "Flux2KleinPipeline", "pretrained on the synthetic subject world to copy its reference"
    )
    print(f"3/3 saved {out} ({kontext.folder_size(out) / 2**20:.2f} MiB); reloading and evaluating", flush=True)
    loaded = Flux2KleinPolicy.from_pretrained(
        out, torch_dtype="float32", max_sequence_length=MAX_SEQUENCE_LENGTH, guidance_scale=GUIDANCE_SCALE
    )
    prompt = held_out.prompts[0][0]
    if loaded.tokenizer(prompt).input_ids != policy.tokenizer(prompt).input_ids:
        raise RuntimeError(f"the tokenizer does not round-trip through {out}")
    loaded_weights = loaded.transformer.state_dict()
    for key, value in policy.transformer.state_dict().items():
        if not torch.equal(value, loaded_weights[key]):
            raise RuntimeError(f"transformer weight {key} does not round-trip through {out}")
    table, rows = evaluate(loaded, Flux2KleinPolicy.tiny(lora=None), held_out)
    kontext.save_grid(rows, args.grid)
    print(kontext.format_table(table))
    print(
        f"grid (rows: reference | 4 ODE samples | 4 SDE samples | 2 random-model samples | 2 other-pose truths): "
        f"{args.grid}"
    )
    print(
        f"VAE {vae_time:.0f} s, transformer {transformer_time:.0f} s, total {time.time() - start:.0f} s; "
        f"folder {kontext.folder_size(out) / 2**20:.2f} MiB"
    )
