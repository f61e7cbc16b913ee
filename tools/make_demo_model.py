#!/usr/bin/env python
"""Build ``data/demo/tiny-kontext``: a tiny *pretrained* FLUX.1 Kontext that copies its reference.

The CPU demo needs a base model that shows the identity–diversity paradox in miniature: given a reference image
of a subject and an edit prompt ("a photo of the red and yellow striped star on the left, small and tilted, on the
beach"), it should draw *that subject* (high VSM) but keep the reference's pose and layout (low nSSM), with a little
structural variance for RL to amplify. ``KontextPolicy.tiny()`` has random weights and draws noise; this script
pretrains the same diffusers/transformers classes on the procedural subject world (:mod:`divrl.data.synthetic`):

1. **Components.** :func:`divrl.policy.tiny.tiny_kontext_components` gives the VAE, the (frozen, random) CLIP and
   T5 encoders and the word-level tokenizers. The transformer is rebuilt a little larger: 2 double + 2 single
   blocks, 2 heads of width 32 with rotary axes (8, 12, 12). The tiny default (head width 16, axes 4 + 6 + 6)
   has only one rotary frequency that tells the 8 × 8 token positions apart, and it aliases (6 tokens apart look
   almost like 0), so attention could not match a generated token to the reference token at the same place.
2. **VAE.** Trained as a plain autoencoder (posterior mode, L1 + MSE, a tiny KL) on 32 × 32 renders, which are
   made exactly as ``KontextPolicy.encode_reference`` sees the demo's 64 × 64 references (nearest resize, [-1, 1]).
   ``shift_factor`` / ``scaling_factor`` are then set from the latent statistics (mean, 1 / std), as for FLUX.
3. **Transformer.** All weights, rectified-flow matching through the policy's own conditioning and velocity path
   (``KontextPolicy.velocity``: reference tokens appended, guidance 2.5, 32 T5 tokens):
   ``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``, ``σ ~ U(0, 1)``. The condition is a reference (identity I in
   pose P0) and one of its prompts; the target ``x0`` is the reference itself with probability 0.75 (the copying
   paradox) and the same identity in a random other pose otherwise.
4. **Save and check.** ``policy.pipeline().save_pretrained(out)`` writes a ``FluxKontextPipeline`` folder
   (safetensors, float32); it is reloaded with ``KontextPolicy.from_pretrained`` and everything below is measured
   on the reloaded model.

Usage (deterministic; about 6 minutes on a free 2-core CPU, slower when other jobs share the cores)::

    python tools/make_demo_model.py --out data/demo/tiny-kontext

``--family klein`` builds the FLUX.2 [klein] demo model the same way (``data/demo/tiny-klein``,
``tools/demo_model_klein.py``), ``--family qwen`` the Qwen-Image-Edit-Plus one (``data/demo/tiny-qwen-edit``,
``tools/demo_model_qwen.py``).

Measured: 8 held-out identities (the demo's validation identities, ``synthetic_records(8, size=64, seed=1)``,
never seen in training), first prompt each, ``rollout(num_steps=4, seed 0)`` at 32 × 32, scored
against the 64 × 64 reference and mask with the demo reward (``DenseDescriptor(grid_size=24, cell=4)``, pool 2);
mean over the 64 samples::

    images                                    nSSM    VSM
    pretrained, ODE (noise 0.0)               0.488  0.771
    pretrained, SDE (noise 0.9)               0.587  0.813   (within-group nSSM std 0.14)
    random tiny, ODE (noise 0.0)              0.933  0.170   (KontextPolicy.tiny(): noise)
    random tiny, SDE (noise 0.9)              0.959  0.163
    truth: same identity, other pose          0.924  0.937
    truth: the reference (32 px)              0.210  0.968
    truth: the reference, VAE round trip      0.371  0.776

Run time 341 s on a free 2-core CPU (VAE 119 s, transformer 202 s), 478 s with other jobs on the cores; the
folder is 2.2 MiB and bit-identical between runs. Load it with ``max_sequence_length=32`` (as trained; the demo
config's value): with ``from_pretrained``'s default of 128 the SDE samples score nSSM 0.687, VSM 0.796.

The pretrained model draws the subject where the reference has it (nSSM close to the VAE round trip of the
reference, far below a real pose change) with its colours (VSM near the VAE's ceiling); the random model's output
is noise (VSM near 0). Fine textures (1-pixel checkers and stripes at 32 × 32) are beyond the 4-channel latent at
this size and come out as the texture's mean colour.

**Two subjects** (``--multi``: ``data/demo/tiny-kontext-multi``, the policy of ``configs/demo_multi.yaml``). The
single-subject model is fine-tuned (all transformer weights, lr 5e-4, 1200 steps of 32) on 3000 two-subject
conditions: references 1 and 2 at FLUX frame indices 1 and 2 (``reference_positions: frame``), prompts naming both
left to right, and the target the scene with subject 1 on the left and subject 2 on the right
(:func:`divrl.data.synthetic.render_scene`), each in its reference's rotation and height with probability 0.75 (the
paradox, per subject) and in new poses otherwise. The VAE and text encoders are the single-subject model's. Measured
on the 8 held-out conditions of ``data/demo-multi`` (first prompt, ``rollout(num_steps=4, seed 0)``, 8 samples
each) with the demo's detector, matching and features (plain background, Hungarian, dense-descriptor crops) but a
subject not found cropped as the whole image (the demo's reward scores it instead)::

    images                                      PSR   nSSM    VSM  found
    pretrained, ODE (noise 0.0)               0.703  0.911  0.678  0.766
    pretrained, SDE (noise 0.9)               0.673  0.926  0.571  0.688
    single-subject base, SDE (noise 0.9)      0.587  0.967  0.372  0.547

(PSR: subject consistency; nSSM / VSM: per subject; found: the fraction of subjects detected.) Run time 545 s with
other jobs on the cores (encoding 147 s, transformer 392 s); 2.2 MiB::

    python tools/make_demo_model.py --multi
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from divrl.data.synthetic import SubjectIdentity, random_pose, render, synthetic_records
from divrl.grpo import rollout
from divrl.images import to_image_batch, to_pil
from divrl.policy import KontextPolicy
from divrl.policy.tiny import tiny_kontext_components
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor

RESOLUTION = 32  # generated (and reference) size in pixels: latents 4 × 16 × 16, 8 × 8 packed tokens
REFERENCE_SIZE = 64  # the demo shards' references (data/demo, write_demo_dataset) are 64 × 64
GUIDANCE = 2.5  # FLUX's distilled guidance, as in the demo config
MAX_SEQUENCE_LENGTH = 32  # T5 tokens per prompt, as in configs/demo.yaml
COPY_PROBABILITY = 0.75  # share of training targets that copy the reference's pose (the paradox)
TRAIN_SEEDS = (100, 101)  # synthetic_records seeds of the training references (1500 identities each)
TRAIN_IDENTITIES_PER_SEED = 1500
OTHER_POSES = 2  # pre-rendered other-pose targets per training reference
EVAL_SEED = 1  # the demo's validation identities: write_demo_dataset uses seed + 1
EVAL_IDENTITIES = 8


# ---------------------------------------------------------------------------------------------------- the model


def build_components(seed: int) -> dict:
    """The tiny Kontext components, with a transformer whose rotary embedding can resolve an 8 × 8 token grid."""
    from diffusers import FluxTransformer2DModel

    components = tiny_kontext_components(seed)
    torch.manual_seed(seed + 10)
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2 × 2 packing
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,  # the width of the tiny T5 ...
        pooled_projection_dim=32,  # ... and CLIP encoders
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),  # (reference index, row, column); sums to the head width
    ).eval()
    return components


# ---------------------------------------------------------------------------------------------------- the data


@dataclass
class SubjectSet:
    """Rendered subjects: 64 × 64 reference images and masks (PIL, as in the demo shards), identities, prompts."""

    references: list[Image.Image]
    masks: list[Image.Image]
    identities: list[SubjectIdentity]
    prompts: list[list[str]]


def subject_set(num: int, seed: int, exclude: set[SubjectIdentity] = frozenset()) -> SubjectSet:
    """``synthetic_records(num, seed=seed)`` at the demo's reference size, leaving out the identities in ``exclude``."""
    out = SubjectSet([], [], [], [])
    for record in synthetic_records(num, size=REFERENCE_SIZE, seed=seed):
        extra = record.extra
        identity = SubjectIdentity(extra["kind"], tuple(extra["colours"]), extra["texture"])
        if identity in exclude:
            continue
        out.references.append(record.reference)
        out.masks.append(record.mask)
        out.identities.append(identity)
        out.prompts.append(record.prompts)
    return out


def training_data(seed: int) -> tuple[SubjectSet, SubjectSet, list[Image.Image]]:
    """Every demo model's data: the held-out identities (drawn first, so training can exclude them), the training
    identities and ``OTHER_POSES`` renders of each training identity in random poses (drawn from ``seed``)."""
    held_out = subject_set(EVAL_IDENTITIES, EVAL_SEED)
    train = SubjectSet([], [], [], [])
    for train_seed in TRAIN_SEEDS:
        part = subject_set(TRAIN_IDENTITIES_PER_SEED, train_seed, exclude=set(held_out.identities))
        for field in ("references", "masks", "identities", "prompts"):
            getattr(train, field).extend(getattr(part, field))
    rng = random.Random(seed)
    others = [render_pil(identity, random_pose(rng)) for identity in train.identities for _ in range(OTHER_POSES)]
    return held_out, train, others


def render_pil(identity: SubjectIdentity, pose) -> Image.Image:
    """A 64 × 64 render as the shards store it (8-bit RGB)."""
    return to_pil(render(identity, pose, REFERENCE_SIZE)[0])


def to_pixels(policy: KontextPolicy, images) -> Tensor:
    """Images → the ``(B, 3, 32, 32)`` tensor in [-1, 1] that ``KontextPolicy.encode_reference`` feeds the VAE
    (same resize and normalisation calls, batched)."""
    processor = policy.pipeline().image_processor
    pixels = to_image_batch(images)
    return processor.preprocess(processor.resize(pixels, RESOLUTION, RESOLUTION), RESOLUTION, RESOLUTION)


# ---------------------------------------------------------------------------------------------------- the VAE


def train_vae(vae, pixels: Tensor, steps: int, batch_size: int = 64, lr: float = 5e-3, seed: int = 0) -> None:
    """Train the VAE as an autoencoder on ``pixels`` ([-1, 1]): decode the posterior mode, L1 + MSE, tiny KL.

    The pipeline encodes with the posterior mode, so the decoder is trained on exactly that; the KL term (weight
    1e-6) only keeps the latents bounded.
    """
    vae.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mode()).sample
        error = recon - batch
        loss = error.abs().mean() + error.square().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  vae step {step:4d}  L1 {error.abs().mean().item():.4f}", flush=True)
    vae.requires_grad_(False)
    vae.eval()


@torch.no_grad()
def raw_latents(vae, pixels: Tensor, chunk: int = 256) -> Tensor:
    """Posterior modes ``(B, 4, 16, 16)`` before shift and scale."""
    return torch.cat([vae.encode(part).latent_dist.mode() for part in pixels.split(chunk)])


def calibrate_vae(vae, latents: Tensor) -> None:
    """FLUX-style latent normalisation: ``shift_factor`` = mean, ``scaling_factor`` = 1 / std (4 decimals)."""
    vae.register_to_config(
        shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1.0 / latents.std().item(), 4)
    )


def pack(policy: KontextPolicy, latents: Tensor) -> Tensor:
    """Raw latents → the shifted, scaled, packed ``(B, 64, 16)`` tokens of ``encode_reference``."""
    config = policy.vae.config
    latents = (latents - config.shift_factor) * config.scaling_factor
    b, c, h, w = latents.shape
    return policy.pipeline()._pack_latents(latents, b, c, h, w)


# ---------------------------------------------------------------------------------------------------- the transformer


def train_transformer(
    policy: KontextPolicy,
    references: Tensor,
    others: Tensor,
    prompt_embeds: Tensor,
    pooled_embeds: Tensor,
    template,
    steps: int,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    seed: int = 0,
    copies: Tensor | None = None,
    warmup: int = 50,
    make_condition=None,
) -> None:
    """Rectified-flow training of every transformer weight as a copying Kontext editor.

    Args:
        references: packed reference latents ``(N, T, 16)`` (``T`` = 64 per reference, the references of a
            condition concatenated).
        copies: the copying targets ``(N, 64, 16)`` (default: the reference itself, one reference per condition).
        others: packed latents of the same identities in other poses ``(N, K, 64, 16)``.
        prompt_embeds, pooled_embeds: T5 ``(N, P, L, D)`` and CLIP ``(N, P, D')`` embeddings of each reference's
            ``P`` prompts.
        template: a one-sample :class:`~divrl.policy.kontext.Condition` from ``policy.condition`` (position ids,
            guidance); each batch replaces its embeddings and reference latents.
        make_condition: ``(batch_condition, index, prompt) → condition`` of a batch (identity and prompt indices);
            default: Kontext's, ``template`` with the rows' T5 / CLIP embeddings and reference latents. Another family
            passes its own (``tools/demo_model_klein.py``).
    """
    transformer = policy.transformer
    transformer.requires_grad_(True)  # KontextPolicy froze it
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    copies = references if copies is None else copies
    if make_condition is None:

        def make_condition(batch_condition, index: Tensor, prompt: Tensor):
            return replace(
                batch_condition,
                prompt_embeds=prompt_embeds[index, prompt],
                pooled_prompt_embeds=pooled_embeds[index, prompt],
                image_latents=references[index],
            )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10 %
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    batch_condition = template.repeat_interleave(batch_size)
    n, num_prompts, num_others = len(references), prompt_embeds.shape[1], others.shape[1]
    running = None
    for step in range(steps):
        index = torch.randint(n, (batch_size,), generator=generator)
        prompt = torch.randint(num_prompts, (batch_size,), generator=generator)
        other = torch.randint(num_others, (batch_size,), generator=generator)
        copy = torch.rand(batch_size, generator=generator) < COPY_PROBABILITY
        x0 = torch.where(copy[:, None, None], copies[index], others[index, other])
        condition = make_condition(batch_condition, index, prompt)
        sigma = torch.rand(batch_size, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma[:, None, None]
        velocity = policy.velocity((1 - s) * x0 + s * noise, sigma, condition)
        loss = (velocity - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            print(f"  transformer step {step:4d}  flow loss (running mean) {running:.4f}", flush=True)
    transformer.requires_grad_(False)
    transformer.eval()


@torch.no_grad()
def encode_prompt_table(policy: KontextPolicy, prompts: list[list[str]], chunk: int = 128) -> tuple[Tensor, Tensor]:
    """T5 and CLIP embeddings of every prompt, shaped ``(N, P, L, D)`` and ``(N, P, D')``."""
    flat = [p for group in prompts for p in group]
    embeds, pooled = [], []
    for start in range(0, len(flat), chunk):
        e, p, _ = policy.encode_prompts(flat[start : start + chunk])
        embeds.append(e)
        pooled.append(p)
    n, per = len(prompts), len(prompts[0])
    return torch.cat(embeds).view(n, per, *embeds[0].shape[1:]), torch.cat(pooled).view(n, per, -1)


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_group(policy: KontextPolicy, reference, prompt: str, noise_level: float, group_size: int = 8) -> Tensor:
    """``group_size`` decoded 32 × 32 samples of one condition, as the demo's rollouts draw them."""
    condition = policy.condition(
        [reference], [prompt], RESOLUTION, RESOLUTION, guidance=GUIDANCE, group_size=group_size
    )
    trajectory = rollout(
        policy,
        condition,
        num_steps=4,
        noise_level=noise_level,
        generator=torch.Generator().manual_seed(0),
    )
    return trajectory.images


def add_scores(scores: dict, reward, reference, mask, groups: dict) -> None:
    """Append each group's mean nSSM and VSM against ``reference`` to ``scores[name]``."""
    for name, images in groups.items():
        out = reward(reference, images, mask)
        scores.setdefault(name, []).append(torch.stack([out.components[k].mean() for k in ("nssm", "vsm")]))


def evaluate(trained: KontextPolicy, random_policy: KontextPolicy, subjects: SubjectSet) -> tuple[dict, Tensor]:
    """Mean nSSM and VSM per image source over the held-out subjects, and a grid of references and samples."""
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=2))
    rng = random.Random(1234)
    scores: dict[str, list[Tensor]] = {}
    rows = []
    for reference, mask, identity, prompts in zip(
        subjects.references, subjects.masks, subjects.identities, subjects.prompts
    ):
        ref32 = (to_pixels(trained, [reference]) + 1) / 2
        other32 = (to_pixels(trained, [render_pil(identity, random_pose(rng)) for _ in range(8)]) + 1) / 2
        condition = trained.condition([reference], prompts[:1], RESOLUTION, RESOLUTION, guidance=GUIDANCE)
        roundtrip = trained.decode(pack(trained, raw_latents(trained.vae, ref32 * 2 - 1)), condition)
        groups = {
            "pretrained, ODE (noise 0.0)": sample_group(trained, reference, prompts[0], 0.0),
            "pretrained, SDE (noise 0.9)": sample_group(trained, reference, prompts[0], 0.9),
            "random tiny, ODE (noise 0.0)": sample_group(random_policy, reference, prompts[0], 0.0),
            "random tiny, SDE (noise 0.9)": sample_group(random_policy, reference, prompts[0], 0.9),
            "truth: same identity, other pose": other32,
            "truth: the reference (32 px)": ref32,
            "truth: the reference, VAE round trip": roundtrip,
        }
        add_scores(scores, reward, reference, mask, groups)
        pretrained = groups["pretrained, ODE (noise 0.0)"][:4], groups["pretrained, SDE (noise 0.9)"][:4]
        rows.append(torch.cat([ref32, *pretrained, groups["random tiny, SDE (noise 0.9)"][:2], other32[:2]]))
    table = {name: torch.stack(values).mean(0).tolist() for name, values in scores.items()}
    return table, torch.stack(rows)


def save_grid(rows: Tensor, path: str, scale: int = 3, gap: int = 2) -> None:
    """Rows of images ``(R, C, 3, H, W)`` → one PNG, nearest-upscaled, on a white background."""
    r, c, _, h, w = rows.shape
    canvas = torch.ones(3, r * (h + gap) - gap, c * (w + gap) - gap)
    for i in range(r):
        for j in range(c):
            canvas[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = rows[i, j]
    image = to_pil(canvas)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def format_table(table: dict) -> str:
    lines = [f"{'images':40s} {'nSSM':>6s} {'VSM':>6s}"]
    lines += [f"{name:40s} {nssm:6.3f} {vsm:6.3f}" for name, (nssm, vsm) in table.items()]
    return "\n".join(lines)


def write_demo_card(out: Path, pipeline: str, what: str) -> None:
    """The demo model's ``README.md``: its licence for ``divrl export``'s card (the project's, Apache-2.0) and what it is."""
    (Path(out) / "README.md").write_text(
        f"---\nlicense: apache-2.0\nlibrary_name: diffusers\ntags:\n- divrl\n- toy\n---\n\n# {Path(out).name}\n\n"
        f"A CPU demo's tiny `{pipeline}` (the real diffusers classes at toy size), {what}, built by divrl's "
        f"`tools/`. For trying divrl out, not for images.\n"
    )


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------- two subjects

MULTI_SUBJECTS = 2
MULTI_PAIRS = 3000  # training conditions (two subjects each)
MULTI_SEED = 200


@dataclass
class SceneSet:
    """Two-subject conditions: the references (64 × 64 PIL, one per subject), the copying scene (each subject in its
    reference's rotation and height), ``OTHER_POSES`` scenes in new poses, and the prompts."""

    references: list[list[Image.Image]]
    copies: list[Image.Image]
    others: list[list[Image.Image]]
    prompts: list[list[str]]


def scene_set(num: int, seed: int, exclude: set[SubjectIdentity], prompts: int = 2) -> SceneSet:
    """``num`` two-subject conditions drawn from ``seed``, none with an identity in ``exclude``."""
    from divrl.data.synthetic import random_identity, render_scene, scene_poses, scene_prompt

    rng = random.Random(seed)
    out = SceneSet([], [], [], [])
    while len(out.copies) < num:
        identities = [random_identity(rng) for _ in range(MULTI_SUBJECTS)]
        if len(set(identities)) < MULTI_SUBJECTS or exclude & set(identities):
            continue
        poses = [random_pose(rng) for _ in identities]
        out.references.append([render_pil(i, p) for i, p in zip(identities, poses)])

        def scene(q, identities=identities):
            return to_pil(render_scene(identities, q, REFERENCE_SIZE)[0])

        out.copies.append(scene(scene_poses(MULTI_SUBJECTS, rng, copy=poses)))
        out.others.append([scene(scene_poses(MULTI_SUBJECTS, rng)) for _ in range(OTHER_POSES)])
        out.prompts.append([scene_prompt(identities, rng) for _ in range(prompts)])
    return out


def multi_rewards():
    """The multi-subject demo's rewards at the demo's settings: PSR's subject consistency and DivRL per subject."""
    from divrl.rewards import BackboneEmbedder, PlainBackgroundDetector, SubjectLocator
    from divrl.rewards.multi import PairwiseSubjectConsistency, PerSubjectDivRL

    backbone = DenseDescriptor(grid_size=24, cell=4)
    embedder = BackboneEmbedder(backbone, size=32)
    locator = SubjectLocator(PlainBackgroundDetector(), "hungarian", embedder)
    return (
        PairwiseSubjectConsistency(locator, embedder),
        PerSubjectDivRL(locator, FeatureScorer(backbone, pool=1), gate=True, crop_size=32),
    )


def evaluate_multi(trained: KontextPolicy, base: KontextPolicy, records) -> tuple[dict, Tensor]:
    """Mean PSR score, per-subject nSSM / VSM and found fraction per image source over held-out conditions, and a grid
    (rows: the two references | 4 ODE samples | 4 SDE samples | 2 samples of the single-subject base model)."""
    from divrl.data.stream import ConditionSample
    from divrl.rewards import Group

    consistency, per_subject = multi_rewards()
    scores: dict[str, list[Tensor]] = {}
    rows = []
    for record in records:
        sample = ConditionSample(
            record.id, record.prompts[0], record.references, record.masks, metadata=dict(record.extra)
        )
        refs32 = (to_pixels(trained, record.references) + 1) / 2
        groups = {
            "pretrained, ODE (noise 0.0)": sample_group(trained, record.references, record.prompts[0], 0.0),
            "pretrained, SDE (noise 0.9)": sample_group(trained, record.references, record.prompts[0], 0.9),
            "single-subject base, SDE (noise 0.9)": sample_group(base, record.references, record.prompts[0], 0.9),
        }
        for name, images in groups.items():
            a, b = consistency(Group(sample, images)), per_subject(Group(sample, images))
            values = [a.reward, b.components["nssm"], b.components["vsm"], b.components["found"]]
            scores.setdefault(name, []).append(torch.stack([v.mean() for v in values]))
        rows.append(
            torch.cat(
                [
                    refs32,
                    groups["pretrained, ODE (noise 0.0)"][:4],
                    groups["pretrained, SDE (noise 0.9)"][:4],
                    groups["single-subject base, SDE (noise 0.9)"][:2],
                ]
            )
        )
    table = {name: torch.stack(values).mean(0).tolist() for name, values in scores.items()}
    return table, torch.stack(rows)


def main_multi(args) -> None:
    """Fine-tune the single-subject demo model into one that places two references side by side."""
    from divrl.data.synthetic import DEMO_MULTI_VAL, multi_subject_records

    start = time.time()
    held_out = list(
        multi_subject_records(
            DEMO_MULTI_VAL,
            size=REFERENCE_SIZE,
            seed=args.seed + 11,
            prefix="val",
            subjects=(MULTI_SUBJECTS,),
            weights=None,
        )
    )
    exclude = {
        SubjectIdentity(i["kind"], tuple(i["colours"]), i["texture"])
        for record in held_out
        for i in record.extra["identities"]
    }
    train = scene_set(MULTI_PAIRS, MULTI_SEED + args.seed, exclude)
    policy = KontextPolicy.from_pretrained(
        args.base,
        torch_dtype="float32",
        lora=None,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        prompt_cache_size=10**6,
        reference_positions="frame",
    )

    def encode(images):
        return pack(policy, raw_latents(policy.vae, to_pixels(policy, images)))

    references = encode([r for refs in train.references for r in refs]).view(MULTI_PAIRS, MULTI_SUBJECTS * 64, -1)
    copies = encode(train.copies)
    others = encode([o for group in train.others for o in group]).view(MULTI_PAIRS, OTHER_POSES, 64, -1)
    check = torch.cat([policy.encode_reference(r, RESOLUTION, RESOLUTION) for r in train.references[0]], dim=1)
    assert torch.allclose(references[:1], check, atol=1e-5), "batched encoding differs from encode_reference"
    prompt_embeds, pooled_embeds = encode_prompt_table(policy, train.prompts)
    template = policy.condition([train.references[0]], train.prompts[0][:1], RESOLUTION, RESOLUTION, guidance=GUIDANCE)
    print(f"{MULTI_PAIRS} two-subject conditions encoded ({time.time() - start:.0f} s); transformer", flush=True)
    t = time.time()
    train_transformer(
        policy,
        references,
        others,
        prompt_embeds,
        pooled_embeds,
        template,
        args.transformer_steps,
        lr=args.lr,
        seed=args.seed,
        copies=copies,
        warmup=20,
    )
    transformer_time = time.time() - t
    out = Path(args.out)
    policy.pipeline().save_pretrained(out, safe_serialization=True)
    write_demo_card(out, "FluxKontextPipeline", "pretrained to copy its references (several subjects)")
    loaded = KontextPolicy.from_pretrained(out, torch_dtype="float32", max_sequence_length=MAX_SEQUENCE_LENGTH)
    for key, value in policy.transformer.state_dict().items():
        if not torch.equal(value, loaded.transformer.state_dict()[key]):
            raise RuntimeError(f"transformer weight {key} does not round-trip through {out}")
    base = KontextPolicy.from_pretrained(args.base, torch_dtype="float32", max_sequence_length=MAX_SEQUENCE_LENGTH)
    table, rows = evaluate_multi(loaded, base, held_out)
    save_grid(rows, args.grid)
    print(f"{'images':40s} {'PSR':>6s} {'nSSM':>6s} {'VSM':>6s} {'found':>6s}")
    for name, values in table.items():
        print(f"{name:40s} " + " ".join(f"{v:6.3f}" for v in values))
    print(f"grid: {args.grid}")
    print(
        f"transformer {transformer_time:.0f} s, total {time.time() - start:.0f} s; folder "
        f"{folder_size(out) / 2**20:.2f} MiB"
    )


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--family",
        choices=("kontext", "klein", "qwen"),
        default="kontext",
        help="kontext: a FluxKontextPipeline; klein: a Flux2KleinPipeline (tools/demo_model_klein.py); "
        "qwen: a QwenImageEditPlusPipeline (tools/demo_model_qwen.py)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: data/demo/tiny-kontext, with --multi "
        "data/demo/tiny-kontext-multi, with --family klein data/demo/tiny-klein, with --family qwen "
        "data/demo/tiny-qwen-edit)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--transformer-steps", type=int, default=1200)
    parser.add_argument("--grid", default="/tmp/demo_model_grid.png", help="PNG of references and samples")
    parser.add_argument(
        "--multi",
        action="store_true",
        help="fine-tune --base into the two-subject demo model (data/demo/tiny-kontext-multi)",
    )
    parser.add_argument("--base", default="data/demo/tiny-kontext", help="--multi: the single-subject model")
    parser.add_argument(
        "--lr", type=float, default=None, help="transformer learning rate (default 1.5e-3; --multi 5e-4)"
    )
    args = parser.parse_args()
    if args.multi and args.family != "kontext":
        parser.error("--multi builds the two-subject Kontext model; leave out --family")
    default = {"klein": "data/demo/tiny-klein", "qwen": "data/demo/tiny-qwen-edit"}.get(
        args.family, "data/demo/tiny-kontext"
    )
    args.out = args.out or ("data/demo/tiny-kontext-multi" if args.multi else default)
    args.lr = args.lr or (5e-4 if args.multi else 1.5e-3)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    if args.multi:
        main_multi(args)
        return
    if args.family == "klein":
        from demo_model_klein import main_klein

        main_klein(args)
        return
    if args.family == "qwen":
        from demo_model_qwen import main_qwen

        main_qwen(args)
        return
    start = time.time()

    held_out, train, others = training_data(args.seed)

    # A large prompt cache: the training prompts are encoded once, up front.
    policy = KontextPolicy(
        **build_components(args.seed), lora=None, max_sequence_length=MAX_SEQUENCE_LENGTH, prompt_cache_size=10**6
    )
    reference_pixels = to_pixels(policy, train.references)
    other_pixels = to_pixels(policy, others)
    print(
        f"{len(train.references)} training references, {len(others)} other-pose renders ({time.time() - start:.0f} s)",
        flush=True,
    )

    print("1/3 VAE", flush=True)
    t = time.time()
    train_vae(policy.vae, torch.cat([reference_pixels, other_pixels]), args.vae_steps, seed=args.seed)
    reference_raw = raw_latents(policy.vae, reference_pixels)
    calibrate_vae(policy.vae, reference_raw)
    vae_time = time.time() - t
    print(
        f"  shift_factor {policy.vae.config.shift_factor}, scaling_factor {policy.vae.config.scaling_factor} "
        f"({vae_time:.0f} s)",
        flush=True,
    )

    # Encode everything with the trained VAE (no reference cache is involved: no keys are passed).
    references = pack(policy, reference_raw)
    other_latents = pack(policy, raw_latents(policy.vae, other_pixels)).view(len(references), OTHER_POSES, 64, -1)
    check = policy.encode_reference(train.references[0], RESOLUTION, RESOLUTION)
    assert torch.allclose(references[:1], check, atol=1e-5), "batched encoding differs from encode_reference"
    prompt_embeds, pooled_embeds = encode_prompt_table(policy, train.prompts)
    template = policy.condition(train.references[:1], train.prompts[0][:1], RESOLUTION, RESOLUTION, guidance=GUIDANCE)

    print("2/3 transformer", flush=True)
    t = time.time()
    train_transformer(
        policy,
        references,
        other_latents,
        prompt_embeds,
        pooled_embeds,
        template,
        args.transformer_steps,
        lr=args.lr,
        seed=args.seed,
    )
    transformer_time = time.time() - t
    print(f"  ({transformer_time:.0f} s)", flush=True)

    out = Path(args.out)
    policy.pipeline().save_pretrained(out, safe_serialization=True)
    write_demo_card(out, "FluxKontextPipeline", "pretrained on the synthetic subject world to copy its reference")
    print(f"3/3 saved {out} ({folder_size(out) / 2**20:.2f} MiB); reloading and evaluating", flush=True)
    if not (out / "model_index.json").is_file():
        raise RuntimeError(f"{out} has no model_index.json")
    loaded = KontextPolicy.from_pretrained(out, torch_dtype="float32", max_sequence_length=MAX_SEQUENCE_LENGTH)
    for name in ("tokenizer", "tokenizer_2"):
        prompt = held_out.prompts[0][0]
        if getattr(loaded, name)(prompt).input_ids != getattr(policy, name)(prompt).input_ids:
            raise RuntimeError(f"{name} does not round-trip through {out}")
    loaded_weights = loaded.transformer.state_dict()
    for key, value in policy.transformer.state_dict().items():
        if not torch.equal(value, loaded_weights[key]):
            raise RuntimeError(f"transformer weight {key} does not round-trip through {out}")

    table, rows = evaluate(loaded, KontextPolicy.tiny(), held_out)
    save_grid(rows, args.grid)
    print(format_table(table))
    print(
        f"grid (rows: reference | 4 ODE samples | 4 SDE samples | 2 random-model samples | 2 other-pose truths): "
        f"{args.grid}"
    )
    print(
        f"VAE {vae_time:.0f} s, transformer {transformer_time:.0f} s, total {time.time() - start:.0f} s; "
        f"folder {folder_size(out) / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
