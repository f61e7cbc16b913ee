"""Bad settings a second fuzz of `divrl fit` found in the rewards, the objectives and the policy: each was accepted
and then trained silently wrong (a gate that never fires, a penalty turned into a bonus, every VSM 0), ended minutes
later in "non-finite loss" or "nothing to train on", printed peft's traceback, or blamed the model's download. Each is
refused when the config is read, with one sentence naming the setting and the fix (what ``divrl`` prints, without
traceback)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from divrl.cli import expected_error
from divrl.objectives import DPOObjective, GroupDPOObjective, GRPOObjective, NFTObjective, SFTObjective
from divrl.objectives.flow import TimestepSampling
from divrl.policy import KontextConfig
from divrl.policy.lora import LoRAConfig, add_adapter
from divrl.rewards import FeatureScorer, GatedReward, LinearReward
from divrl.rewards.backbones import DenseDescriptor
from divrl.rewards.compose import CallableReward, WeightedReward

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
IDGLOW = str(ROOT / "configs/demo_idglow.yaml")
NAN, INF = math.nan, math.inf


def refused(build, *needles: str) -> str:
    """``build()`` raises a ValueError that divrl prints as its sentence alone, holding every needle."""
    with pytest.raises(ValueError) as info:
        build()
    message = expected_error(info.value)
    assert message == str(info.value) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def scorer(**kwargs) -> FeatureScorer:
    return FeatureScorer(DenseDescriptor(grid_size=8, cell=4), **kwargs)


# ------------------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "name, value",
    [("threshold", -1.0), ("threshold", 1.5), ("threshold", NAN), ("weight", -5.0), ("weight", NAN), ("weight", INF)],
)
def test_gated_reward_refuses_a_gate_outside_0_1_and_a_weight_that_is_negative_or_not_finite(name, value):
    refused(
        lambda: GatedReward(scorer(), **{name: value}), f"GatedReward: init_args.{name}", repr(value), "model.rewards"
    )


def test_gated_reward_keeps_the_edges_of_its_ranges():
    assert GatedReward(scorer(), threshold=0.0, weight=0.0).threshold == 0.0
    assert GatedReward(scorer(), threshold=1, weight=5).weight == 5.0


@pytest.mark.parametrize("value", [NAN, INF, 1.5, -0.1])
def test_linear_reward_refuses_a_weight_outside_0_1(value):
    refused(lambda: LinearReward(scorer(), weight=value), "LinearReward: init_args.weight", "[0, 1]")


@pytest.mark.parametrize("name, value", [("tau_s", 2.0), ("tau_s", NAN), ("tau_v", -0.1), ("tau_v", INF)])
def test_feature_scorer_refuses_thresholds_outside_0_1(name, value):
    refused(lambda: scorer(**{name: value}), f"FeatureScorer: init_args.{name}", "[0, 1]", "model.rewards[i]")


def test_weighted_reward_refuses_a_weight_that_is_not_finite_and_keeps_negative_ones():
    parts = [GatedReward(scorer()), LinearReward(scorer())]
    refused(lambda: WeightedReward(parts, weights=[1.0, NAN]), "WeightedReward: init_args.weights[1]")
    assert WeightedReward(parts, weights=[1.0, -0.5]).weights == [1.0, -0.5]  # a penalty


def test_callable_reward_refuses_a_name_its_own_metrics_use():
    def reward(images, prompts, metadata):  # a function called "reward": its component would clash
        return [0.0] * len(images)

    refused(lambda: CallableReward(reward), "CallableReward: init_args.name 'reward'", "another name")
    assert CallableReward(reward, name="brightness").name == "brightness"


# ---------------------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("name, value", [("mean", NAN), ("std", INF), ("shift", INF), ("low", NAN), ("high", NAN)])
def test_timesteps_refuse_settings_that_are_not_finite(name, value):
    refused(lambda: TimestepSampling(**{name: value}), f"objective.timesteps.{name} must be a finite number")
    refused(
        lambda: SFTObjective(timesteps={"distribution": "logit_normal", name: value}), f"objective.timesteps.{name}"
    )


@pytest.mark.parametrize("make", [DPOObjective, GroupDPOObjective])
def test_dpo_margins_that_are_not_finite_are_refused(make):
    refused(lambda: make(margin={"vsm": NAN, "nssm": 1.0}), "objective.margin", "['vsm']", "margin: {}")
    assert make(margin={"vsm": 2.0}).margin == {"vsm": 2.0}


@pytest.mark.parametrize(
    "make, name, value",
    [
        (DPOObjective, "min_gap", NAN),
        (DPOObjective, "min_gap", INF),
        (DPOObjective, "rpo_alpha", INF),
        (GroupDPOObjective, "noise_level", INF),
        (GroupDPOObjective, "adv_clip", NAN),
        (NFTObjective, "adv_clip", INF),
        (NFTObjective, "noise_level", INF),
        (GRPOObjective, "kl_beta", NAN),
        (GRPOObjective, "kl_beta", INF),
        (GRPOObjective, "clip_range", NAN),
        (GRPOObjective, "adv_clip", NAN),
        (GRPOObjective, "adv_clip", 0.0),
    ],
)
def test_objective_settings_that_are_not_finite_are_refused(make, name, value):
    refused(lambda: make(**{name: value}), f"objective.{name}", repr(value))


@pytest.mark.parametrize(
    "make, name, value",
    [
        (GRPOObjective, "adv_clip", INF),
        (GRPOObjective, "adv_clip", None),
        (GRPOObjective, "clip_range", INF),
        (GroupDPOObjective, "adv_clip", INF),
    ],
)
def test_an_infinite_clip_still_turns_clipping_off(make, name, value):
    """``adv_clip`` / ``clip_range`` ``.inf`` (GRPO's ``adv_clip: null`` too) clip nothing: valid, not refused (NFT's
    ``adv_clip`` is different: at inf every r is 1/2 and nothing trains)."""
    assert getattr(make(**{name: value}), name) == value


def test_numpy_scalars_are_numbers():
    assert GatedReward(scorer(), threshold=np.float32(0.5), weight=np.int64(5)).weight == 5.0
    assert WeightedReward([LinearReward(scorer())], weights=[np.float32(2.0)]).weights == [2.0]
    assert TimestepSampling(mean=np.float32(0.5)).mean == 0.5


def test_dpo_pairs_per_group_above_the_groups_pairs_names_the_bound():
    message = refused(
        lambda: DPOObjective(pairs_per_group=100).check(SimpleNamespace(group_size=8)),
        "objective.pairs_per_group 100",
        "set objective.pairs_per_group <= 28, or raise sampling.group_size",
    )
    assert "group_size >= 2" not in message  # the group is 8
    refused(lambda: DPOObjective().check(SimpleNamespace(group_size=1)), "sampling.group_size 1", "at least 2")


def test_dpo_shard_pairs_with_a_margin_show_it_and_how_to_clear_it():
    refused(
        lambda: DPOObjective(pairs="shards", margin={"vsm": 1.0}),
        "objective.margin {'vsm': 1.0}",
        "set margin: {}",
        "pairs: online",
    )


# -------------------------------------------------------------------------------------------------------- policy


def test_torch_dtype_typo_is_refused_when_the_config_is_read():
    refused(lambda: KontextConfig(model="tiny", torch_dtype="bfloat61"), "policy.torch_dtype", "'bfloat61'", "bfloat16")
    for dtype in ("auto", "bfloat16", "bf16", "float32"):
        assert KontextConfig(model="tiny", torch_dtype=dtype).torch_dtype == dtype


@pytest.mark.parametrize(
    "targets, unmatched",
    [(("attn.to_qq",), "['attn.to_qq']"), (("attn.to_q", "attn.to_kk"), "['attn.to_kk']"), (("attn",), "['attn']")],
)
def test_lora_targets_that_match_no_layer_are_named_with_targets_that_would(targets, unmatched):
    from divrl.policy.tiny import tiny_kontext_components

    network = tiny_kontext_components(0)["transformer"]
    refused(
        lambda: add_adapter(network, LoRAConfig(rank=4, target_modules=targets)),
        f"policy.lora.target_modules {unmatched} match no Linear layer",
        "attn.to_q, attn.to_k",
        "proj_mlp",
    )


# ---------------------------------------------------------------------------------------------------------- fit


def fit(config: str, tmp_path, *more: str) -> list[str]:
    return [
        "fit",
        "--config",
        config,
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        *more,
    ]


GATED = """model:
  rewards:
    - class_path: divrl.rewards.GatedReward
      init_args:
        threshold: {threshold}
        scorer: {{class_path: divrl.rewards.FeatureScorer, init_args: {{backbone: {{class_path:
          divrl.rewards.backbones.DenseDescriptor}}, tau_s: {tau_s}}}}}
"""


@pytest.mark.parametrize(
    "threshold, tau_s, needle",
    [(-1.0, 0.7, "GatedReward: init_args.threshold"), (0.5, 2.0, "FeatureScorer: init_args.tau_s")],
)
def test_fit_refuses_a_silent_reward_setting_before_the_model_loads(
    console, no_model, tmp_path, threshold, tau_s, needle
):
    config = tmp_path / "reward.yaml"
    config.write_text(GATED.format(threshold=threshold, tau_s=tau_s))
    code, printed = console(*fit(DEMO, tmp_path, "--config", str(config)))
    assert code == 1 and needle in printed.err and "Traceback" not in printed.err, printed.err


@pytest.mark.parametrize(
    "more, needle",
    [
        (("--model.policy.torch_dtype", "bfloat61"), "divrl fit: policy.torch_dtype (or 'auto'): dtype must be one of"),
        (
            (
                "--model.objective",
                "[{class_path: divrl.objectives.SFTObjective, init_args: {timesteps: {mean: .nan}}}, "
                "{class_path: divrl.objectives.GroupDPOObjective, init_args: {margin: {vsm: .nan}}}]",
            ),
            "objective.timesteps.mean must be a finite number",
        ),
        (
            (
                "--model.objective",
                "[{class_path: divrl.objectives.SFTObjective}, "
                "{class_path: divrl.objectives.GroupDPOObjective, init_args: {margin: {vsm: .nan}}}]",
            ),
            "objective.margin {'vsm': nan} gives ['vsm'] a weight that is not a finite number",
        ),
        (
            (
                "--model.objective",
                "[{class_path: divrl.objectives.SFTObjective}, "
                "{class_path: divrl.objectives.DPOObjective, init_args: {min_gap: .nan}}]",
            ),
            "objective.min_gap must be a finite number, got nan",
        ),
    ],
)
def test_fit_refuses_non_finite_objective_settings_and_a_dtype_typo_before_the_model_loads(
    console, no_model, tmp_path, more, needle
):
    code, printed = console(*fit(IDGLOW, tmp_path, *more))
    assert code == 1 and needle in printed.err and "Traceback" not in printed.err, printed.err
    assert "neither a local diffusers folder" not in printed.err


def test_fit_names_lora_targets_that_match_nothing_without_a_traceback(console, tmp_path):
    code, printed = console(*fit(DEMO, tmp_path, "--model.policy.lora.target_modules", "[attn.to_qq]"))
    assert code == 1 and "Traceback" not in printed.err and "NoMatchingPeftModuleError" not in printed.err, printed.err
    assert "policy.lora.target_modules ['attn.to_qq'] match no Linear layer" in printed.err, printed.err
