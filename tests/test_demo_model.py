"""The committed demo model (data/demo/tiny-kontext, built by tools/make_demo_model.py) loads through the real
`from_pretrained` path and shows the identity-diversity paradox the demo trains away: it copies the reference's
subject (high VSM) in the reference's layout (low nSSM), where the random tiny model draws noise; and the two-subject
model (data/demo/tiny-kontext-multi) draws both of its references better than the model it was fine-tuned from; the
FLUX.2 klein demo model (data/demo/tiny-klein) copies its reference as the Kontext one does."""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from divrl.data.schema import IdentityRecord
from divrl.grpo import rollout
from divrl.policy import KontextPolicy
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor

ROOT = Path(__file__).resolve().parents[1]


def scores(policy: KontextPolicy, records: list[IdentityRecord]) -> tuple[float, float]:
    reward = NSSMReward(FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=2), track_vsm=True)
    condition = policy.condition([r.reference for r in records], [r.prompts[0] for r in records], 32, 32, group_size=4)
    traj = rollout(policy, condition, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(0))
    outs = [reward(r.reference, traj.images[4 * i : 4 * i + 4], r.mask) for i, r in enumerate(records)]
    return tuple(torch.cat([o.components[k] for o in outs]).mean().item() for k in ("nssm", "vsm"))


def test_the_demo_model_copies_its_reference_and_the_random_model_does_not():
    folder = ROOT / "data" / "demo" / "tiny-kontext"
    assert (folder / "model_index.json").is_file()
    records = [
        IdentityRecord.from_sample(s)
        for s in wds.WebDataset(str(ROOT / "data/demo/val-000000.tar"), shardshuffle=False)
    ]
    pretrained = KontextPolicy.from_pretrained(folder, torch_dtype="float32", lora=None, max_sequence_length=32)
    assert pretrained.transformer.config.attention_head_dim == 32
    nssm, vsm = scores(pretrained, records)
    random_nssm, random_vsm = scores(KontextPolicy.tiny(seed=0, lora=None), records)
    print(f"\ndemo model nSSM {nssm:.3f} VSM {vsm:.3f}; random tiny model nSSM {random_nssm:.3f} VSM {random_vsm:.3f}")
    assert vsm > random_vsm + 0.3  # the subject's identity is there
    assert nssm < 0.6 < random_nssm  # in the reference's layout: the paradox the demo trains away


def test_the_two_subject_demo_model_draws_both_references_better_than_the_single_subject_one():
    """data/demo/tiny-kontext-multi: PSR's subject consistency and the share of subjects found, on the held-out
    two-subject conditions, against the single-subject model it was fine-tuned from (conditioned the same way)."""
    from divrl.data.stream import ConditionSample
    from divrl.rewards import (
        BackboneEmbedder,
        Group,
        PairwiseSubjectConsistency,
        PlainBackgroundDetector,
        SubjectLocator,
    )

    records = [
        IdentityRecord.from_sample(s)
        for s in wds.WebDataset(str(ROOT / "data/demo-multi/val-000000.tar"), shardshuffle=False)
    ]
    embedder = BackboneEmbedder(DenseDescriptor(grid_size=24, cell=4), size=32)
    reward = PairwiseSubjectConsistency(SubjectLocator(PlainBackgroundDetector(), "hungarian", embedder), embedder)

    def psr(folder: str) -> tuple[float, float]:
        policy = KontextPolicy.from_pretrained(ROOT / folder, torch_dtype="float32", lora=None, max_sequence_length=32)
        condition = policy.condition(
            [r.references for r in records], [r.prompts[0] for r in records], 32, 32, group_size=4
        )
        images = rollout(
            policy, condition, num_steps=4, noise_level=0.0, generator=torch.Generator().manual_seed(0)
        ).images
        outs = [
            reward(
                Group(
                    ConditionSample(r.id, r.prompts[0], r.references, r.masks, metadata=dict(r.extra)),
                    images[4 * i : 4 * i + 4],
                )
            )
            for i, r in enumerate(records)
        ]
        return (
            torch.cat([o.reward for o in outs]).mean().item(),
            torch.cat([o.components["found"] for o in outs]).mean().item(),
        )

    multi, single = psr("data/demo/tiny-kontext-multi"), psr("data/demo/tiny-kontext")
    print(
        f"\ntwo-subject model PSR {multi[0]:.3f} found {multi[1]:.3f}; single-subject {single[0]:.3f} {single[1]:.3f}"
    )
    assert multi[0] > single[0] + 0.05 and multi[1] > single[1] + 0.1


def test_the_klein_demo_model_copies_its_reference_and_the_random_model_does_not():
    """data/demo/tiny-klein (tools/make_demo_model.py --family klein) with configs/demo_klein.yaml's policy settings
    (CFG 2.0, 48 text tokens, klein's text layers 9/18/27), deterministic sampler as for Kontext, against the random
    tiny klein."""
    from divrl.policy.flux2 import Flux2KleinConfig, Flux2KleinPolicy

    folder = ROOT / "data" / "demo" / "tiny-klein"
    assert (folder / "model_index.json").is_file()
    records = [
        IdentityRecord.from_sample(s)
        for s in wds.WebDataset(str(ROOT / "data/demo/val-000000.tar"), shardshuffle=False)
    ]
    pretrained = Flux2KleinConfig(model=str(folder), lora=None, guidance_scale=2.0, max_sequence_length=48).build()
    assert pretrained.text_encoder_out_layers == (9, 18, 27) and not pretrained.is_distilled
    nssm, vsm = scores(pretrained, records)
    random_nssm, random_vsm = scores(Flux2KleinPolicy.tiny(seed=0, lora=None, guidance_scale=2.0), records)
    print(
        f"\nklein demo model nSSM {nssm:.3f} VSM {vsm:.3f}; random tiny klein nSSM {random_nssm:.3f} VSM {random_vsm:.3f}"
    )
    assert vsm > random_vsm + 0.3  # the subject's identity is there
    assert nssm < 0.6 < random_nssm  # in the reference's layout: the paradox the demo trains away


def test_the_qwen_edit_demo_model_copies_its_reference_and_the_random_model_does_not():
    """data/demo/tiny-qwen-edit (tools/make_demo_model.py --family qwen) with configs/demo_qwen_edit.yaml's policy
    settings (true CFG 2.0, references read at 32² by the VL encoder and the VAE), deterministic sampler, against the
    random tiny model."""
    from divrl.policy.qwen_image import QwenEditConfig, QwenEditPolicy

    folder = ROOT / "data" / "demo" / "tiny-qwen-edit"
    assert (folder / "model_index.json").is_file()
    records = [
        IdentityRecord.from_sample(s)
        for s in wds.WebDataset(str(ROOT / "data/demo/val-000000.tar"), shardshuffle=False)
    ]
    pretrained = QwenEditConfig(
        model=str(folder), lora=None, true_cfg_scale=2.0, condition_image_size=1024, vae_image_size=1024
    ).build()
    nssm, vsm = scores(pretrained, records)
    random_nssm, random_vsm = scores(QwenEditPolicy.tiny(seed=0, lora=None, true_cfg_scale=2.0), records)
    print(
        f"\nQwen-Image-Edit demo model nSSM {nssm:.3f} VSM {vsm:.3f}; random tiny nSSM {random_nssm:.3f} VSM "
        f"{random_vsm:.3f}"
    )
    assert vsm > random_vsm + 0.3  # the subject's identity is there
    assert nssm < 0.6 < random_nssm  # in the reference's layout: the paradox the demo trains away
