"""Pipelined scoring (``system.overlap_rewards``): chunked rollouts, groups scored in the background in order, and a
demo run whose weights are bit-identical with and without overlap while the scoring really runs during the rollout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divrl.grpo import sampler
from divrl.grpo.sampler import rollout, rollout_chunks
from divrl.rewards import NonFiniteReward, Reward, RewardOutput
from divrl.training.config import SystemConfig
from divrl.training.environment import GroupScoring, collect_scores

ROOT = Path(__file__).resolve().parents[1]


class Flaky(Reward):
    """Reward = mean brightness; NaN for identity 'nan', an error for identity 'bad'; records its threads."""

    def __init__(self):
        super().__init__()
        self.threads, self.grad = [], []

    def forward(self, group):
        self.threads.append(threading.current_thread().name)
        self.grad.append(torch.is_grad_enabled())
        if group.sample.id == "bad":
            raise ValueError("no reference mask")
        value = group.images.mean(dim=(1, 2, 3))
        return RewardOutput(value * float("nan") if group.sample.id == "nan" else value)


def _sample(name):
    from divrl.data.stream import ConditionSample

    return ConditionSample(name, "p", [torch.rand(3, 16, 16)])


def test_groups_scored_in_the_background_come_back_in_order_with_the_callers_grad_mode():
    reward, images = Flaky(), torch.rand(6, 3, 8, 8)
    samples = [_sample(n) for n in ("a", "nan", "b")]
    with torch.no_grad(), GroupScoring(reward) as scoring:
        for i, sample in enumerate(samples):
            scoring.submit(sample, images[2 * i : 2 * i + 2])
        results = scoring.results()
    assert all(name.startswith("divrl-reward") for name in reward.threads) and reward.grad == [False] * 3
    skipped = []
    scores = collect_scores(reward, samples, results, 2, torch.device("cpu"), lambda: skipped.append(1))
    assert scores.keep.tolist() == [True, False, True] and skipped == [1]
    assert torch.equal(scores.rewards[2], images[4:6].mean(dim=(1, 2, 3))) and scores.rewards[1].tolist() == [0, 0]
    assert isinstance(results[1], NonFiniteReward)


def test_a_configuration_error_is_raised_in_order_and_stops_the_inline_scoring():
    reward, images = Flaky(), torch.rand(6, 3, 8, 8)
    samples = [_sample(n) for n in ("a", "bad", "b")]
    with GroupScoring(reward, background=False) as scoring:
        for i, sample in enumerate(samples):
            scoring.submit(sample, images[2 * i : 2 * i + 2])
        results = scoring.results()
    assert reward.threads == ["MainThread"] * 2  # 'b' is not scored after the error
    with pytest.raises(ValueError, match="no reference mask"):
        collect_scores(reward, samples, results, 2, torch.device("cpu"))


def test_overlap_needs_chunks():
    with pytest.raises(ValueError, match="set system.rollout_chunk_groups too"):
        SystemConfig(overlap_rewards=True)
    with pytest.raises(ValueError, match="system.rollout_chunk_groups must be >= 1"):
        SystemConfig(rollout_chunk_groups=0)


@pytest.fixture(scope="module")
def policy_and_condition():
    from divrl.policy import KontextConfig, LoRAConfig

    policy = KontextConfig(
        model=str(ROOT / "data/demo/tiny-kontext"), lora=LoRAConfig(rank=4, alpha=4.0), max_sequence_length=32
    ).build()
    samples = [_sample("a"), _sample("b"), _sample("c")]
    return policy, policy.encode(samples, 32, 32, 2)


def test_a_chunked_rollout_hands_each_chunk_over_as_it_is_decoded(policy_and_condition):
    policy, condition = policy_and_condition
    kwargs = {"num_steps": 3, "noise_level": 0.9}
    seen = []
    chunked = rollout_chunks(
        policy,
        condition,
        4,
        on_chunk=lambda rows, images: seen.append((rows, images)),
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert [rows for rows, _ in seen] == [slice(0, 4), slice(4, 6)]
    assert torch.equal(torch.cat([images for _, images in seen]), chunked.images)
    # one chunk of the whole batch is the plain rollout, bit for bit
    whole = rollout_chunks(policy, condition, 6, generator=torch.Generator().manual_seed(0), **kwargs)
    plain = rollout(policy, condition, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(whole.latents, plain.latents) and torch.equal(whole.log_probs, plain.log_probs)
    # with one generator per sample the noise does not depend on the chunks: the same samples, up to reassociation
    per_sample = [torch.Generator().manual_seed(i) for i in range(6)]
    chunked = rollout_chunks(policy, condition, 2, generator=per_sample, **kwargs)
    per_sample = [torch.Generator().manual_seed(i) for i in range(6)]
    plain = rollout(policy, condition, generator=per_sample, **kwargs)
    assert torch.allclose(chunked.latents, plain.latents, atol=1e-5)
    assert torch.allclose(chunked.log_probs, plain.log_probs, atol=1e-4)


def demo_fit(
    root: Path, max_steps: int, *args: str, switch: int | None = 2, rewards: list | None = None, callbacks: tuple = ()
) -> dict:
    """The CPU demo for ``max_steps`` updates (stage 2 after ``switch``; one stage with ``switch=None`` and one reward
    in ``rewards``, the demo's replacement), one group per rollout chunk; its final LoRA."""
    import yaml

    from divrl.cli import main

    root.mkdir(parents=True, exist_ok=True)
    config = {
        "trainer": {
            "default_root_dir": str(root),
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "divrl.training.LoRAExporter"}, *callbacks]
            + (
                [{"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": switch}}]
                if switch is not None
                else []
            ),
        },
        "model": {"system": {"rollout_chunk_groups": 1}, **({"rewards": rewards} if rewards else {})},
    }
    (root / "overrides.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/demo.yaml"),
                "--config",
                str(root / "overrides.yaml"),
                "--trainer.max_steps",
                str(max_steps),
                *args,
            ]
        )
        == 0
    )
    return load_file(root / "lora/final/pytorch_lora_weights.safetensors")


def _fit(root: Path, *args: str) -> dict:
    return demo_fit(root, 4, *args)


@pytest.mark.slow  # two 4-update demo runs
def test_overlapped_scoring_trains_bit_identical_weights(tmp_path, monkeypatch, in_repository_root):
    sequential = _fit(tmp_path / "sequential")
    chunks, scored = [], []
    real_rollout, real_score = sampler.rollout, GroupScoring._score

    def timed_rollout(*args, **kwargs):
        start = time.perf_counter()
        out = real_rollout(*args, **kwargs)
        chunks.append((start, time.perf_counter()))
        return out

    def timed_score(self, group, ready=None):
        start = time.perf_counter()
        out = real_score(self, group, ready)
        scored.append((start, time.perf_counter(), threading.current_thread().name))
        return out

    monkeypatch.setattr(sampler, "rollout", timed_rollout)
    monkeypatch.setattr(GroupScoring, "_score", timed_score)
    overlapped = _fit(tmp_path / "overlapped", "--model.system.overlap_rewards", "true")
    assert overlapped.keys() == sequential.keys() and all(torch.equal(overlapped[k], sequential[k]) for k in sequential)
    assert scored and all(name.startswith("divrl-reward") for *_, name in scored)
    # the first group's scoring started before the second chunk's rollout ended: it ran during that rollout
    assert any(s_start < c_end and c_start < s_end for s_start, s_end, _ in scored for c_start, c_end in chunks)
