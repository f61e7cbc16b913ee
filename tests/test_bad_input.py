"""Bad input gets a sentence that names the input and the fix (issue: bad input and the first run); each case here
failed before with a traceback, a wrong hint, or silence."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from divrl.cli import main
from divrl.objectives import GRPOObjective
from divrl.objectives.base import SamplingConfig
from divrl.policy import KontextPolicy, LoRAConfig
from divrl.policy.kontext.builder import _load_hint
from divrl.training import StageSwitch

ROOT = Path(__file__).resolve().parents[1]


def test_a_group_of_one_is_refused_where_it_would_train_nothing():
    with pytest.raises(ValueError, match=r"group_size 1 with objective.adv_scope 'group'.*train nothing"):
        GRPOObjective().check(SamplingConfig(group_size=1))
    GRPOObjective(adv_scope="batch").check(SamplingConfig(group_size=1))  # batch statistics: advantages are not 0


def test_a_run_that_ends_before_the_stage_switch_says_so():
    module = SimpleNamespace(rewards=[1, 2], objectives=[1])
    with pytest.warns(UserWarning, match=r"max_steps 5 ends this run before StageSwitch's switch_steps 60: stage 2"):
        StageSwitch(60).setup(SimpleNamespace(max_steps=5), module, "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StageSwitch(60).setup(SimpleNamespace(max_steps=400), module, "fit")  # reaches stage 2: no warning


@pytest.mark.parametrize(
    ("flag", "value"), [("--num-identities", "-5"), ("--prompts-per-identity", "0"), ("--resolution", "-5")]
)
def test_data_refuses_negative_counts_and_sizes_naming_the_flag(tmp_path, capsys, flag, value):
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(out), flag, value]) == 2
    assert f"{flag} {value}" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_data_refuses_a_folder_of_shards_unless_told_to_overwrite(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "4", "--resolution", "32"]) == 0
    first = sorted(p.name for p in out.glob("*.tar"))
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "2", "--resolution", "32"]) == 2
    assert "already holds" in capsys.readouterr().err and sorted(p.name for p in out.glob("*.tar")) == first
    shutil.copy(out / "train-000000.tar", out / "train-000009.tar")  # an old shard the new run would not write
    assert (
        main(
            [
                "data",
                "synthetic",
                "--out",
                str(out),
                "--num-identities",
                "2",
                "--resolution",
                "32",
                "--shard-size",
                "1",
                "--overwrite",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]  # no old shard left


def test_an_overwrite_whose_source_fails_keeps_the_old_shards(tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "2", "--resolution", "32"]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (tmp_path / "empty").mkdir()
    assert main(["data", "dreambooth", "--src", str(tmp_path / "empty"), "--out", str(out), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before and sorted(out.iterdir()) == sorted(
        out / name for name in before
    )  # nothing left behind either


def test_data_names_an_unwritable_out_folder(tmp_path, capsys, monkeypatch):
    from divrl.data import converters

    out = tmp_path / "readonly"

    def read_only(records, folder, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(folder) / "train-000000.tar"))

    monkeypatch.setattr(converters, "write_shards", read_only)
    assert main(["data", "synthetic", "--out", str(out), "--num-identities", "2", "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --out {out} (Read-only file system)" in err and "Traceback" not in err


def test_sample_names_a_reference_that_is_not_an_image(tmp_path):
    from divrl.training.trainer import _conditions

    bad = tmp_path / "notanimage.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"--reference: cannot read image .*notanimage.png"):
        _conditions(None, bad, ["a prompt"], None, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    policy = KontextPolicy.tiny(0, lora=LoRAConfig(rank=4, alpha=8.0))
    return policy, policy.save_lora(tmp_path_factory.mktemp("lora"))


def test_a_damaged_lora_file_is_named(exported, tmp_path):
    policy, path = exported
    cut = tmp_path / "pytorch_lora_weights.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])  # a copy that stopped early
    with pytest.raises(ValueError, match=r"load_lora: .*pytorch_lora_weights.safetensors is damaged"):
        policy.load_lora(tmp_path)


def test_exported_loras_are_readable_like_every_other_file(exported):
    _, path = exported
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors alone leaves 0600


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a CUDA GPU")
def test_the_paper_config_on_a_machine_without_gpus_points_to_the_demo(capsys):
    assert main(["fit", "--config", str(ROOT / "configs/explore.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "configs/demo.yaml" in err and "--trainer.accelerator cpu" in err


def test_model_load_hints_name_the_real_cli_and_setting():
    hint = _load_hint("black-forest-labs/FLUX.1-Kontext-dev", OSError("offline"))
    assert "cannot load the model: 'black-forest-labs/FLUX.1-Kontext-dev' is neither" in hint
    assert "`hf download black-forest-labs/FLUX.1-Kontext-dev`" in hint and "local_files_only: true" in hint
    assert "`hf auth login`" in _load_hint("x/y", OSError("401 gated"))
    assert "huggingface-cli" not in (ROOT / "README.md").read_text() + (ROOT / "configs/explore.yaml").read_text()


def test_a_lora_trained_with_another_alpha_is_refused_not_rescaled(exported):
    _, path = exported  # alpha 8
    other = KontextPolicy.tiny(0, lora=LoRAConfig(rank=4, alpha=16.0))
    with pytest.raises(
        ValueError,
        match=r"trained with alpha 8 \(its metadata\) where this adapter has 16; set "
        r"policy.lora.alpha to 8",
    ):
        other.load_lora(path)
    KontextPolicy.tiny(0, lora=LoRAConfig(rank=4, alpha=8.0)).load_lora(path)  # the same alpha loads


def test_the_console_prints_divrl_sentences_without_a_traceback(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "notanimage.png"
    bad.write_text("hello")
    argv = [
        "divrl",
        "sample",
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--trainer.logger",
        "false",
        "--reference",
        str(bad),
        "--prompts",
        "[a photo]",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", argv)
    assert main() == 1
    err = capsys.readouterr().err
    assert "divrl sample: --reference: cannot read image" in err and "Traceback" not in err
    monkeypatch.setenv("DIVRL_TRACEBACK", "1")
    with pytest.raises(ValueError, match="cannot read image"):
        main()


def test_only_divrl_own_input_errors_lose_their_traceback():
    from divrl.cli import expected_error

    def raised(fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            return err

    assert expected_error(raised(lambda: int("x"))) is None  # raised outside divrl: a bug, keep the traceback
    from divrl.policy.compute import LoRAComputeLinear

    layer = LoRAComputeLinear.wrap(torch.nn.Linear(3, 2), torch.float32)
    shape_bug = raised(lambda: layer(torch.ones(2, 5)))  # torch's error on a divrl line: still a bug
    assert isinstance(shape_bug, RuntimeError) and expected_error(shape_bug) is None
    assert expected_error(raised(lambda: GRPOObjective().check(SamplingConfig(group_size=1)))).startswith(
        "sampling.group_size 1"
    )
    union = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n"
        "  - DINOv2Backbone: cannot load model 'x'\n  - Expected a <class 'NoneType'>\n"
    )
    assert expected_error(union) == "DINOv2Backbone: cannot load model 'x'"


def checkpoint_file(path: Path, step: int, mtime: int) -> Path:
    torch.save({"global_step": step, "weights": torch.arange(1000.0)}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_a_checkpoint_save_that_is_killed_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from divrl.training.checkpoints import AtomicCheckpointIO

    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(a).name), real_replace(a, b)))
    io.save_checkpoint({"global_step": 1}, tmp_path / "hpc_ckpt_2.ckpt")
    # a killed save's leftover must not look like a checkpoint to Lightning's "last" or SLURM "hpc" lookups
    assert renamed[0].startswith(".divrl-partial-") and "hpc_ckpt_" not in renamed[0] and "last" not in renamed[0]
    io.save_checkpoint({"global_step": 1}, target)
    real = torch.save

    def killed(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise KeyboardInterrupt  # the process dies after writing part of the new checkpoint

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert sorted(tmp_path.iterdir()) == [tmp_path / "hpc_ckpt_2.ckpt", target]


def test_resume_from_last_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from divrl.training.checkpoints import resume_path

    good = checkpoint_file(tmp_path / "epoch=0-step=2.ckpt", 2, 1_000)
    checkpoint_file(tmp_path / "epoch=0-step=1.ckpt", 1, 500)
    last = checkpoint_file(tmp_path / "last.ckpt", 3, 2_000)
    assert resume_path("last", [str(tmp_path)]) == str(last)
    last.write_bytes(last.read_bytes()[:300])  # cut short by a crash while it was copied
    with pytest.warns(UserWarning, match=r"last.ckpt is damaged .*resuming from .*epoch=0-step=2.ckpt"):
        assert resume_path("last", [str(tmp_path)]) == str(good)
    with pytest.raises(ValueError, match=r"last.ckpt is damaged .*newest intact checkpoint beside it is .*step=2"):
        resume_path(str(last), [str(tmp_path)])
    last.unlink()
    with pytest.warns(UserWarning, match="there is no last.ckpt; resuming from"):
        assert resume_path("last", [str(tmp_path)]) == str(good)
    assert resume_path(None, [str(tmp_path)]) is None and resume_path("last", [str(tmp_path / "none")]) == "last"


def test_a_resumed_run_keeps_the_command_line_and_refuses_what_its_weights_cannot_take():
    from divrl.policy import KontextConfig
    from divrl.training.checkpoints import compare_settings

    saved = {
        "policy": {
            "class_path": "divrl.policy.KontextConfig",
            "init_args": {"model": "tiny", "lora": {"rank": 8, "alpha": 16.0, "target_modules": ["attn.to_q"]}},
        },
        "sampling": {"group_size": 8, "num_steps": 4},
        "_instantiator": "lightning",
    }
    same = {
        "policy": KontextConfig(model="tiny", lora=LoRAConfig(rank=8, alpha=16.0, target_modules=("attn.to_q",))),
        "sampling": SamplingConfig(group_size=8, num_steps=4),
    }
    assert compare_settings(saved, same) == {}  # the checkpoint's dict form and the run's objects agree
    other = dict(same, sampling=SamplingConfig(group_size=4, num_steps=4))
    assert compare_settings(saved, other) == {"sampling.group_size": (8, 4)}  # may change: the command line's apply
    rank = dict(
        same, policy=KontextConfig(model="tiny", lora=LoRAConfig(rank=4, alpha=16.0, target_modules=("attn.to_q",)))
    )
    with pytest.raises(ValueError, match=r"model.policy.lora.rank: 8 in the checkpoint, 4 now"):
        compare_settings(saved, rank)
    full = dict(same, policy=KontextConfig(model="tiny", lora=None, train_transformer=True))
    with pytest.raises(ValueError, match=r"model.policy.lora: '<mapping>' in the checkpoint, None now"):
        compare_settings(saved, full)


def test_citations_point_at_files_the_repository_ships():
    """Users have the repository, not the project's private notes: every citation is docs/reference.md."""
    cited = [
        p
        for pattern in ("src/**/*.py", "configs/*.yaml", "*.md", "docs/*.md", "examples/**/*")
        for p in ROOT.glob(pattern)
        if p.is_file() and "REFERENCE.md" in p.read_text(errors="ignore")
    ]
    assert cited == [] and (ROOT / "docs/reference.md").is_file()


@pytest.mark.slow  # about 10 s: the demo's first run, in a process of its own
def test_the_demo_starts_quietly_and_ends_with_a_summary(tmp_path):
    """The first run prints divrl's lines and the real warnings, none of the third-party notices divrl.notices lists,
    no model-loading bars, a progress bar labelled with the stage and step, and a summary at the end."""
    import subprocess
    import sys

    from divrl.notices import NOTICES, WARNINGS

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "divrl.cli",
            "fit",
            "--config",
            "configs/demo.yaml",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "DIVRL_NOTICES"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for _, pattern, why in NOTICES:
        assert not re.search(pattern, output), why
    for pattern, why in WARNINGS:
        assert not re.search(pattern, output), why
    assert "Loading pipeline components" not in output and "Loading weights" not in output
    assert "stage 1 · step 2/2" in output and "Epoch 0/-2" not in output
    assert "[divrl] fit ended: 2 optimizer steps, 2 rollouts" in output and "skipped:     nothing" in output
    assert f"tensorboard --logdir {tmp_path}" in output
    assert "max_steps 2 ends this run before StageSwitch" in output  # a real warning stays


def test_quiet_drops_only_the_listed_notices(caplog):
    import logging

    from divrl.notices import quiet

    quiet()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: no such file")
        logging.getLogger("torchao").warning("something else torchao wants you to know")
    assert [r.getMessage() for r in caplog.records] == ["something else torchao wants you to know"]


def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys):
    from divrl.data import converters as C

    src = tmp_path / "dreambooth"
    (src / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(src / "dog" / "00.jpg")
    (src / "prompts_and_classes.txt").write_bytes(b"subject_name,class\ndog,dog\n\nPrompts\ncaf\xe9 au lait\n")
    assert main(["data", "dreambooth", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "prompts_and_classes.txt: line 5 is not UTF-8 (byte 0xe9" in capsys.readouterr().err
    bad = tmp_path / "00.txt"
    bad.write_bytes(b"a subject\nan \xff prompt\n")
    skipped = C._read_lines(bad, "object/00")
    assert "line 2 is not UTF-8" in skipped.reason and "00.txt" in skipped.reason
