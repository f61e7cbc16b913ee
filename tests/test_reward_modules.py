"""Reward modules: the reference is encoded once per group, components match the functions, failures raise."""

import textwrap

import pytest
import torch
from jsonargparse import ArgumentParser

from divrl.rewards import (
    FeatureScorer,
    GatedReward,
    GroupReward,
    LinearReward,
    NonFiniteReward,
    NSSMReward,
    VSMReward,
)
from divrl.rewards import (
    functional as RF,
)
from divrl.rewards.backbones import CallableBackbone, DenseDescriptor


class CountingBackbone(CallableBackbone):
    """A random-projection backbone that records the batch size of every call."""

    def __init__(self):
        weight = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        super().__init__(lambda x: (torch.nn.functional.conv2d(x, weight, stride=4), x[:, :, ::4, ::4]), grid_size=8)
        self.calls = []

    def extract(self, images):
        self.calls.append(images.shape[0])
        return super().extract(images)


def group(g=6, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=gen), torch.rand(g, 3, size, size, generator=gen)


def test_reference_encoded_once_and_components_match_functions():
    backbone = CountingBackbone()
    reward = GatedReward(FeatureScorer(backbone, pool=2, tau_s=0.3, tau_v=0.3), threshold=0.5, weight=5.0)
    ref, images = group()
    out = reward(ref, images)
    assert backbone.calls == [1, 6]  # one reference pass, one batched pass for the G samples
    fr, fg = backbone(ref), backbone(images)
    n = RF.nssm(fg.visual, fr.visual, pool=2)
    v = RF.vsm(fg.semantic, fg.visual, fr.semantic, fr.visual, tau_s=0.3, tau_v=0.3)
    assert torch.allclose(out.components["nssm"], n) and torch.allclose(out.components["vsm"], v)
    assert torch.allclose(out.reward, RF.gated_reward(n, v, 0.5, 5.0))
    assert torch.equal(out.gated, v < 0.5)
    assert out.reward.shape == (6,) and out.reward.dtype == torch.float32


def test_penalty_fires_exactly_below_the_gate():
    ref, images = group(g=4)
    scorer = FeatureScorer(DenseDescriptor(grid_size=8, cell=4))
    r1 = NSSMReward(scorer)(ref, images)
    for s in (0.0, 1.0):  # the gate's range is [0, 1] (outside it is refused); every VSM here is 1
        r2 = GatedReward(scorer, threshold=s, weight=5.0)(ref, images)
        assert torch.allclose(r2.reward, r1.reward) and not r2.gated.any()  # nobody below 0, nor below 1 (strict)
    # tau_v 1: no cell's visual cosine exceeds it, every VSM is 0: everybody is below 1 -> penalty 5 (1 - vsm)^2
    r2 = GatedReward(FeatureScorer(DenseDescriptor(grid_size=8, cell=4), tau_v=1.0), threshold=1.0, weight=5.0)(
        ref, images
    )
    assert r2.gated.all() and (r2.components["vsm"] < 1).all()
    assert torch.allclose(r2.reward, r1.components["nssm"] - 5 * (1.0 - r2.components["vsm"]) ** 2)


def test_track_vsm_switch_and_vsm_only_reward():
    backbone = CountingBackbone()
    ref, images = group()
    out = NSSMReward(FeatureScorer(backbone), track_vsm=False)(ref, images)
    assert list(out.components) == ["nssm"]
    assert torch.equal(out.reward, out.components["nssm"])
    only = VSMReward(FeatureScorer(backbone), track_nssm=False)(ref, images)
    assert list(only.components) == ["vsm"] and torch.equal(only.reward, only.components["vsm"])
    tracked = VSMReward(FeatureScorer(backbone))(ref, images)  # nSSM logged by default, the reward still VSM alone
    assert torch.equal(tracked.reward, only.reward) and torch.equal(tracked.components["nssm"], out.reward)


def test_linear_reward_module():
    ref, images = group()
    scorer = FeatureScorer(CountingBackbone(), tau_s=0.3, tau_v=0.3)
    out = LinearReward(scorer, weight=0.3)(ref, images)
    assert torch.allclose(out.reward, 0.3 * out.components["vsm"] + 0.7 * out.components["nssm"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LinearReward(scorer, weight=1.5)


def test_max_batch_chunks_give_the_same_scores_and_keep_shared_features():
    ref, images = group(g=7)
    full = GatedReward(FeatureScorer(DenseDescriptor(grid_size=8, cell=4, max_batch=None)))(ref, images)
    chunked = GatedReward(FeatureScorer(DenseDescriptor(grid_size=8, cell=4, max_batch=3)))(ref, images)
    for a, b in zip([full.reward, *full.components.values()], [chunked.reward, *chunked.components.values()]):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    calls = []
    shared = CallableBackbone(lambda x: calls.append(len(x)) or x[:, :, ::4, ::4], grid_size=8, max_batch=3)
    features = shared(images)
    assert calls == [3, 3, 1] and features.semantic is features.visual and features.semantic.shape[0] == 7


def test_masks_at_image_resolution():
    backbone = CountingBackbone()
    scorer = FeatureScorer(backbone, pool=2)
    ref, images = group()
    mask = torch.zeros(32, 32)
    mask[8:24, 4:28] = 1.0  # exactly cells 2..5 x 1..6 of the 8x8 grid
    out = NSSMReward(scorer, track_vsm=False)(ref, images, ref_mask=mask)
    fr, fg = backbone(ref), backbone(images)
    grid_mask = torch.zeros(1, 8, 8)
    grid_mask[0, 2:6, 1:7] = 1.0
    assert torch.allclose(out.components["nssm"], RF.nssm(fg.visual, fr.visual, grid_mask, pool=2))


def test_empty_reference_mask_fails_fast():
    scorer = FeatureScorer(DenseDescriptor(grid_size=8, cell=4))
    ref, images = group()
    with pytest.raises(ValueError, match="the subject mask covers 0 cell"):
        GatedReward(scorer)(ref, images, ref_mask=torch.zeros(32, 32))


def test_non_finite_scores_raise_never_zero():
    nan_backbone = CallableBackbone(lambda x: torch.full((x.shape[0], 4, 8, 8), float("nan")), grid_size=8)
    ref, images = group()
    with pytest.raises(NonFiniteReward, match="non-finite nssm"):
        NSSMReward(FeatureScorer(nan_backbone))(ref, images)


def test_scorer_type_is_checked():
    with pytest.raises(TypeError, match="wrap a backbone as FeatureScorer"):
        NSSMReward(DenseDescriptor())


def test_callable_backbone_from_dotted_path_and_bad_output():
    bb = CallableBackbone("torch.nn.functional.relu", grid_size=4)
    out = bb(torch.rand(2, 3, 4, 4))
    assert out.semantic is out.visual
    with pytest.raises(ValueError, match="cannot import"):
        CallableBackbone("divrl.no_such_module.fn")
    bad = CallableBackbone(lambda x: x.mean(), grid_size=4)
    with pytest.raises(ValueError, match="expected \\(2, C, H, W\\)"):
        bad(torch.rand(2, 3, 4, 4))


def test_reward_modules_are_configurable_from_yaml(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(
        textwrap.dedent(
            """
            reward:
              class_path: divrl.rewards.GatedReward
              init_args:
                threshold: 0.4
                weight: 3.0
                scorer:
                  class_path: divrl.rewards.FeatureScorer
                  init_args:
                    pool: 4
                    tau_s: 0.6
                    backbone:
                      class_path: divrl.rewards.backbones.DenseDescriptor
                      init_args: {grid_size: 16, cell: 4}
            """
        )
    )
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_subclass_arguments(GroupReward, "reward")
    cfg = parser.instantiate(parser.parse_args([f"--config={config}"]))
    reward = cfg.reward
    assert isinstance(reward, GatedReward) and reward.threshold == 0.4 and reward.weight == 3.0
    assert reward.scorer.pool == 4 and reward.scorer.tau_s == 0.6 and reward.scorer.backbone.grid_size == 16
    ref, images = group(g=3, size=64)
    assert reward(ref, images).reward.shape == (3,)
