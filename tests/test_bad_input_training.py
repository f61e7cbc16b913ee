"""Bad input, round two (training): settings that used to be ignored or fail after a traceback (issue 23). Each test
failed before its fix: a resumed run kept the checkpoint's learning rate, a DPO run whose pairs were all below min_gap
trained nothing and exited 0, a server's out-of-range scores were used as rewards, config errors surfaced from torch,
peft or Lightning with their tracebacks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from divrl.cli import main
from divrl.data import IdentityDataModule
from divrl.objectives import DPOObjective, GroupDPOObjective, SamplingConfig
from divrl.policy import KontextConfig, LoRAConfig
from divrl.rewards import FeatureScorer, NSSMReward
from divrl.rewards.backbones import DenseDescriptor
from divrl.training import DivRLModule, SystemConfig
from divrl.training.trainer import DivRLTrainer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SHARDS = str(ROOT / "data" / "demo" / "train-*.tar")

pytestmark = pytest.mark.usefixtures("in_repository_root")  # tests/conftest.py


# ------------------------------------------------------------------------------------ optimizer settings on resume


class SetLR(pl.Callback):
    """Sets every param group's learning rate before the optimizer step ``at`` of an uninterrupted run: what a run
    resumed at ``at`` with a new ``--model.optimizer.init_args.lr`` must do."""

    def __init__(self, at: int, lr: float):
        self.at, self.lr = at, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def grpo_fit(folder: Path, steps: int, lr: float, ckpt_path=None, callbacks=()) -> dict[str, torch.Tensor]:
    """The tiny policy trained with GRPO for ``steps`` updates at ``lr``, a checkpoint after every update."""
    from functools import partial

    from lightning.pytorch.callbacks import ModelCheckpoint

    from divrl.objectives import GRPOObjective

    torch.manual_seed(0)
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1), track_vsm=False)],
        GRPOObjective(micro_batch_size=4),
        SamplingConfig(group_size=4, num_steps=2, resolution=32),
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4),
    )
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
    trainer = DivRLTrainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[checkpoint, *callbacks],
        default_root_dir=folder,
    )
    trainer.fit(
        model, IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=10), ckpt_path=ckpt_path, weights_only=False
    )  # in-process settings are dataclasses, not the CLI's plain dicts
    return {k: v.clone() for k, v in model.policy.lora_state_dict().items()}


def test_a_resumed_run_trains_with_the_learning_rate_of_the_command_line(tmp_path):
    """Lightning restores the optimizer's param groups, lr included, from the checkpoint; the run must train at the lr
    the command line gives, and say so. Independent computation: an uninterrupted run whose lr is set to the new
    value before the same step gives bit-identical weights."""
    straight = grpo_fit(tmp_path / "straight", 3, 3e-4, callbacks=[SetLR(at=2, lr=1e-4)])
    grpo_fit(tmp_path / "cut", 2, 3e-4)
    with pytest.warns(UserWarning, match=r"the command line's apply: model.optimizer lr: 0.0003 -> 0.0001$") as record:
        resumed = grpo_fit(tmp_path / "cut", 3, 1e-4, ckpt_path="last")
    assert sum("optimizer settings" in str(w.message) for w in record) == 1  # only the lr differs, listed once
    assert sorted(resumed) == sorted(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
    kept = grpo_fit(tmp_path / "kept", 3, 3e-4)  # the same run without the change differs: the lr mattered
    assert any(not torch.equal(kept[k], straight[k]) for k in straight)


SCHEDULES = {
    "none": None,
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    "one_cycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=20),
    "warm_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=2),
            torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        ],
        milestones=[2],
    ),
}


def lrs_after_resume(schedule: str, lr: float, new_lr: float, cut: int = 3, more: int = 5):
    """A run of ``cut`` steps at ``lr``, checkpointed (state dicts) and resumed by a run configured with ``new_lr``,
    as Lightning and DivRLModule do it; returns the changes listed and the learning rates of ``more`` further steps."""
    from divrl.training.checkpoints import apply_optimizer_settings, optimizer_settings

    def build(rate):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2, 2))], lr=rate, weight_decay=0.1)
        scheduler = SCHEDULES[schedule](optimizer) if SCHEDULES[schedule] else None
        return optimizer, scheduler, optimizer_settings(optimizer, scheduler)

    optimizer, scheduler, saved = build(lr)
    for _ in range(cut):
        optimizer.step()
        scheduler.step() if scheduler else None
    states = optimizer.state_dict(), scheduler.state_dict() if scheduler else None
    optimizer, scheduler, configured = build(new_lr)
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1]) if scheduler else None
    changes = apply_optimizer_settings(optimizer, scheduler, configured, saved)
    rates = []
    for _ in range(more):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if scheduler else None
    return changes, rates


def straight_lrs(schedule: str, lr: float, cut: int = 3, more: int = 5) -> list[float]:
    """The learning rates of steps ``cut .. cut + more`` of an uninterrupted run at ``lr``: an independent account
    of what the resumed run must follow (each schedule here scales with its base rate)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2, 2))], lr=lr, weight_decay=0.1)
    scheduler = SCHEDULES[schedule](optimizer) if SCHEDULES[schedule] else None
    rates = []
    for step in range(cut + more):
        if step >= cut:
            rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if scheduler else None
    return rates


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_resume_with_the_same_settings_changes_nothing_whatever_the_scheduler(schedule):
    """The schedulers' progress (a cycle's position, scheduled momentum, lambdas) is never taken for a setting."""
    changes, rates = lrs_after_resume(schedule, 4e-4, 4e-4)
    assert changes == [] and rates == straight_lrs(schedule, 4e-4)


@pytest.mark.parametrize("schedule", ["none", "step", "warm_restarts", "sequential"])
def test_a_new_learning_rate_rescales_the_schedule_as_if_the_run_had_used_it(schedule):
    changes, rates = lrs_after_resume(schedule, 4e-4, 1e-4)
    rescaled = " (the schedule rescaled by 0.25)" if SCHEDULES[schedule] else ""
    assert changes == [f"model.optimizer lr: 0.0004 -> 0.0001{rescaled}"]
    assert rates == pytest.approx(straight_lrs(schedule, 1e-4), rel=1e-12)


def test_a_changed_scheduler_or_optimizer_setting_applies_and_is_listed():
    from divrl.training.checkpoints import apply_optimizer_settings, optimizer_settings

    def build(step_size, weight_decay):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2, 2))], lr=1e-3, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.5)
        return optimizer, scheduler, optimizer_settings(optimizer, scheduler)

    old_opt, old_sched, saved = build(2, 0.1)
    for _ in range(3):
        old_opt.step()
        old_sched.step()
    optimizer, scheduler, configured = build(5, 0.01)
    optimizer.load_state_dict(old_opt.state_dict())
    scheduler.load_state_dict(old_sched.state_dict())
    changes = apply_optimizer_settings(optimizer, scheduler, configured, saved)
    assert changes == ["model.optimizer weight_decay: 0.1 -> 0.01", "model.lr_scheduler step_size: 2 -> 5"]
    assert scheduler.step_size == 5 and optimizer.param_groups[0]["weight_decay"] == 0.01
    assert apply_optimizer_settings(optimizer, scheduler, configured, None) == []  # not resumed: nothing to do


# ------------------------------------------------------------------------------------ objectives with nothing to learn


class Snapshot(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in pl_module.policy.lora_state_dict().items()})


def dpo_run(objective, max_steps: int, max_empty_rollouts: int, max_epochs: int | None = None):
    torch.manual_seed(0)
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1), track_vsm=False)],
        objective,
        SamplingConfig(group_size=2, num_steps=2, resolution=32, val_group_size=2),
        SystemConfig(max_empty_rollouts=max_empty_rollouts),
    )
    initial = {
        k: v.clone()
        for k, v in KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32)
        .build()
        .lora_state_dict()
        .items()
    }
    snapshot = Snapshot()
    trainer = DivRLTrainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[snapshot],
    )
    return model, trainer, snapshot, initial


@pytest.mark.parametrize("stop", [True, False])
def test_dpo_whose_every_pair_is_below_min_gap_trains_nothing_and_says_so(stop):
    """Every pair weighted 0 is an empty batch (not a loss of 0 whose AdamW weight decay still moves the adapter):
    counted, never applied, and a run stops naming min_gap after max_empty_rollouts of them, or at its end."""
    # stop: 2 empty batches in a row end the run; else a 3-batch epoch (no update moves global_step) ends it
    model, trainer, snapshot, initial = dpo_run(DPOObjective(min_gap=100.0), 5, 2 if stop else 10, None if stop else 1)
    data = IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=3)
    expected = (
        r"2 rollouts in a row had no pair whose reward gap is above objective.min_gap 100 \(lower it"
        if stop
        else r"every one of the run's 3 rollouts was skipped \(the last had no pair whose reward gap is above "
        r"objective.min_gap 100"
    )
    with pytest.raises(RuntimeError, match=expected):
        trainer.fit(model, data)
    assert model.counters["empty_rollouts"] == (2 if stop else 3) and trainer.global_step == 0
    assert all(torch.equal(state[k], initial[k]) for state in snapshot.states for k in initial)  # never applied


def test_pairs_above_min_gap_still_train():
    model, trainer, snapshot, initial = dpo_run(DPOObjective(min_gap=0.0), 2, 2)
    trainer.fit(model, IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=5))
    assert model.counters["empty_rollouts"] == 0 and trainer.global_step == 2
    assert any(not torch.equal(snapshot.states[-1][k], initial[k]) for k in initial)


def test_group_dpo_counts_a_batch_without_any_group_to_compare_as_empty(monkeypatch):
    from divrl.rewards.base import Components

    flat = lambda self, *a, **k: Components(torch.full((2,), 0.5), None)  # noqa: E731 - every sample alike
    monkeypatch.setattr(FeatureScorer, "score_group", flat)
    model, trainer, snapshot, initial = dpo_run(GroupDPOObjective(), 3, 2)
    with pytest.raises(RuntimeError, match=r"2 rollouts in a row had no group with rewards both above and below"):
        trainer.fit(model, IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=5))
    assert all(torch.equal(state[k], initial[k]) for state in snapshot.states for k in initial)


# ------------------------------------------------------------------------------------ config errors: divrl's sentence


def console(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["divrl", *argv])
    monkeypatch.delenv("DIVRL_TRACEBACK", raising=False)
    try:
        code = main()
    except SystemExit as exit_:  # argparse / jsonargparse
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (
            ["--model.optimizer.init_args.lr", "-1"],
            "divrl fit: model.optimizer: Invalid learning rate: -1.0; fix model.optimizer.init_args",
        ),
        (["--model.policy.lora.rank", "0"], "divrl fit: policy.lora.rank must be an integer >= 1 (DivRL: 64), got 0"),
        (["--trainer.max_steps", "-5"], "divrl fit: trainer.max_steps must be a non-negative integer or -1"),
    ],
)
def test_config_errors_print_divrls_sentence_naming_the_key(args, sentence, monkeypatch, capsys, tmp_path):
    code, err = console(
        ["fit", "--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *args],
        monkeypatch,
        capsys,
    )
    assert code == 1 and sentence in err and "Traceback" not in err, err
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


def test_a_negative_scheduler_setting_torch_refuses_is_named(monkeypatch, capsys, tmp_path):
    code, err = console(
        [
            "fit",
            "--config",
            str(DEMO),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--model.lr_scheduler",
            "torch.optim.lr_scheduler.LinearLR",
            "--model.lr_scheduler.start_factor",
            "-2",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1 and "divrl fit: model.lr_scheduler: " in err and "fix model.lr_scheduler.init_args" in err, err
    assert "Traceback" not in err


def test_a_pool_that_does_not_divide_the_grid_is_named_in_training_not_the_mask():
    """With a subject mask, the pooled grid used to be checked through the mask first, which blamed the identity's
    mask.png for the scorer's pool."""
    from divrl.data.stream import ConditionSample
    from divrl.rewards import GatedReward, Group

    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    sample = ConditionSample("id0", "a photo", torch.rand(3, 32, 32), mask)
    reward = GatedReward(FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=5))
    with pytest.raises(
        ValueError,
        match=r"^pool=5 does not divide the backbone's 24x24 feature grid; set the scorer's "
        r"pool to one that does \(1, 2, 3, 4, 6, 8, 12, 24\)$",
    ):
        reward(Group(sample, torch.rand(2, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"pool must be a positive integer, got 0"):
        FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=0)


# ------------------------------------------------------------------------------------ the command line itself


def test_a_config_that_is_not_yaml_is_named_with_its_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  sampling: [group_size: 4\n")
    code, err = console(["fit", "--config", str(DEMO), f"--config={bad}"], monkeypatch, capsys)
    assert code == 1 and f"divrl fit: --config {bad} is not valid YAML: " in err and "at line 3, column 1" in err, err
    assert "usage:" not in err and "Traceback" not in err
    code, err = console(["validate", "--config", str(tmp_path / "missing.yaml")], monkeypatch, capsys)
    assert code == 1 and f"divrl validate: --config {tmp_path / 'missing.yaml'} does not exist" in err


def test_settings_of_the_former_grpo_group_are_named_with_where_they_moved(tmp_path, monkeypatch, capsys):
    code, err = console(
        [
            "fit",
            "--config",
            str(DEMO),
            "--model.grpo.group_size",
            "4",
            "--model.grpo.clip_range=0.1",
            "--model.grpo.max_grad_norm",
            "2",
            "--model.grpo.guidance",
            "3",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1 and "usage:" not in err, err
    assert (
        "model.grpo.group_size -> model.sampling.group_size, model.grpo.clip_range -> "
        "model.objective.init_args.clip_range, model.grpo.max_grad_norm -> model.system.max_grad_norm, "
        "model.grpo.guidance -> model.policy.guidance"
    ) in err
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  grpo:\n    num_steps: 4\n    kl_beta: 0.01\n")
    code, err = console(["fit", "--config", str(DEMO), "--config", str(old)], monkeypatch, capsys)
    assert code == 1 and f"model.grpo in --config {old} moved" in err
    assert (
        "model.grpo.num_steps -> model.sampling.num_steps, model.grpo.kl_beta -> model.objective.init_args.kl_beta"
        in err
    )
    # the names it suggests are the ones the parser takes
    from divrl.cli import run_lightning

    cli = run_lightning(
        [
            "--config",
            str(DEMO),
            "--model.objective.init_args.kl_beta",
            "0.01",
            "--model.sampling.num_steps",
            "3",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert cli.model.objective.kl_beta == 0.01 and cli.model.sampling.num_steps == 3


def test_a_sentence_that_names_its_command_is_not_prefixed_twice(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "notanimage.png"
    bad.write_text("hello")
    code, err = console(
        [
            "sample",
            "--config",
            str(DEMO),
            "--trainer.logger",
            "false",
            "--reference",
            str(bad),
            "--prompts",
            "[a photo]",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1 and "cannot read image" in err and "divrl sample: divrl sample" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
def test_the_gpu_refusal_names_the_config_that_was_given(monkeypatch, capsys):
    code, err = console(["fit", "--config", str(DEMO), "--trainer.accelerator", "gpu"], monkeypatch, capsys)
    assert code == 2 and f"this run (--config {DEMO}) asks for GPUs" in err and "explore.yaml" not in err, err


def test_every_scored_batch_agrees_across_ranks_and_empty_batches_count_only_in_a_row():
    """The agreement is a collective: every rank must make it for every scored batch, whether it kept groups or not
    (a rank that skipped it would leave the others waiting); and only empty batches in a row stop a run."""
    from types import SimpleNamespace

    from divrl.objectives.base import Batch, Scores
    from divrl.training.environment import trains_on

    calls = []

    class Strategy:
        def reduce_boolean_decision(self, decision, all=True):
            calls.append(decision)
            return decision

    module = SimpleNamespace(
        trainer=SimpleNamespace(strategy=Strategy()),
        counters={"empty_rollouts": 0},
        system=SystemConfig(max_empty_rollouts=3),
        reward=object(),
        rollouts_done=0,
        _empty_rollouts=0,
        empty_reason="",
    )

    def batch(kept: int, usable=None) -> Batch:
        scores = Scores(torch.zeros(2, 2), torch.tensor([i < kept for i in range(2)]), [None, None])
        return Batch([], 2, scores, usable=usable, missing="no pair above min_gap")

    for kept in (0, 2, 0, 1, 0):  # empty batches, never three in a row: no stop
        assert trains_on(module, batch(kept)) == (kept > 0)
    assert calls == [False, True, False, True, False] and module.counters["empty_rollouts"] == 3
    assert trains_on(module, batch(2, usable=0)) is False and module.empty_reason == "no pair above min_gap"
    with pytest.raises(RuntimeError, match=r"3 rollouts in a row had no pair above min_gap, on every rank"):
        trains_on(module, batch(2, usable=0))
    assert trains_on(module, Batch([], 1)) is True and len(calls) == 7  # neither scored nor counted: no collective


def test_inline_and_remote_configs_pass_and_files_that_are_not_utf8_are_named(tmp_path):
    from divrl.cli import check_command_line

    assert check_command_line(["--config", "{trainer: {max_steps: 3}}", "--config", "s3://bucket/run.yaml"]) == [
        "{trainer: {max_steps: 3}}",
        "s3://bucket/run.yaml",
    ]  # jsonargparse reads both
    with pytest.raises(
        ValueError,
        match=r"model.grpo in --config \{model: \{grpo: \{seed: 3\}\}\} moved .*"
        r"model.grpo.seed -> model.sampling.seed",
    ):
        check_command_line(["-c", "{model: {grpo: {seed: 3}}}"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: {sampling: \xff}\n")
    with pytest.raises(ValueError, match=rf"--config {latin} is not UTF-8 text \(byte 0xff at offset 18\)"):
        check_command_line([f"--config={latin}"])


# ------------------------------------------------------------------------------------ found by the second fuzz


@pytest.mark.parametrize(
    ("build", "sentence"),
    [
        (lambda: SamplingConfig(noise_level=float("inf")), r"sampling.noise_level must be a finite number >= 0"),
        (
            lambda: __import__("divrl.objectives", fromlist=["GRPOObjective"]).GRPOObjective(timestep_fraction=0.0),
            r"objective.timestep_fraction must lie in \(0, 1\] \(paper: 0.99\), got 0.0",
        ),
        (
            lambda: __import__("divrl.objectives", fromlist=["GRPOObjective"]).GRPOObjective(timestep_fraction=2.0),
            r"objective.timestep_fraction must lie in \(0, 1\] \(paper: 0.99\), got 2.0",
        ),
        (lambda: KontextConfig(model="tiny", guidance=float("nan")), r"policy.guidance must be a finite number"),
        (lambda: KontextConfig(model="tiny", max_sequence_length=0), r"policy.max_sequence_length must be >= 1"),
        (
            lambda: __import__("divrl.training.config", fromlist=["x"]).check_settings(torch.optim.AdamW, None, -5.0),
            r"model.peak_tflops must be a positive number of TFLOP/s \(or null\), got -5.0",
        ),
    ],
)
def test_settings_that_used_to_fail_late_or_blame_the_reward_are_refused_by_key(build, sentence):
    with pytest.raises(ValueError, match=sentence):
        build()


def test_a_model_that_is_a_file_is_named_as_a_file(tmp_path):
    from divrl.policy.kontext.builder import load_pipeline
    from divrl.utils import load_pretrained

    text = tmp_path / "model.txt"
    text.write_text("not a model")
    with pytest.raises(Exception, match=r"is a file, not a diffusers pipeline folder"):
        load_pipeline(str(text))
    with pytest.raises(NotADirectoryError, match=r"is a file, not a folder written by save_pretrained"):
        load_pretrained(lambda *a, **k: None, text, True, "DINOv2Backbone", "facebook/dinov2-small")


def test_a_wrong_image_size_names_the_setting():
    policy = KontextConfig(model="tiny", lora=None, max_sequence_length=32).build()
    with pytest.raises(ValueError, match=r"image size 7x7 must be a positive multiple .* set sampling.resolution"):
        policy.check_size(7, 7)


@pytest.mark.parametrize(
    ("content", "sentence"),
    [
        ("", "is empty, not a mapping of settings"),
        ("- 1\n- 2\n", "holds a list, not a mapping of settings"),
        ("model:\n  sampling: [1, 2]\n", "model.sampling in --config {path} is a list; it takes a mapping of settings"),
        ("trainer: 3\n", "trainer in --config {path} is a int; it takes a mapping of settings"),
    ],
)
def test_config_files_of_the_wrong_shape_are_named(content, sentence, tmp_path, monkeypatch, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(content)
    code, err = console(["fit", "--config", str(DEMO), "--config", str(path)], monkeypatch, capsys)
    assert code == 1 and sentence.format(path=path) in err and "usage:" not in err, err
    code, err = console(["fit", "--config", str(tmp_path)], monkeypatch, capsys)
    assert code == 1 and f"--config {tmp_path} is a folder; pass a YAML file" in err


def test_a_callbacks_refusal_is_printed_without_jsonargparses_menu(tmp_path, monkeypatch, capsys):
    path = tmp_path / "switch.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: divrl.training.StageSwitch\n      init_args: {switch_steps: -3}\n"
    )
    code, err = console(["fit", "--config", str(DEMO), "--config", str(path)], monkeypatch, capsys)
    assert code == 1 and "StageSwitch: switch_steps must be non-negative and ascending, got -3\n" in err, err
    assert "Not a valid subclass" not in err and "class path (str)" not in err


def test_lightnings_trainer_refusals_name_the_trainer_key(monkeypatch, capsys):
    code, err = console(["fit", "--config", str(DEMO), "--trainer.devices", "0"], monkeypatch, capsys)
    assert code == 1 and "divrl fit: trainer.devices: '0' value is not a valid input" in err and "`" not in err, err


def test_out_of_memory_is_a_sentence_naming_what_makes_a_run_smaller():
    from divrl.cli import expected_error

    for err in (
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8192 bytes"),
    ):
        message = expected_error(err)
        assert (
            message.startswith("out of memory (") and "sampling.group_size" in message and "data.batch_size" in message
        )
    assert expected_error(RuntimeError("shape mismatch")) is None  # other errors raised outside divrl: tracebacks


# ------------------------------------------------------------------------------------ found by the third fuzz


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (
            {"accumulate_grad_batches": 4},
            "trainer.accumulate_grad_batches 4: divrl optimizes manually .* objective.micro_batch_size",
        ),
        ({"gradient_clip_val": 1.0}, "trainer.gradient_clip_val 1.0: .* model.system.max_grad_norm clips every update"),
        (
            {"precision": "16-mixed"},
            "trainer.precision '16-mixed': divrl sets its numerics itself .* policy.torch_dtype",
        ),
    ],
)
def test_trainer_settings_manual_optimization_cannot_honour_are_refused(setting, says):
    with pytest.raises(ValueError, match=says):
        DivRLTrainer(accelerator="cpu", logger=False, **setting)
    DivRLTrainer(accelerator="cpu", logger=False, precision="32-true", accumulate_grad_batches=1)  # the defaults pass


def test_stages_need_a_stage_switch_and_no_more_rewards_than_stages():
    from divrl.training import StageSwitch

    rewards = [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1), track_vsm=False)] * 3
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        rewards[:2],
        sampling=SamplingConfig(group_size=2, num_steps=2, resolution=32),
    )
    trainer = DivRLTrainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"give 2 stages but trainer.callbacks has no divrl.training.StageSwitch"):
        trainer.fit(model, IdentityDataModule(SHARDS, batch_size=2, steps_per_epoch=2))
    assert model.policy is None  # refused before the model was built
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        rewards,
        sampling=SamplingConfig(group_size=2, num_steps=2, resolution=32),
    )
    with pytest.raises(ValueError, match=r"1 switch step\(s\) make 2 stages, .* got 3 rewards in model.rewards"):
        StageSwitch(5).setup(DivRLTrainer(accelerator="cpu", logger=False, max_steps=10), model, "fit")


def test_loading_a_checkpoint_of_another_adapter_into_sample_names_the_setting(tmp_path):
    from divrl.training.checkpoints import load_weights

    grpo_fit(tmp_path / "run", 1, 3e-4)  # LoRA rank 4
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=2, alpha=8.0), max_sequence_length=32),
        [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1), track_vsm=False)],
    )
    model.configure_model()
    with pytest.raises(ValueError, match=r"model.policy.lora.rank: 4 in the checkpoint, 2 now"):
        load_weights(model, tmp_path / "run" / "last.ckpt")


def test_a_folder_of_checkpoints_given_as_ckpt_path_names_the_newest(tmp_path):
    from divrl.training.checkpoints import resume_path

    grpo_fit(tmp_path, 2, 3e-4)
    with pytest.raises(
        IsADirectoryError,
        match=rf"--ckpt_path {tmp_path} is a folder of checkpoints; pass one of them, "
        rf"e.g. .*\.ckpt \(the newest\), or `last`",
    ):
        resume_path(str(tmp_path), [])


def test_methods_that_are_not_a_mapping_of_plain_names_are_refused_with_an_example():
    from divrl.cli import check_command_line, expected_error

    for value in ("[base, mine]", "base"):
        with pytest.raises(
            ValueError, match=r"--methods takes a mapping of method name to weights .* e.g. '\{base: null"
        ):
            check_command_line(["--methods", value])
    with pytest.raises(ValueError, match=r"--methods name '/tmp/x' is not a plain folder name"):
        check_command_line(["--methods={/tmp/x: null}"])
    assert check_command_line(["--methods", "{base: null, mine: runs/demo/lora/final}"]) == []
    assert check_command_line(["--methods", "null"]) == []  # clears a config's methods (only --samples_dir scored)
    assert check_command_line(["--methods", "{2024-01-01: null, 7: null}"]) == []  # jsonargparse keeps them strings
    stop = None
    try:  # divrl's own stop after non-finite updates is a sentence, not a traceback
        DivRLModule._skip(
            SimpleNamespace(
                counters={"skipped_updates": 0}, _consecutive_skips=0, system=SystemConfig(max_consecutive_skips=1)
            ),
            SimpleNamespace(zero_grad=lambda set_to_none: None),
        )
    except FloatingPointError as err:
        stop = err
    assert expected_error(stop).startswith("1 updates in a row had a non-finite loss or gradient")


def test_two_stage_switches_are_refused_by_name(tmp_path, monkeypatch, capsys):
    """A config's callbacks plus ``--trainer.callbacks+=StageSwitch`` (they add up) was Lightning's traceback about a
    callback's ``state_key``."""
    code, err = console(
        [
            "fit",
            "--config",
            "configs/demo.yaml",
            "--trainer.max_steps",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks+=divrl.training.StageSwitch",
            "--trainer.callbacks.switch_steps=2",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1 and "Traceback" not in err, err
    assert "trainer.callbacks holds 2 StageSwitch; give one of each (a StageSwitch takes every switch step" in err, err


def test_a_gradient_clip_of_zero_is_no_clipping_and_accepted():
    from divrl.training.trainer import _check_trainer_settings

    _check_trainer_settings({"gradient_clip_val": 0})  # Lightning's manual optimization refuses > 0 only
    _check_trainer_settings({"gradient_clip_val": 0.0, "precision": 32})
    with pytest.raises(ValueError, match="trainer.gradient_clip_val 1.0: divrl optimizes manually"):
        _check_trainer_settings({"gradient_clip_val": 1.0})


def test_turning_the_progress_bar_off_drops_the_configs_bar(tmp_path):
    """``--trainer.enable_progress_bar false`` with the demo config (whose callbacks hold a DivRLProgressBar) was
    Lightning's refusal; it now turns the bar off."""
    from lightning.pytorch.callbacks import ProgressBar

    from divrl.training import DivRLProgressBar
    from divrl.training.trainer import DivRLTrainer

    trainer = DivRLTrainer(
        callbacks=[DivRLProgressBar()], enable_progress_bar=False, logger=False, default_root_dir=tmp_path
    )
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    with_bar = DivRLTrainer(callbacks=[DivRLProgressBar()], logger=False, default_root_dir=tmp_path)
    assert any(isinstance(c, DivRLProgressBar) for c in with_bar.callbacks)
