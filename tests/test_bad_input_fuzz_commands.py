"""Bad input a fuzz of `divrl evaluate`, `sample` and `fit` found: each case here wrote outside --output_dir, exited 0
doing nothing, printed a traceback or a usage screen, failed at the end of training, or said nothing on Ctrl-C. Each is
refused with one sentence naming the input and the fix, before a model is loaded where that is possible."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
EVAL_DEMO = str(ROOT / "configs/eval_demo.yaml")
SHARDS = str(ROOT / "data" / "demo" / "train-*.tar")


def evaluate(*more: str) -> list[str]:
    return [
        "evaluate",
        "--config",
        EVAL_DEMO,
        "--num_steps",
        "1",
        "--num_samples",
        "1",
        "--num_identities",
        "1",
        "--prompts_per_identity",
        "1",
        "--progress",
        "false",
        *more,
    ]


def sample(*more: str) -> list[str]:
    return [
        "sample",
        "--config",
        DEMO,
        "--trainer.logger",
        "false",
        "--num_steps",
        "1",
        "--num_samples",
        "1",
        "--num_identities",
        "1",
        *more,
    ]


def one_sentence(code, printed, command: str) -> str:
    assert code == 1 and "Traceback" not in printed.err and "usage:" not in printed.err, printed.err[-2000:]
    line = next(line for line in printed.err.splitlines() if line.startswith(f"divrl {command}: "))
    return line


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return path


# 1. method names that escape --output_dir --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ABSOLUTE", "../escape", "a/b", "a\\\\b", "''", "'.'", "'..'", "metrics.json"])
def test_evaluate_refuses_a_method_name_that_is_not_one_folder_name(console, no_model, tmp_path, name):
    user = tmp_path / "userphotos"  # what an absolute name overwrote and moved aside
    user.mkdir()
    (user / "grid.png").write_bytes(b"the user's grid")
    (user / "scores.jsonl").write_text("the user's scores\n")
    name = str(user) if name == "ABSOLUTE" else name
    out = tmp_path / "run" / "eval"
    code, printed = console(*evaluate("--methods", f"{{{name}: null}}", "--output_dir", str(out)))
    line = one_sentence(code, printed, "evaluate")
    assert "--methods name" in line and ("is not a plain folder name" in line or "report file" in line), line
    assert (user / "grid.png").read_bytes() == b"the user's grid" and sorted(p.name for p in user.iterdir()) == [
        "grid.png",
        "scores.jsonl",
    ]
    assert not (tmp_path / "run").exists() and not (tmp_path / "escape").exists()  # nothing written anywhere


def test_run_method_refuses_a_path_as_a_method_name(tmp_path):
    from divrl.eval import Evaluation
    from divrl.eval.suite import EvalSuite
    from divrl.rewards import FeatureScorer
    from divrl.rewards.backbones import DenseDescriptor

    evaluation = Evaluation(
        EvalSuite(identity=FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=1)),
        tmp_path / "eval",
        num_samples=1,
        grid_conditions=0,
        progress=False,
    )
    for name in (str(tmp_path / "outside"), "../outside", "", "."):
        with pytest.raises(ValueError, match="is not a plain folder name"):
            evaluation.run_method(name, [], lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the output folder
    with pytest.raises(ValueError, match="grid_conditions must be >= 0"):
        Evaluation(evaluation.suite, tmp_path / "eval", grid_conditions=-1)


def test_evaluate_refuses_sample_methods_that_are_paths_or_collide_with_methods(console, no_model, tmp_path):
    samples, out = tmp_path / "samples", tmp_path / "eval"
    (samples / "base" / "tgt_image").mkdir(parents=True)
    code, printed = console(
        *evaluate(
            "--methods", "{}", "--samples_dir", str(samples), "--sample_methods", "[../base]", "--output_dir", str(out)
        )
    )
    assert "--sample_methods name '../base' is not a plain folder name" in one_sentence(code, printed, "evaluate")
    code, printed = console(
        *evaluate("--methods", "{base: null}", "--samples_dir", str(samples), "--output_dir", str(out))
    )
    line = one_sentence(code, printed, "evaluate")
    assert "method(s) ['base'] are named in --methods and in --samples_dir" in line, line
    assert not out.exists()


# 2. nothing to evaluate, a negative grid ---------------------------------------------------------------------------


def test_evaluate_refuses_an_empty_methods_map_without_samples_dir(console, no_model, tmp_path):
    out = tmp_path / "eval"
    code, printed = console(*evaluate("--methods", "{}", "--output_dir", str(out)))
    assert "--methods {} and no --samples_dir: nothing to evaluate" in one_sentence(code, printed, "evaluate")
    assert not out.exists() and "| method |" not in printed.out


def test_evaluate_refuses_negative_grid_conditions(console, no_model, tmp_path):
    out = tmp_path / "eval"
    code, printed = console(*evaluate("--methods", "{base: null}", "--grid_conditions", "-2", "--output_dir", str(out)))
    assert "--grid_conditions -2: must be >= 0" in one_sentence(code, printed, "evaluate")
    assert not out.exists()


# 3. divrl sample: noise, flags without --reference, empty paths, a black mask --------------------------------------


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf"])
def test_sample_refuses_a_noise_level_fit_refuses(console, no_model, tmp_path, value):
    out = tmp_path / "out"
    code, printed = console(*sample("--noise_level", value, "--output_dir", str(out)))
    assert "--noise_level" in (line := one_sentence(code, printed, "sample")) and "must be a finite number >= 0" in line
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value"), [("--mask", "MASK"), ("--subjects", "[dog]")])
def test_sample_refuses_mask_or_subjects_without_reference(console, no_model, tmp_path, reference, flag, value):
    out = tmp_path / "out"
    code, printed = console(*sample(flag, str(reference) if value == "MASK" else value, "--output_dir", str(out)))
    assert f"{flag} was given without --reference" in one_sentence(code, printed, "sample")
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_an_empty_output_dir_is_refused_not_the_current_folder(console, no_model, tmp_path, monkeypatch, command):
    args = (
        sample("--output_dir", "") if command == "sample" else evaluate("--methods", "{base: null}", "--output_dir", "")
    )
    (cwd := tmp_path / "cwd").mkdir()
    monkeypatch.chdir(cwd)  # where an empty --output_dir wrote
    code, printed = console(*args)
    assert "--output_dir is empty ('')" in one_sentence(code, printed, command)
    assert list(cwd.iterdir()) == []


def test_sample_refuses_an_empty_lora(console, no_model, tmp_path):
    code, printed = console(*sample("--lora", "", "--output_dir", str(tmp_path / "out")))
    assert "--lora is empty ('')" in one_sentence(code, printed, "sample")


def test_sample_names_a_black_mask_before_loading_the_model(console, no_model, tmp_path, reference):
    black = tmp_path / "black.png"
    Image.new("L", (32, 32), 0).save(black)
    out = tmp_path / "out"
    code, printed = console(
        *sample("--reference", str(reference), "--mask", str(black), "--prompts", "[a cat]", "--output_dir", str(out))
    )
    line = one_sentence(code, printed, "sample")
    assert f"--mask {black} has no subject pixel" in line and "mask.png" not in line, line
    assert not out.exists()


# 4. a bare prompt -----------------------------------------------------------------------------------------------------


def test_sample_takes_a_bare_prompt_as_a_list_of_one(console, tmp_path, reference):
    out = tmp_path / "out"
    code, printed = console(
        *sample("--reference", str(reference), "--prompts", "a photo on the beach", "--output_dir", str(out))
    )
    assert code == 0, printed.err[-2000:]
    records = json.loads((out / "samples.json").read_text())["samples"]
    assert [r["prompt"] for r in records] == ["a photo on the beach"] and len(records[0]["files"]) == 1


# 5. callbacks and trainer.default_root_dir ----------------------------------------------------------------------------


def tiny_fit(tmp_path, callbacks, max_steps: int = 1, **trainer):
    from divrl.data import IdentityDataModule
    from divrl.objectives import GRPOObjective, SamplingConfig
    from divrl.policy import KontextConfig, LoRAConfig
    from divrl.rewards import FeatureScorer, NSSMReward
    from divrl.rewards.backbones import DenseDescriptor
    from divrl.training import DivRLModule
    from divrl.training.trainer import DivRLTrainer

    torch.manual_seed(0)
    model = DivRLModule(
        KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=8.0), max_sequence_length=32),
        [NSSMReward(FeatureScorer(DenseDescriptor(grid_size=12, cell=4), pool=1), track_vsm=False)],
        GRPOObjective(micro_batch_size=4),
        SamplingConfig(group_size=2, num_steps=2, resolution=32, val_group_size=2),
    )
    settings = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path / "run"),
    )
    trainer = DivRLTrainer(**{**settings, **trainer}, callbacks=list(callbacks))
    trainer.fit(model, IdentityDataModule(SHARDS, batch_size=1, steps_per_epoch=10))
    return model, trainer


@pytest.mark.parametrize("where", ["FILE", "/dev/null/x"])
def test_an_exporter_folder_that_cannot_be_written_is_refused_when_fit_starts(tmp_path, no_model, where):
    from divrl.training import LoRAExporter

    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    dirname = str(taken) if where == "FILE" else where
    with pytest.raises(
        OSError,
        match=r"LoRAExporter: cannot write its exports to .* is a file, not a folder\): set "
        r"the callback's dirname \(init_args.dirname, now '" + re.escape(dirname),
    ):
        tiny_fit(tmp_path, [LoRAExporter(dirname=dirname)])  # no_model: refused before the model loads
    assert taken.read_text() == "a file"


def test_callback_settings_are_refused_when_configured(tmp_path):
    from divrl.training import RolloutImageLogger, StageSwitch

    for settings, says in [
        ({"every_n_rollouts": 0}, "every_n_rollouts 0"),
        ({"tile": 0}, "tile 0"),
        ({"columns": -1}, "columns -1"),
    ]:
        with pytest.raises(ValueError, match=f"RolloutImageLogger: {says}: must be a whole number >= 1"):
            RolloutImageLogger(**settings)
    with pytest.raises(ValueError, match=r"switch_steps \[60, 60\] repeat a step"):
        StageSwitch([60, 60])
    taken = tmp_path / "run" / "rollouts"
    taken.parent.mkdir()
    taken.write_text("a file")
    with pytest.raises(OSError, match="RolloutImageLogger: cannot write its image grids to"):
        tiny_fit(tmp_path, [RolloutImageLogger()])


def test_a_default_root_dir_that_is_a_file_is_refused_when_fit_starts(console, no_model, tmp_path):
    taken = tmp_path / "text.txt"
    taken.write_text("a file")
    code, printed = console(
        "fit",
        "--config",
        DEMO,
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(taken),
    )
    assert f"trainer.default_root_dir {taken} is a file, not a folder" in one_sentence(code, printed, "fit")
    assert taken.read_text() == "a file"


# 6. 7. the end-of-fit summary and Ctrl-C --------------------------------------------------------------------------------


def test_the_summary_lists_a_checkpoint_folder_only_when_a_checkpoint_is_in_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from divrl.training.environment import run_summary

    folder = tmp_path / "checkpoints"
    trainer = SimpleNamespace(
        global_step=3,
        callbacks=[ModelCheckpoint(dirpath=str(folder))],
        callback_metrics={},
        default_root_dir=str(tmp_path),
        loggers=[],
    )
    module = SimpleNamespace(rollouts_done=3, stage=0, counters={})
    lines = run_summary(trainer, module)
    assert f"  checkpoints: none written (to {folder}/)" in lines and not any("--ckpt_path" in x for x in lines)
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"PK")
    assert f"  checkpoints: {folder}/ (newest last.ckpt; resume with --ckpt_path last)" in run_summary(trainer, module)


class Interrupt(pl.Callback):
    """Ctrl-C after ``at`` optimizer steps."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.at:
            raise KeyboardInterrupt


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines += record.getMessage().splitlines()


@pytest.mark.parametrize("checkpoints", [False, True])
def test_an_interrupted_fit_says_what_was_kept_and_how_to_resume(tmp_path, checkpoints):
    from lightning.pytorch.callbacks import ModelCheckpoint

    before = signal.getsignal(signal.SIGINT)
    saver = [ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)] if checkpoints else []
    lightning_log, lines = logging.getLogger("lightning.pytorch"), Lines()
    lightning_log.addHandler(lines)
    try:
        with pytest.raises(SystemExit) as stopped:
            tiny_fit(tmp_path, [Interrupt(at=2), *saver], max_steps=5, enable_checkpointing=checkpoints)
    finally:
        lightning_log.removeHandler(lines)
    assert stopped.value.code == 1
    assert signal.getsignal(signal.SIGINT) is before  # Lightning's SIG_IGN undone: a second Ctrl-C works again
    text = "\n".join(lines.lines)
    assert "Detected KeyboardInterrupt" in text and "[divrl] fit interrupted after 2 optimizer steps" in text, text
    if checkpoints:
        folder = os.path.realpath(tmp_path / "run" / "checkpoints")
        assert f"checkpoints: newest {folder}/epoch=0-step=1.ckpt (step 1: 1 optimizer step after it" in text, text
        assert "resume:" in text and "--ckpt_path last" in text
    else:
        assert "checkpoints: none (no ModelCheckpoint callback): the 2 optimizer steps are lost" in text
        assert "resume:" not in text


# 8. --ckpt_path a file that is no checkpoint at all -------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "says"), [("text", "a text file"), ("png", "a PNG image"), ("cut", None)])
def test_ckpt_path_that_is_not_a_checkpoint_is_told_from_a_damaged_one(console, no_model, tmp_path, kind, says):
    path = tmp_path / {"text": "notes.txt", "png": "photo.png", "cut": "epoch=0-step=1.ckpt"}[kind]
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "png":
        Image.new("RGB", (8, 8)).save(path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])  # a copy cut short
    code, printed = console(
        "fit",
        "--config",
        DEMO,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--ckpt_path",
        str(path),
    )
    line = one_sentence(code, printed, "fit")
    if says:
        assert f"--ckpt_path {path} is not a checkpoint at all" in line and f"this is {says}" in line, line
        assert "damaged" not in line
    else:
        assert f"--ckpt_path {path} is damaged (not a complete checkpoint" in line, line
