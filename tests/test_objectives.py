"""SFT, DPO (pairwise, group, shard pairs) and DiffusionNFT on the tiny demo model, through the Objective seam without
Lightning: SFT lowers the held-out flow-matching loss of the demo pairs; one preference update moves the policy the
way each loss says (the winner's likelihood rises); the batches hold what the losses need. The preference and NFT
tests run on both families' demo models (FLUX.1 Kontext, and FLUX.2 klein with its guided velocity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from divrl.data.stream import SkipCounter, read_identities, to_condition
from divrl.grpo import rollout
from divrl.objectives import DPOObjective, GroupDPOObjective, NFTObjective, SamplingConfig, Scores, SFTObjective
from divrl.objectives.flow import TimestepSampling, flow_error, noised
from divrl.objectives.sft import flow_matching_loss, target_latents
from divrl.policy import KontextConfig, LoRAConfig
from divrl.rewards.base import RewardOutput

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def demo_samples(split: str, count: int, prompt: int = 0):
    records = list(read_identities(sorted(str(p) for p in (ROOT / "data/demo").glob(f"{split}-*.tar")), SkipCounter(5)))
    return [to_condition(r, prompt) for r in records[:count]]


FAMILIES = ("kontext", "klein")


def demo_policy(family: str = "kontext"):
    """A demo model with a fresh LoRA: ``data/demo/tiny-kontext``, or ``data/demo/tiny-klein`` sampled with CFG 2.0 as
    ``configs/demo_klein.yaml`` samples it."""
    lora = LoRAConfig(rank=8, alpha=16.0)
    if family == "klein":
        from divrl.policy.flux2 import Flux2KleinConfig

        return Flux2KleinConfig(
            model=str(ROOT / "data/demo/tiny-klein"), lora=lora, guidance_scale=2.0, max_sequence_length=48
        ).build()
    return KontextConfig(model=str(ROOT / "data/demo/tiny-kontext"), lora=lora, max_sequence_length=32).build()


class Env:
    """The run's services as the training module offers them, with a reward of the images' mean red minus blue."""

    def __init__(self, policy, group_size: int = 4):
        self.policy, self.step = policy, 0
        self.sampling = SamplingConfig(
            group_size=group_size, num_steps=4, noise_level=0.0, resolution=SIZE, val_group_size=2
        )

    def rollout(self, samples, group_size, generator, *, num_steps=None, noise_level=None, sde_steps=None):
        cond = self.policy.encode(samples, SIZE, SIZE, group_size)
        return cond, rollout(self.policy, cond, num_steps=4, noise_level=noise_level or 0.0, generator=generator)

    def score(self, samples, images, group_size):
        red = (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).view(len(samples), group_size)
        outputs = [RewardOutput(row, {"red": row, "half": row / 2}) for row in red]
        return Scores(red, torch.ones(len(samples), dtype=torch.bool), outputs)

    def rollout_and_score(self, samples, group_size, generator, *, noise_level=None, sde_steps=None):
        cond, trajectory = self.rollout(samples, group_size, generator, noise_level=noise_level, sde_steps=sde_steps)
        return cond, trajectory, self.score(samples, trajectory.images, group_size)

    def all_gather(self, tensor):
        return tensor


def step(policy, objective, batch, lr: float):
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    for items in objective.updates(batch, torch.Generator().manual_seed(0)):
        for item in items:
            loss, _ = objective.loss(policy, batch, item)
            (loss / len(items)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_demo_shards_hold_a_target_per_prompt_in_the_asked_pose():
    sample = demo_samples("val", 1, prompt=2)[0]
    assert sample.target is not None and sample.target.size == sample.references[0].size
    assert sample.rejected is None
    assert sample.target.tobytes() != sample.references[0].tobytes()


def test_sft_lowers_the_held_out_flow_matching_loss_on_the_demo_pairs():
    torch.manual_seed(0)
    policy = demo_policy()
    held_out = demo_samples("val", 8)
    cond = policy.encode(held_out, SIZE, SIZE)
    x0, has = target_latents(policy, held_out, SIZE)
    assert has.all()
    sigmas = torch.tensor([0.2, 0.5, 0.8])
    before = flow_matching_loss(policy, cond, x0, sigmas, torch.Generator().manual_seed(0))
    objective = SFTObjective(timesteps=TimestepSampling("uniform"), timesteps_per_sample=2, micro_batch_size=8)
    env = Env(policy)
    train = [demo_samples("train", 24, prompt=p) for p in range(4)]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    for i in range(12):
        batch = objective.collect(policy, train[i % 4][(i // 4) * 8 % 24 :][:8], env, torch.Generator().manual_seed(i))
        for items in objective.updates(batch, torch.Generator().manual_seed(i)):
            for item in items:
                loss, stats = objective.loss(policy, batch, item)
                (loss / len(items)).backward()
            optimizer.step()
            optimizer.zero_grad()
    after = flow_matching_loss(policy, cond, x0, sigmas, torch.Generator().manual_seed(0))
    assert (after < before).all(), (before, after)
    assert after.mean() < 0.95 * before.mean()  # measured: 0.588 -> 0.535 in 12 updates


def test_sft_decay_schedules():
    policy = demo_policy()
    samples = demo_samples("train", 2)
    env = Env(policy)
    ranged = SFTObjective(
        timesteps=TimestepSampling("uniform"), timesteps_per_sample=64, decay="range", decay_steps=10, decay_to=0.5
    )
    env.step = 5  # halfway: the top σ is 0.75
    batch = ranged.collect(policy, samples, env, torch.Generator().manual_seed(0))
    assert batch.sigmas.max() <= 0.75 and batch.sigmas.max() > 0.6 and (batch.weights == 1).all()
    weighted = SFTObjective(
        timesteps=TimestepSampling("uniform"), timesteps_per_sample=8, decay="weight", decay_steps=10, decay_to=0.5
    )
    env.step = 20  # past the end: w = 1 − 0.5·σ
    batch = weighted.collect(policy, samples, env, torch.Generator().manual_seed(0))
    assert torch.allclose(batch.weights, 1 - 0.5 * batch.sigmas)


def test_rpo_alphas_a_condition_without_target_zero():
    policy = demo_policy()
    samples = demo_samples("train", 2)
    samples[1].target = None
    batch = SFTObjective().collect(policy, samples, Env(policy), torch.Generator().manual_seed(0))
    assert batch.weights[:, 0].tolist() == [1.0, 0.0] and batch.usable == 1 and "--targets" in batch.missing
    loss, stats = SFTObjective().loss(policy, batch, (torch.tensor([1]), 0))
    loss.backward()
    assert loss.item() == 0 and stats["fm_loss"] > 0  # the error is there, its weight is 0: no gradient
    assert all(p.grad is None or not p.grad.any() for p in policy.trainable_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_pairwise_dpo_pairs_best_and_worst_with_margins_and_raises_the_winners_likelihood(family):
    torch.manual_seed(0)
    policy = demo_policy(family)
    samples = demo_samples("train", 2)
    env = Env(policy, group_size=4)
    objective = DPOObjective(beta=50.0, margin={"red": 2.0, "half": 1.0}, micro_batch_size=4, timesteps_per_sample=1)
    batch = objective.collect(policy, samples, env, torch.Generator().manual_seed(0))
    rewards = env.score(samples, batch.images, 4).rewards
    for i, (w, lose) in enumerate(batch.pairs.tolist()):
        assert w == i * 4 + int(rewards[i].argmax()) and lose == i * 4 + int(rewards[i].argmin())
        gap = rewards[i].max() - rewards[i].min()
        assert batch.margins[i].item() == pytest.approx(2.5 * gap.item(), rel=1e-5)  # 2·gap + 1·gap/2
    one = DPOObjective(beta=50.0)  # one pair: a small step must raise its winner's likelihood against the loser's
    batch = one.collect(policy, samples[:1], env, torch.Generator().manual_seed(0))
    assert implicit_margins(policy, one, batch).abs().max() < 1e-6  # the fresh adapter is the reference
    step(policy, one, batch, lr=0.1)
    assert implicit_margins(policy, one, batch).item() > 0  # the winner's error fell relative to its loser's


def implicit_margins(policy, objective, batch):
    with torch.no_grad():
        err, ref = objective._errors(policy, batch, batch.pairs, batch.cond_rows, batch.noise[:, 0], batch.sigmas[:, 0])
    return -0.5 * ((err[:, 0] - ref[:, 0]) - (err[:, 1] - ref[:, 1]))


def test_all_pairs_above_a_gap_are_weighted_and_the_rest_padded():
    policy = demo_policy()
    env = Env(policy, group_size=4)
    objective = DPOObjective(pairs_per_group=6, min_gap=0.0)
    batch = objective.collect(policy, demo_samples("train", 1), env, torch.Generator().manual_seed(0))
    rewards = env.score(demo_samples("train", 1), batch.images, 4).rewards[0]
    assert len(batch.pairs) == 6
    gaps = torch.tensor([rewards[w] - rewards[lose] for w, lose in batch.pairs.tolist()])
    assert (gaps >= 0).all() and torch.equal(gaps, gaps.sort(descending=True).values)
    with pytest.raises(ValueError, match="a group has 6 pairs"):
        DPOObjective(pairs_per_group=7).check(env.sampling)


@pytest.mark.parametrize("family", FAMILIES)
def test_group_dpo_weights_margins_and_the_direction_of_an_update(family):
    torch.manual_seed(0)
    policy = demo_policy(family)
    samples = demo_samples("train", 2)
    env = Env(policy, group_size=4)
    objective = GroupDPOObjective(beta=50.0, margin={"red": 1.0})
    batch = objective.collect(policy, samples, env, torch.Generator().manual_seed(1))
    rewards = env.score(samples, batch.images, 4).rewards
    adv = batch.advantages
    std = rewards.std(1, unbiased=False, keepdim=True)
    assert torch.allclose(adv, ((rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)).clamp(-5, 5), atol=1e-5)
    pos, neg = adv.clamp(min=0), (-adv).clamp(min=0)
    expected = (pos * rewards).sum(1) / pos.sum(1) - (neg * rewards).sum(1) / neg.sum(1)
    assert torch.allclose(batch.margins, expected, atol=1e-5)
    batch = GroupDPOObjective(beta=50.0).collect(policy, samples[:1], env, torch.Generator().manual_seed(1))
    step(policy, objective, batch, lr=0.1)
    with torch.no_grad():
        err, ref = objective._errors(policy, batch, batch.pairs, batch.cond_rows, batch.noise[:, 0], batch.sigmas[:, 0])
    scores, pos, neg = -(err - ref), batch.advantages.clamp(min=0), (-batch.advantages).clamp(min=0)
    assert ((pos * scores).sum(1) / pos.sum(1) > (neg * scores).sum(1) / neg.sum(1)).all()  # R₊ − R₋ rose from 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_on_shard_preference_pairs(family):
    policy = demo_policy(family)
    samples = demo_samples("train", 2)
    samples[0].rejected = samples[0].references[0]  # chosen: the asked pose; rejected: a copy of the reference
    objective = DPOObjective(pairs="shards", beta=50.0)
    batch = objective.collect(policy, samples, Env(policy), torch.Generator().manual_seed(0))
    assert batch.weights.tolist() == [1.0, 0.0]  # the second condition has no rejected image
    chosen = policy.encode_images([samples[0].target], SIZE, SIZE)
    assert torch.equal(batch.x0[batch.pairs[0, 0]], chosen[0])
    assert batch.cond_rows.tolist() == [[0, 0], [1, 1]]
    step(policy, objective, batch, lr=0.1)
    assert implicit_margins(policy, objective, batch)[0] > 0
    with pytest.raises(ValueError, match="pairs: shards has none .* set margin: {}"):
        DPOObjective(pairs="shards", margin={"reward": 1.0})


@pytest.mark.parametrize("family", FAMILIES)
def test_nft_records_old_velocities_and_moves_towards_positives_and_away_from_negatives(family):
    torch.manual_seed(0)
    policy = demo_policy(family)
    samples = demo_samples("train", 2)
    env = Env(policy, group_size=4)
    objective = NFTObjective(beta=1.0, adaptive_weight=False, micro_batch_size=8)
    batch = objective.collect(policy, samples[:1], env, torch.Generator().manual_seed(0))
    x0, noise, sigma = batch.x0, batch.noise[:, 0], batch.sigmas[:, 0]
    with torch.no_grad():
        v = policy.velocity(noised(x0, noise, sigma), sigma, batch.condition)
    assert torch.equal(v, batch.old_velocity[:, 0])  # the old policy is the policy that rolled out
    before = flow_error(v, x0, noise)
    step(policy, objective, batch, lr=0.1)
    with torch.no_grad():
        after = flow_error(policy.velocity(noised(x0, noise, sigma), sigma, batch.condition), x0, noise)
    best, worst = batch.r.argmax(), batch.r.argmin()
    assert batch.r[best] > 0.5 > batch.r[worst]
    assert after[best] < before[best] and after[worst] > before[worst]


def test_shard_entries_round_trip(tmp_path):
    from divrl.data.schema import IdentityRecord

    image = Image.new("RGB", (8, 8), (200, 10, 10))
    record = IdentityRecord("x", image, ["a", "b"], targets={1: image}, rejected={1: Image.new("RGB", (8, 8))})
    back = IdentityRecord.from_sample(record.to_sample())
    assert set(back.targets) == {1} and set(back.rejected) == {1}
    assert to_condition(back, 1).target.tobytes() == image.tobytes() and to_condition(back, 0).target is None
    with pytest.raises(ValueError, match="rejected image but no target"):
        IdentityRecord("x", image, ["a"], rejected={0: image})
    with pytest.raises(ValueError, match="prompt 3"):
        IdentityRecord("x", image, ["a"], targets={3: image})


def test_the_rpo_alpha_adds_the_winners_and_positives_flow_matching_error():
    policy = demo_policy()
    env = Env(policy, group_size=4)
    samples = demo_samples("train", 1)
    item = (torch.tensor([0]), 0)
    for plain, regularised in (
        (DPOObjective(beta=50.0), DPOObjective(beta=50.0, rpo_alpha=2.0)),
        (GroupDPOObjective(beta=50.0), GroupDPOObjective(beta=50.0, rpo_alpha=2.0)),
    ):
        batch = plain.collect(policy, samples, env, torch.Generator().manual_seed(0))
        with torch.no_grad():
            base, _ = plain.loss(policy, batch, item)
            added, _ = regularised.loss(policy, batch, item)
            err, _ = plain._errors(
                policy, batch, batch.pairs[:1], batch.cond_rows[:1], batch.noise[:1, 0], batch.sigmas[:1, 0]
            )
        if batch.advantages is None:  # the winner's error
            expected = 2.0 * err[0, 0]
        else:  # the positives' |advantage|-weighted error
            pos = batch.advantages[0].clamp(min=0)
            expected = 2.0 * (pos / pos.sum() * err[0]).sum()
        assert (added - base).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dpo_with_full_fine_tuning_compares_against_the_frozen_copy():
    """Full fine-tuning has no adapter to switch off: DPO's reference is the frozen copy of the initial network (kept
    by the training module when the objective needs_reference), so the first implicit margin is exactly 0 and grows
    once the network trains."""
    from divrl.policy import KontextPolicy

    policy = KontextPolicy.tiny(seed=1, train_transformer=True)
    objective = DPOObjective(beta=50.0)
    assert objective.needs_reference
    with pytest.raises(RuntimeError, match="keep_reference"):
        with policy.reference_policy():
            pass
    policy.keep_reference()
    env = Env(policy, group_size=4)
    batch = objective.collect(policy, demo_samples("train", 1), env, torch.Generator().manual_seed(0))
    assert implicit_margins(policy, objective, batch).item() == 0
    step(policy, objective, batch, lr=1e-3)
    assert implicit_margins(policy, objective, batch).item() > 0


def test_nft_gives_skipped_groups_r_one_half():
    policy = demo_policy()

    class HalfSkipped(Env):
        def score(self, samples, images, group_size):
            scores = super().score(samples, images, group_size)
            scores.keep[1] = False
            return scores

    batch = NFTObjective().collect(
        policy, demo_samples("train", 2), HalfSkipped(policy), torch.Generator().manual_seed(0)
    )
    assert (batch.r[4:] == 0.5).all() and not (batch.r[:4] == 0.5).all()


@pytest.mark.parametrize(
    ("objective", "distribution"),
    [("SFTObjective", "logit_normal"), ("NFTObjective", "uniform"), ("GroupDPOObjective", "uniform")],
)
def test_a_partial_timesteps_mapping_keeps_the_objectives_default_distribution(objective, distribution, tmp_path):
    from divrl.cli import run_lightning

    cli = run_lightning(
        ["--config", str(ROOT / "configs/demo.yaml"), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    cfg = cli.parser.parse_args(
        [
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--model.objective",
            f"divrl.objectives.{objective}",
            "--model.objective.timesteps",
            '{"low": 0.5}',
        ]
    )
    parsed = cli.parser.instantiate_classes(cfg).model.objectives[0]
    assert parsed.timesteps.distribution == distribution and parsed.timesteps.low == 0.5
