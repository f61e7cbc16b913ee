"""``python tools/make_demo_model.py --family qwen``: ``data/demo/tiny-qwen-edit``, a tiny *pretrained*
Qwen-Image-Edit-Plus that copies its reference, the policy of ``configs/demo_qwen_edit.yaml``.

Built like the Kontext and klein demo models (the same data, the same copying paradox, the same evaluation), with
Qwen-Image-Edit's classes at toy size and its conditioning:

1. **Components.** ``QwenImageTransformer2DModel`` with 4 dual-stream blocks, 2 heads of width 32 and rotary axes
   (8, 12, 12); the causal 3-D VAE (``AutoencoderKLQwenImage``), the frozen random Qwen2.5-VL (with its vision tower),
   the tokenizer and the text-and-image processor of :func:`divrl.policy.qwen_image.tiny.tiny_qwen_edit_components`.
   References are read at 32² for both the VL encoder and the VAE (``condition_image_size`` / ``vae_image_size``
   1024 in the demo config; the real pipeline reads ~384² and ~1024²).
2. **VAE.** Trained as an autoencoder on 32 × 32 renders (``make_demo_model.train_vae`` on one-frame videos); its
   per-channel ``latents_mean`` / ``latents_std`` (which the pipeline normalises latents with) are then set from the
   training references' latents.
3. **Transformer.** All weights, rectified-flow matching through ``QwenEditPolicy.velocity`` without guidance, as
   for the other families; the prompt embeddings are the VL encoder's reading of the prompt *with the reference*
   (two prompts per identity), and in 10 % of the rows the negative prompt's (``" "``, read with the same
   reference), so that true CFG subtracts a velocity the model has learnt (the demo samples with CFG 2.0).
4. **Save and check.** :func:`divrl.policy.qwen_image.builder.save_pipeline` (the released format), reloaded with
   ``QwenEditPolicy.from_pretrained`` and measured on the reloaded model.

Measured on the 8 held-out identities as for the other demo models (first prompt each, ``rollout(num_steps=4, seed
0)`` at 32 × 32, the demo reward; mean over the 64 samples)::

    images                                     nSSM    VSM
    pretrained, ODE, CFG 1.0                  0.554  0.788
    pretrained, ODE, CFG 2.0                  0.549  0.785   (the demo's guidance)
    pretrained, ODE, CFG 4.0                  0.544  0.795
    pretrained, SDE 0.9, CFG 2.0              0.710  0.738
    random tiny, ODE (noise 0.0)              0.940  0.235   (QwenEditPolicy.tiny(): noise)
    random tiny, SDE (noise 0.9)              0.959  0.262
    truth: same identity, other pose          0.930  0.915
    truth: the reference (32 px)              0.229  0.956
    truth: the reference, VAE round trip      0.450  0.804

It copies its reference as the other demo models do (nSSM near the VAE round trip, VSM near the VAE's ceiling).
Run time 846 s on a 2-core CPU shared with other jobs (the 3-D VAE 476 s, the transformer 283 s); the folder is
3.2 MiB, most of it the transformer (2.4 MiB).
"""

from __future__ import annotations

import time
from pathlib import Path

import make_demo_model as kontext
import torch
from torch import Tensor

from divrl.policy.qwen_image import QwenEditPolicy

RESOLUTION = kontext.RESOLUTION  # 32 × 32: latents 4 × 16 × 16, packed to 8 × 8 tokens of 16 channels
AREA = RESOLUTION * RESOLUTION  # references read at 32² by the VL encoder and the VAE
TRUE_CFG_SCALE = 2.0  # the demo's guidance
UNCONDITIONAL_PROBABILITY = 0.1  # rows trained on the negative prompt
PROMPTS_PER_IDENTITY = 2  # prompts read with each reference (each a VL-encoder pass)


def build_components(seed: int) -> dict:
    """The tiny components with the demo's larger transformer."""
    from diffusers import QwenImageTransformer2DModel

    from divrl.policy.qwen_image.tiny import tiny_qwen_edit_components

    components = tiny_qwen_edit_components(seed)
    torch.manual_seed(seed + 10)
    components["transformer"] = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    return components


def to_pixels(policy: QwenEditPolicy, images, chunk: int = 512) -> Tensor:
    """Images → the ``(B, 3, 32, 32)`` tensor in [-1, 1] that ``encode_reference`` feeds the VAE at a 32² area (the
    same resize and normalisation call, batched)."""
    processor = policy.pipeline().image_processor
    pil = [policy.encoder._pil(image) for image in images]
    return torch.cat(
        [processor.preprocess(pil[i : i + chunk], RESOLUTION, RESOLUTION) for i in range(0, len(pil), chunk)]
    )


def policy_of(components: dict, **kwargs) -> QwenEditPolicy:
    return QwenEditPolicy(
        **components, lora=None, condition_image_size=AREA, vae_image_size=AREA, prompt_cache_size=10**6, **kwargs
    )


@torch.no_grad()
def raw_latents(vae, pixels: Tensor, chunk: int = 256) -> Tensor:
    """Posterior modes ``(B, 4, 1, 16, 16)`` of one-frame ``pixels`` before normalisation."""
    return torch.cat([vae.encode(part).latent_dist.mode() for part in pixels.split(chunk)])


def calibrate_vae(vae, latents: Tensor) -> None:
    """The per-channel latent mean and standard deviation, as the released VAE carries them (4 decimals)."""
    vae.register_to_config(
        latents_mean=[round(v, 4) for v in latents.mean(dim=(0, 2, 3, 4)).tolist()],
        latents_std=[round(v, 4) for v in latents.std(dim=(0, 2, 3, 4)).tolist()],
    )


def pack(policy: QwenEditPolicy, latents: Tensor) -> Tensor:
    """Raw latents → the normalised, packed ``(B, 64, 16)`` tokens of ``encode_reference``."""
    config = policy.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    normalised = (latents - mean) / std
    b, c, _, h, w = normalised.shape
    return policy.pipeline()._pack_latents(normalised, b, c, h, w)


@torch.no_grad()
def prompt_table(policy: QwenEditPolicy, references: list, prompts: list[list[str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Each identity's prompts read with its reference, and the negative prompt's, padded: embeddings ``(N, P + 1, L,
    D)``, masks ``(N, P + 1, L)`` (row ``P``: the negative prompt)."""
    from divrl.policy.qwen_image.encoder import pad_embeddings

    rows = []
    for reference, group in zip(references, prompts):
        image = policy.encoder._pil(reference)
        rows += [
            policy.encoder.encode_prompt(p, [image]) for p in [*group[:PROMPTS_PER_IDENTITY], policy.negative_prompt]
        ]
    embeds, mask = pad_embeddings(rows)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    n, per = len(references), PROMPTS_PER_IDENTITY + 1
    return embeds.view(n, per, *embeds.shape[1:]), mask.view(n, per, -1), embeds


def evaluate(trained: QwenEditPolicy, random_policy: QwenEditPolicy, subjects) -> tuple[dict, Tensor]:
    """The klein demo model's evaluation (:func:`demo_model_klein.evaluate`) with this family's pixels and VAE."""
    from demo_model_klein import evaluate as evaluate_guided

    def roundtrip(policy, ref32, condition):
        return policy.decode(pack(policy, raw_latents(policy.vae, (ref32 * 2 - 1).unsqueeze(2))), condition)

    return evaluate_guided(
        trained, random_policy, subjects, guidance=TRUE_CFG_SCALE, to_pixels=to_pixels, roundtrip=roundtrip
    )


def main_qwen(args) -> None:
    """Build, train, save, reload and evaluate ``data/demo/tiny-qwen-edit``."""
    from divrl.policy.qwen_image.builder import save_pipeline

    start = time.time()
    held_out, train, others = kontext.training_data(args.seed)
    policy = policy_of(build_components(args.seed), true_cfg_scale=1.0)
    reference_pixels = to_pixels(policy, train.references).unsqueeze(2)  # one-frame videos
    other_pixels = to_pixels(policy, others).unsqueeze(2)
    print(
        f"{len(train.references)} training references, {len(others)} other-pose renders "
        f"({time.time() - start:.0f} s)\n1/3 VAE",
        flush=True,
    )

    t = time.time()
    kontext.train_vae(policy.vae, torch.cat([reference_pixels, other_pixels]), args.vae_steps, seed=args.seed)
    reference_raw = raw_latents(policy.vae, reference_pixels)
    calibrate_vae(policy.vae, reference_raw)
    vae_time = time.time() - t
    print(
        f"  latents_mean {policy.vae.config.latents_mean}, latents_std {policy.vae.config.latents_std} "
        f"({vae_time:.0f} s)",
        flush=True,
    )

    references = pack(policy, reference_raw)
    other_latents = pack(policy, raw_latents(policy.vae, other_pixels)).view(
        len(references), kontext.OTHER_POSES, 64, -1
    )
    check, _ = policy.encoder.encode_reference(policy.encoder._pil(train.references[0]))
    assert torch.allclose(references[:1], check, atol=1e-5), "batched encoding differs from encode_reference"
    t = time.time()
    embeds, masks, _ = prompt_table(policy, train.references, train.prompts)
    print(
        f"  {embeds.shape[0] * embeds.shape[1]} prompts read with their references, {embeds.shape[2]} tokens at "
        f"most ({time.time() - t:.0f} s)",
        flush=True,
    )
    template = policy.condition(train.references[:1], train.prompts[0][:1], RESOLUTION, RESOLUTION, true_cfg_scale=1.0)
    dropout = torch.Generator().manual_seed(args.seed + 1)  # its own stream: the shared trainer's draws are unchanged

    def make_condition(batch_condition, index: Tensor, prompt: Tensor):
        empty = torch.rand(len(index), generator=dropout) < UNCONDITIONAL_PROBABILITY
        row = torch.where(empty, torch.full_like(prompt, PROMPTS_PER_IDENTITY), prompt)
        return kontext.replace(
            batch_condition,
            prompt_embeds=embeds[index, row],
            prompt_mask=masks[index, row],
            image_latents=references[index],
        )

    print("2/3 transformer", flush=True)
    t = time.time()
    kontext.train_transformer(
        policy,
        references,
        other_latents,
        embeds[:, :PROMPTS_PER_IDENTITY],
        None,
        template,
        args.transformer_steps,
        lr=args.lr,
        seed=args.seed,
        make_condition=make_condition,
    )
    transformer_time = time.time() - t

    out = Path(args.out)
    save_pipeline(policy.pipeline(), out)
    kontext.write_demo_card(
        out, "QwenImageEditPlusPipeline", "pretrained on the synthetic subject world to copy its reference"
    )
    print(f"3/3 saved {out} ({kontext.folder_size(out) / 2**20:.2f} MiB); reloading and evaluating", flush=True)
    loaded = QwenEditPolicy.from_pretrained(
        out,
        torch_dtype="float32",
        lora=None,
        condition_image_size=AREA,
        vae_image_size=AREA,
        true_cfg_scale=TRUE_CFG_SCALE,
    )
    for key, value in policy.transformer.state_dict().items():
        if not torch.equal(value, loaded.transformer.state_dict()[key]):
            raise RuntimeError(f"transformer weight {key} does not round-trip through {out}")
    table, rows = evaluate(loaded, QwenEditPolicy.tiny(lora=None), held_out)
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
