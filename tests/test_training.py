"""`divrl fit` on the demo config, diffusers-training-test style: run a few steps, then assert on the artifacts
(LoRA files, checkpoints, stage switch, logged metrics), resume, configs, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.lora_parity import assert_lora_reproduced_by_diffusers
from safetensors.torch import load_file

from divrl.cli import main, run_lightning
from divrl.policy import KontextConfig
from divrl.policy.compute import UnitForward
from divrl.policy.flops import transformer_flops

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SWITCH = 2

EXPECTED_METRICS = {
    "reward/mean",
    "reward/std",
    "reward/nssm",
    "reward/vsm",
    "reward/gated_fraction",
    "train/loss",
    "train/policy_loss",
    "train/clip_fraction",
    "train/approx_kl",
    "train/ratio_mean",
    "train/ratio_max_dev",
    "train/grad_norm",
    "train/lr",
    "train/stage",
    "time/rollout",
    "time/reward",
    "time/update",
    "data/skipped_samples",
    "train/skipped_groups",
    "train/skipped_updates",
    "train/empty_rollouts",
    "perf/rollout_tflops",
    "perf/update_tflops",
}


def overrides(tmp_path: Path, **extra) -> Path:
    """A second config: CSV logs, a stage switch after SWITCH updates, a grid and a checkpoint every rollout."""
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": SWITCH}},
                {"class_path": "divrl.training.LoRAExporter"},
                {"class_path": "divrl.training.RolloutImageLogger", "init_args": {"every_n_rollouts": 1}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
                },
            ],
        },
        **extra,
    }
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(tmp_path: Path, max_steps: int, *args: str) -> None:
    code = main(
        [
            "fit",
            "--config",
            str(DEMO),
            "--config",
            str(overrides(tmp_path)),
            "--trainer.max_steps",
            str(max_steps),
            *args,
        ]
    )
    assert code == 0


def metrics(tmp_path: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(tmp_path.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def demo_policy_config() -> KontextConfig:
    config = yaml.safe_load(DEMO.read_text())["model"]["policy"]
    from divrl.policy import LoRAConfig

    lora = LoRAConfig(**config.pop("lora"))
    return KontextConfig(**config, lora=lora)


pytestmark = pytest.mark.usefixtures("in_repository_root")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_repository_root) -> Path:
    root = tmp_path_factory.mktemp("fit")
    fit(root, 4)
    return root


def test_fit_writes_adapter_only_loras_at_the_switch_and_the_end(trained):
    stage1 = load_file(trained / "lora/stage1/pytorch_lora_weights.safetensors")
    final = load_file(trained / "lora/final/pytorch_lora_weights.safetensors")
    assert set(stage1) == set(final) and all(k.startswith("transformer.") and ".lora_" in k for k in final)
    policy = demo_policy_config().build()
    assert len(final) == len(policy.lora_state_dict())
    assert any(not torch.equal(stage1[k], final[k]) for k in final)  # stage 2 kept training the same adapter
    stage1 = yaml.safe_load((trained / "lora/stage1/info.json").read_text())
    assert stage1["global_step"] == SWITCH and stage1["stage"] == 1  # stages are 1-based, as the folder names
    info = yaml.safe_load((trained / "lora/final/info.json").read_text())
    assert info["global_step"] == 4 and info["stage"] == 2


def test_the_exported_lora_changes_diffusers_output_exactly_as_the_trained_policy(trained):
    assert_lora_reproduced_by_diffusers(
        demo_policy_config(), trained / "lora/final", "a photo of the red star on the left", min_change=1e-4
    )


def test_checkpoints_hold_only_trainable_state_and_the_run_state(trained):
    ckpt = torch.load(trained / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    policy = demo_policy_config().build()
    trainable = {f"policy.{n}" for n, p in policy.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable  # no frozen base weights
    assert ckpt["global_step"] == 4 and ckpt["divrl"]["stage"] == 1 and ckpt["divrl"]["rollouts_done"] == 4
    assert len(ckpt["optimizer_states"]) == 1 and ckpt["optimizer_states"][0]["state"]
    assert ckpt["IdentityDataModule"]["position"] == 4
    switch = next(v for k, v in ckpt["callbacks"].items() if k.startswith("StageSwitch"))
    assert switch["switched_at"] == {1: SWITCH}


def test_logged_metrics_stage_switch_and_on_policy_ratios(trained):
    rows = [r for r in metrics(trained) if r.get("reward/mean")]
    assert len(rows) == 4 and EXPECTED_METRICS <= set(rows[0])
    assert [float(r["train/stage"]) for r in rows] == [0, 0, 1, 1]
    # stage 2 applies the identity gate: the gated fraction is only non-zero there, and R2 <= nSSM
    assert all(float(r["reward/gated_fraction"]) == 0 for r in rows[:SWITCH])
    for r in rows[SWITCH:]:
        assert float(r["reward/mean"]) <= float(r["reward/nssm"]) + 1e-6
    # one update per rollout: every update is on-policy, its ratio exactly 1
    assert all(float(r["train/ratio_max_dev"]) < 1e-6 for r in rows)
    assert all(float(r["train/grad_norm"]) > 0 for r in rows)
    for r in rows:  # achieved throughput = analytic FLOPs / measured seconds
        config = json.loads((ROOT / "data/demo/tiny-kontext/transformer/config.json").read_text())
        per_call = transformer_flops(config, 64, 64, 32)  # 32x32 image: 8x8 packed tokens; 32 T5 tokens
        expected = per_call * 2 * 8 * 4 / float(r["time/rollout"]) / 1e12  # 2 groups of 8, 4 steps
        assert float(r["perf/rollout_tflops"]) == pytest.approx(expected, rel=1e-4)
    grids = sorted((trained / "rollouts").glob("*.png"))
    assert len(grids) == 4


@pytest.mark.parametrize("stop", [1, 3], ids=["before-switch", "after-switch"])
def test_resume_matches_the_uninterrupted_run(trained, tmp_path, stop):
    fit(tmp_path, stop)  # "pre-empted" after `stop` updates, mid-epoch
    fit(tmp_path, 4, "--ckpt_path", "last")
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["divrl"]["stage"] == 1
    assert ckpt["IdentityDataModule"]["position"] == 4
    for name in ("stage1", "final"):  # the switch happens at the same step, whichever run performs it
        resumed = load_file(tmp_path / f"lora/{name}/pytorch_lora_weights.safetensors")
        straight = load_file(trained / f"lora/{name}/pytorch_lora_weights.safetensors")
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name  # bit-identical on CPU
    rows = {int(r["step"]): r for r in metrics(tmp_path) if r.get("reward/mean")}
    reference = {int(r["step"]): r for r in metrics(trained) if r.get("reward/mean")}
    assert sorted(rows) == sorted(reference)
    assert all(rows[s]["reward/mean"] == reference[s]["reward/mean"] for s in rows)
    assert [float(rows[s]["train/stage"]) for s in sorted(rows)] == [0, 0, 1, 1]


FORMER_LAYOUT = {  # the model settings of a demo checkpoint written before the seams (divrl 4d90d9b), verbatim
    "policy": {
        "model": "data/demo/tiny-kontext",
        "lora": {"rank": 8, "alpha": 16.0, "init": "gaussian", "dropout": 0.0},
        "torch_dtype": "auto",
        "max_sequence_length": 32,
        "local_files_only": False,
        "revision": None,
        "tiny_seed": 0,
        "text_encoders": True,
        "train_transformer": False,
        "gradient_checkpointing": False,
        "sdpa_backends": ["flash", "efficient", "math"],
    },
    "grpo": {
        "group_size": 8,
        "num_steps": 4,
        "noise_level": 0.9,
        "guidance": 2.5,
        "resolution": 32,
        "clip_range": 0.0001,
        "adv_clip": 5.0,
        "adv_scope": "group",
        "kl_beta": 0.0,
        "ppo_epochs": 1,
        "updates_per_epoch": 1,
        "micro_batch_size": 8,
        "rollout_micro_batch_size": None,
        "rollout_keep_gathered": True,
        "timestep_fraction": 0.99,
        "sde_window": None,
        "max_grad_norm": 1.0,
        "seed": 42,
        "val_group_size": 4,
        "max_consecutive_skips": 10,
    },
    "peak_tflops": None,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}


def test_a_checkpoint_of_the_former_settings_layout_resumes_exactly(trained, tmp_path):
    """Lightning re-reads the model settings saved in a --ckpt_path file; those of the former single `grpo` group are
    read in today's layout, and the resumed run ends where the uninterrupted one does."""
    from divrl.training.checkpoints import upgrade_hparams

    today = upgrade_hparams(FORMER_LAYOUT)
    assert "grpo" not in today and today["policy"]["guidance"] == 2.5 and today["system"]["max_grad_norm"] == 1.0
    assert today["sampling"] == {
        "group_size": 8,
        "num_steps": 4,
        "noise_level": 0.9,
        "resolution": 32,
        "seed": 42,
        "val_group_size": 4,
    }
    assert today["objective"]["init_args"]["micro_batch_size"] == 8 and "seed" not in today["objective"]["init_args"]
    assert upgrade_hparams(today) == today and FORMER_LAYOUT["grpo"]["guidance"] == 2.5  # the input is left as it was
    fit(tmp_path, 1)
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"] = FORMER_LAYOUT
    torch.save(ckpt, tmp_path / "former.ckpt")
    fit(tmp_path, 4, "--ckpt_path", str(tmp_path / "former.ckpt"))
    for name in ("stage1", "final"):
        resumed = load_file(tmp_path / f"lora/{name}/pytorch_lora_weights.safetensors")
        straight = load_file(trained / f"lora/{name}/pytorch_lora_weights.safetensors")
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name


def test_resume_from_a_checkpoint_of_another_adapter_fails_clearly(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(KeyError, match=r"1 missing .*same model.policy"):
        fit(tmp_path, 5, "--ckpt_path", str(tmp_path / "other.ckpt"))


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
EVAL_CONFIGS = [p for p in CONFIGS if p.name.startswith("eval_")]
HUB_REWARDS = {"psr_klein.yaml"}  # one stage of PSR + per-subject DivRL with Grounding DINO and DINO from the Hub


@pytest.mark.parametrize("config", [p for p in CONFIGS if p not in EVAL_CONFIGS], ids=lambda p: p.name)
def test_every_shipped_config_parses_and_instantiates(config, tmp_path):
    cli = run_lightning(["--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path)], run=False)
    cfg = cli.parser.parse_args(["--config", str(config)])  # every key and type, nested init_args included
    if config.name in HUB_REWARDS:  # their rewards load Hub weights when built: checked by type, as parsed
        assert len(cfg.model.rewards) == 1 and cfg.model.sampling.group_size >= 2
        return
    model = cli.parser.instantiate_classes(cfg).model
    stages = 1 if config.name == "demo_multi.yaml" else 2  # the multi-subject demo trains one stage
    # one reward per stage, or (demo_idglow.yaml: SFT, then group DPO) one objective per stage
    assert max(len(model.rewards), len(model.objectives)) == stages and model.sampling.group_size >= 2


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_evaluation_config_parses(config, capsys):
    """Types and keys of `divrl evaluate` configs (the demo one also runs end to end in tests/test_evaluate.py)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["suite"]["class_path"] == "divrl.eval.EvalSuite" and printed["num_steps"] == 28
    suite = printed["suite"]["init_args"]
    assert (suite["identity"] or suite["subject_consistency"]) is not None and printed["methods"]["base"] is None


def test_a_config_key_typo_names_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEMO), "--model.sampling.group_sise", "4"])
    assert "group_sise" in capsys.readouterr().err


def test_sample_writes_pngs_with_the_trained_lora(trained, tmp_path):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(ref)
    out = tmp_path / "samples"
    command = [
        "sample",
        "--config",
        str(DEMO),
        "--trainer.logger",
        "false",
        "--lora",
        str(trained / "lora/final"),
        "--reference",
        str(ref),
        "--prompts",
        "[a photo of the red star, a sketch of the red star]",
        "--num_samples",
        "2",
        "--num_steps",
        "4",
        "--output_dir",
        str(out),
    ]
    main(command)
    files = sorted(out.glob("ref/*.png"))
    assert [f.name for f in files] == [
        "000_0.png",
        "000_1.png",
        "000_grid.png",
        "001_0.png",
        "001_1.png",
        "001_grid.png",
        "reference_0.png",  # the reference both prompts were conditioned on, written once
    ]
    meta = yaml.safe_load((out / "samples.json").read_text())
    assert [r["references"] for r in meta["samples"]] == 2 * [[str(out / "ref/reference_0.png")]]
    assert len(meta["samples"]) == 2 and len(meta["samples"][0]["nssm"]) == 2
    # the final LoRA was trained in stage 2 (its info.json): scored with that stage's reward, R2
    assert meta["stage"] == 2 and meta["reward"] == "GatedReward" and "vsm" in meta["samples"][0]
    a, b = (torch.tensor(list(Image.open(out / f"ref/000_{k}.png").getdata())) for k in (0, 1))
    assert not torch.equal(a, b)  # different seeds per sample
    with pytest.raises(FileExistsError, match="already holds the samples.json of an earlier run"):
        main(command)  # a second run never overwrites the first


def test_validate_scores_deterministic_samples_of_held_out_identities(trained, tmp_path):
    for _ in range(2):
        assert (
            main(
                [
                    "validate",
                    "--config",
                    str(DEMO),
                    "--config",
                    str(overrides(tmp_path)),
                    "--ckpt_path",
                    str(trained / "checkpoints/last.ckpt"),
                ]
            )
            == 0
        )
    runs = [r for r in metrics(tmp_path) if r.get("val/reward")]
    assert len(runs) == 2 and {"val/reward", "val/nssm", "val/vsm", "val/gated_fraction"} <= set(runs[0])
    assert runs[0]["val/reward"] == runs[1]["val/reward"]  # fixed seeds, ODE sampler: the same numbers each time


def test_sample_without_a_reference_uses_the_held_out_identities(trained, tmp_path):
    out = tmp_path / "samples"
    main(
        [
            "sample",
            "--config",
            str(DEMO),
            "--trainer.logger",
            "false",
            "--lora",
            str(trained / "checkpoints/last.ckpt"),
            "--num_identities",
            "2",
            "--num_samples",
            "1",
            "--num_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    meta = yaml.safe_load((out / "samples.json").read_text())
    assert [s["id"] for s in meta["samples"]] == ["val_00000", "val_00001"]
    assert all(Path(f).is_file() for s in meta["samples"] for f in s["files"])


def test_print_config_shows_every_resolved_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO), "--model.sampling.group_size", "6", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    objective = printed["model"]["objective"]
    assert (
        objective["class_path"] == "divrl.objectives.GRPOObjective" and printed["model"]["sampling"]["group_size"] == 6
    )
    assert objective["init_args"]["clip_range"] == 1e-4 and objective["init_args"]["adv_scope"] == "group"
    assert printed["model"]["system"]["max_empty_rollouts"] == 10
    policy = printed["model"]["policy"]  # a plain mapping configures the default family, FLUX.1 Kontext
    assert policy["class_path"] == "divrl.policy.KontextConfig"
    assert policy["init_args"]["sdpa_backends"] == ["flash", "efficient", "math"]
    assert printed["trainer"]["callbacks"][0]["init_args"]["switch_steps"] == 60
    assert [r["class_path"] for r in printed["model"]["rewards"]] == [
        "divrl.rewards.NSSMReward",
        "divrl.rewards.GatedReward",
    ]


def test_kl_to_the_reference_policy_is_zero_for_the_fresh_adapter_then_grows(tmp_path):
    fit(tmp_path, 3, "--model.objective.kl_beta", "0.1")
    rows = [r for r in metrics(tmp_path) if r.get("reward/mean")]
    kl = [float(r["train/kl"]) for r in rows]
    assert kl[0] == 0.0  # B = 0: the adapter-off reference policy is the policy itself
    assert all(k > 0 for k in kl[1:])
    loss = [float(r["train/loss"]) - float(r["train/policy_loss"]) for r in rows]
    assert loss == pytest.approx([0.1 * k for k in kl], rel=1e-4, abs=1e-9)


def test_resuming_keeps_the_command_line_settings_for_a_file_and_for_last(tmp_path):
    fit(tmp_path, 1)
    one = tmp_path / "one.ckpt"
    shutil.copy(tmp_path / "checkpoints/last.ckpt", one)
    with pytest.warns(UserWarning, match=r"the command line's apply: model.sampling.group_size: 8 -> 4"):
        fit(tmp_path, 2, "--ckpt_path", str(one), "--model.sampling.group_size", "4")
    resumed = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 2 and resumed["hyper_parameters"]["sampling"]["group_size"] == 4
    for path in (str(one), "last"):  # the same refusal for a file and for last, before any weight is loaded
        with pytest.raises(ValueError, match=r"model.policy.lora.rank: 8 in the checkpoint, 4 now"):
            fit(tmp_path, 3, "--ckpt_path", path, "--model.policy.lora.rank", "4")


def test_gradient_checkpointing_trains_the_same_adapter(trained, tmp_path):
    config = demo_policy_config()
    config.gradient_checkpointing = "selective"
    assert all(isinstance(block.forward, UnitForward) for block in config.build().shard_units())
    fit(tmp_path, SWITCH, "--model.policy.gradient_checkpointing", "selective")
    checkpointed = load_file(tmp_path / "lora/final/pytorch_lora_weights.safetensors")
    plain = load_file(trained / "lora/stage1/pytorch_lora_weights.safetensors")  # the same 2 updates
    assert all(torch.allclose(checkpointed[k], plain[k], atol=1e-6) for k in plain)


def test_an_update_is_clipped_to_max_grad_norm(tmp_path):
    """Plain SGD (lr 1, no weight decay) moves the weights by exactly the clipped gradient: an update of norm
    max_grad_norm when the logged gradient norm is larger."""
    fit(
        tmp_path,
        2,
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "1.0",
        "--model.optimizer.weight_decay",
        "0",
        "--model.system.max_grad_norm",
        "0.001",
    )
    before, after = (
        torch.load(tmp_path / f"checkpoints/epoch=0-step={s}.ckpt", map_location="cpu", weights_only=False)[
            "state_dict"
        ]
        for s in (1, 2)
    )
    moved = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(after[k].double() - before[k].double()) for k in before])
    )
    logged = [float(r["train/grad_norm"]) for r in metrics(tmp_path) if r.get("train/grad_norm")]
    assert len(logged) == 2 and logged[1] > 0.01  # the unclipped norm of the second update
    assert moved.item() == pytest.approx(0.001, rel=1e-3)


def test_bitsandbytes_8bit_adamw_trains_checkpoints_and_resumes(tmp_path):
    args = [
        "--model.optimizer",
        "bitsandbytes.optim.AdamW8bit",
        "--model.optimizer.init_args.lr",
        "3e-4",
        "--model.optimizer.init_args.min_8bit_size",
        "16",
    ]
    fit(tmp_path, 1, *args)
    fit(tmp_path, 2, *args, "--ckpt_path", "last")
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in ckpt["optimizer_states"][0]["state"].values()]
    tensors = [v for s in states for v in (s.values() if isinstance(s, dict) else []) if torch.is_tensor(v)]
    assert ckpt["global_step"] == 2 and any(t.dtype == torch.uint8 for t in tensors)  # 8-bit moments


def test_an_optimizer_that_cannot_run_under_the_strategy_is_refused_at_start():
    import bitsandbytes as bnb
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from divrl.training import FSDP2Strategy
    from divrl.training.strategies import check_optimizer_strategy

    optimizer = bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))])
    for fsdp2 in (FSDP2Strategy(), ModelParallelStrategy()):
        with pytest.raises(ValueError, match=r"torchao.optim.AdamW8bit.*trainer.strategy: ddp"):
            check_optimizer_strategy(optimizer, fsdp2)
    check_optimizer_strategy(optimizer, None)  # one device: fine
    check_optimizer_strategy(optimizer, DDPStrategy())
    check_optimizer_strategy(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]), FSDP2Strategy())


def test_strategies_divrl_cannot_train_under_are_refused_at_start_with_the_fix():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from divrl.training import FSDP1Strategy, FSDP2Strategy
    from divrl.training.strategies import check_strategy

    with pytest.raises(ValueError, match=r"Lightning's FSDPStrategy .* divrl.training.FSDP1Strategy"):
        check_strategy(FSDPStrategy())  # would wrap the whole module (VAE, rewards) into mixed-dtype flat params
    full = KontextConfig(model="tiny", lora=None, train_transformer=True)
    with pytest.raises(ValueError, match=r"full fine-tuning .* divrl.training.FSDP2Strategy"):
        check_strategy(FSDP1Strategy(), full)
    with pytest.raises(ValueError, match="state_dict_type must be 'full'"):
        FSDP1Strategy(state_dict_type="sharded")
    with pytest.raises(ValueError, match=r"mixed_precision is not taken \(set model.policy.torch_dtype\)"):
        FSDP1Strategy(mixed_precision=object())
    with pytest.raises(ValueError, match="use_orig_params must be true"):
        FSDP1Strategy(use_orig_params=False)
    from lightning.pytorch.plugins.precision import FSDPPrecision

    strategy = FSDP1Strategy(limit_all_gathers=False, parallel_devices=[torch.device("cpu")])
    assert strategy.wrap_kwargs()["limit_all_gathers"] is False  # FSDP1's own options reach every block's unit
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    with pytest.raises(ValueError, match="trainer.precision 'bf16-mixed' would cast"):
        strategy.wrap_kwargs()
    for fine in (None, DDPStrategy(), FSDP2Strategy(), FSDP1Strategy()):
        check_strategy(fine, KontextConfig(model="tiny"))
    check_strategy(FSDP2Strategy(), full)


def test_the_slurm_overlay_parses_on_top_of_a_config(tmp_path):
    cli = run_lightning(["--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path)], run=False)
    cfg = cli.parser.parse_args(
        ["--config", str(ROOT / "configs/explore.yaml"), "--config", str(ROOT / "examples/slurm/slurm.yaml")]
    )
    assert cfg.trainer.plugins[0].class_path.endswith("SLURMEnvironment")
    assert cfg.trainer.plugins[0].init_args.auto_requeue is True and cfg.model.policy.init_args.local_files_only is True
    assert "srun divrl fit --config configs/explore.yaml" in (ROOT / "examples/slurm/explore.sbatch").read_text()


def test_full_fine_tuning_trains_every_transformer_weight_and_exports_the_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel

    fit(tmp_path, 2, "--model.policy.lora", "null", "--model.policy.train_transformer", "true")
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    base = FluxTransformer2DModel.from_pretrained(ROOT / "data/demo/tiny-kontext/transformer")
    assert set(ckpt["state_dict"]) == {f"policy.transformer.{n}" for n, _ in base.named_parameters()}
    tuned = FluxTransformer2DModel.from_pretrained(tmp_path / "lora/final/transformer")
    changed = [n for (n, a), b in zip(base.named_parameters(), tuned.parameters()) if not torch.equal(a, b)]
    assert len(changed) > len(list(base.parameters())) // 2  # the weights themselves trained, not an adapter
    out = tmp_path / "samples"
    main(
        [
            "sample",
            "--config",
            str(DEMO),
            "--trainer.logger",
            "false",
            "--lora",
            str(tmp_path / "lora/final"),
            "--model.policy.lora",
            "null",
            "--num_identities",
            "1",
            "--num_samples",
            "1",
            "--num_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    assert len(yaml.safe_load((out / "samples.json").read_text())["samples"]) == 1


def test_full_fine_tuning_with_kl_uses_a_frozen_copy_of_the_initial_transformer(tmp_path):
    fit(
        tmp_path,
        3,
        "--model.policy.lora",
        "null",
        "--model.policy.train_transformer",
        "true",
        "--model.objective.kl_beta",
        "0.1",
    )
    rows = [r for r in metrics(tmp_path) if r.get("reward/mean")]
    kl = [float(r["train/kl"]) for r in rows]
    assert kl[0] == 0.0 and all(k > 0 for k in kl[1:])  # the copy is the policy until the first update
    loss = [float(r["train/loss"]) - float(r["train/policy_loss"]) for r in rows]
    assert loss == pytest.approx([0.1 * k for k in kl], rel=1e-4, abs=1e-9)
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("policy.transformer.") for k in ckpt["state_dict"])  # the frozen copy is not saved


def test_the_offloaded_reference_streams_blocks_and_matches_the_resident_one():
    from divrl.policy import KontextPolicy

    policy = KontextPolicy.tiny(lora=None, train_transformer=True)
    condition = policy.condition([torch.rand(3, 32, 32)], ["a red star"], 32, 32, group_size=2)
    latents = policy.initial_noise(condition, torch.Generator().manual_seed(0))
    resident = policy.keep_reference(offload=False)
    with torch.no_grad(), policy.reference_policy():
        assert policy.transformer is resident
        expected = policy.velocity(latents, 0.5, condition)
    with torch.no_grad():
        policy.transformer.transformer_blocks[0].ff.net[2].weight.add_(1.0)  # train the policy a little
        trained = policy.velocity(latents, 0.5, condition)
    offloaded = policy.keep_reference(offload=False)
    policy._frozen.offload = True  # the streaming path (a no-op move on a CPU machine)
    with torch.no_grad(), policy.reference_policy():
        streamed = policy.velocity(latents, 0.5, condition)
    assert policy.transformer is not offloaded and not torch.equal(trained, expected)
    assert torch.equal(streamed, trained)  # the copy taken after the change: the policy as it was then
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in offloaded.transformer_blocks)  # hooks removed


def test_batch_scope_advantages_train(tmp_path):
    fit(tmp_path, 2, "--model.objective.adv_scope", "batch")  # the published run's choice (explore.yaml)
    rows = [r for r in metrics(tmp_path) if r.get("reward/mean")]
    assert len(rows) == 2 and all(float(r["train/grad_norm"]) > 0 for r in rows)
    assert all(float(r["train/ratio_max_dev"]) < 1e-6 for r in rows)
