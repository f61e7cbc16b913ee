"""Bad input a fourth fuzz of the commands found: jsonargparse's refusals were a 75-97 line usage screen with the
error at its end (now one sentence naming the key, with the closest valid name), a key given twice in a YAML config
kept its last value silently, `validate --ckpt_path last` without a checkpoint scored the base model, `sample` wrote
over a user's images, a huge seed, a read-only `score --json` and a Ctrl-C during start-up were tracebacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")


def sentence(code, printed, command: str, expected_code: int = 2) -> str:
    """The refusal: exit code, no usage screen, no traceback, one line naming the command."""
    assert code == expected_code, printed.err[-2000:]
    assert "usage:" not in printed.err and "Traceback" not in printed.err, printed.err[-2000:]
    return next(line for line in printed.err.splitlines() if line.startswith(f"divrl {command}: "))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--modle.sampling.group_size", "4"],
            "unknown option --modle.sampling.group_size; did you mean --model.sampling.group_size?",
        ),
        (["--model.sampling.num_stepz", "4"], "did you mean --model.sampling.num_steps?"),
        (["--model.sampling.group_size", "eight"], "model.sampling.group_size: expected int, got 'eight'"),
        (
            ["--model.optimizer", "torch.optim.AdamWW"],
            "torch.optim.AdamWW does not exist; did you mean torch.optim.AdamW?",
        ),
        (
            ["--model.objective.init_args.timestep_fractoin", "0.5"],
            "divrl.objectives.GRPOObjective takes no option 'timestep_fractoin'; did you mean timestep_fraction?",
        ),
        (["--trainer.callbacks+=divrl.training.StageSwich"], "did you mean divrl.training.StageSwitch?"),
        (["--trainer.precision", "banana"], "trainer.precision: got 'banana'; expected int or one of"),
        (["--model.policy.lora", "[8, 16]"], "lora: got '[8, 16]'; expected null or a mapping of LoRAConfig settings"),
    ],
)
def test_jsonargparse_refusals_are_one_sentence_with_the_closest_name(console, no_model, args, says):
    code, printed = console("fit", "--config", DEMO, *args)
    line = sentence(code, printed, "fit")
    assert says in line and line.endswith("(divrl fit --help lists every option)"), line


def test_a_typo_in_a_config_file_and_in_an_evaluation_suite(console, no_model, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("modle:\n  sampling:\n    group_size: 4\n")
    assert "did you mean --model.sampling.group_size?" in sentence(
        *console("fit", "--config", DEMO, "--config", str(config)), "fit"
    )
    line = sentence(
        *console(
            "evaluate",
            "--config",
            str(ROOT / "configs/eval_demo.yaml"),
            "--suite.init_args.identity.init_args.tau_ss",
            "0.5",
        ),
        "evaluate",
    )
    assert "divrl.rewards.FeatureScorer takes no option 'tau_ss'; did you mean tau_s?" in line


def test_a_key_given_twice_in_a_config_is_refused_with_both_lines(console, no_model, tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  sampling:\n    group_size: 4\n    group_size: 2\n")
    line = sentence(*console("fit", "--config", DEMO, "--config", str(config)), "fit", expected_code=1)
    assert f"--config {config}" in line and "key 'group_size' is given twice in one mapping (lines 3 and 4)" in line


def test_validate_last_without_a_checkpoint_refuses_instead_of_scoring_the_base_model(console, no_model, tmp_path):
    line = sentence(
        *console(
            "validate",
            "--config",
            DEMO,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--ckpt_path",
            "last",
        ),
        "validate",
        expected_code=1,
    )
    assert "--ckpt_path last: no checkpoint in" in line and "drop --ckpt_path to validate the base model" in line


def test_a_seed_outside_numpys_range_is_one_sentence(console, no_model):
    line = sentence(
        *console("fit", "--config", DEMO, "--seed_everything", "99999999999999999999"), "fit", expected_code=1
    )
    assert "seed_everything 99999999999999999999 must lie in [0, 4294967295]" in line


def test_sample_never_writes_over_a_users_images(console, no_model, tmp_path):
    reference = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(reference)
    out = tmp_path / "out"
    (out / "ref").mkdir(parents=True)
    (out / "ref" / "000_0.png").write_bytes(b"the user's own picture")
    line = sentence(
        *console(
            "sample",
            "--config",
            DEMO,
            "--trainer.logger",
            "false",
            "--reference",
            str(reference),
            "--prompts",
            "[a photo]",
            "--num_samples",
            "1",
            "--output_dir",
            str(out),
        ),
        "sample",
        expected_code=1,
    )
    assert f"already holds {out / 'ref' / '000_0.png'}, which this run would overwrite" in line
    assert (out / "ref" / "000_0.png").read_bytes() == b"the user's own picture"


def test_score_json_that_cannot_be_written_is_named_before_and_after_scoring(console, tmp_path, monkeypatch):
    reference = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(reference)
    args = ("score", "--reference", str(reference), str(reference), "--size", "32", "--json", str(tmp_path / "s.json"))
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode))
    line = sentence(*console(*args), "score", expected_code=1)
    assert "cannot write --json" in line and "read-only" in line
    monkeypatch.setattr(os, "access", real)

    def read_only(self, *a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)  # the file system turned read-only while scoring
    code, printed = console(*args)
    line = sentence(code, printed, "score", expected_code=1)
    assert "cannot write --json" in line and "the scores are printed above" in line and "ref.png" in printed.out


def test_ctrl_c_while_starting_is_one_line(console, monkeypatch):
    import divrl.cli

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(divrl.cli, "_main", interrupted)
    code, printed = console("fit", "--config", DEMO)
    assert code == 130 and printed.err.strip() == "divrl fit: interrupted"


def test_trainer_devices_zero_says_what_to_give(console, no_model):
    line = sentence(*console("fit", "--config", DEMO, "--trainer.devices", "0"), "fit", expected_code=1)
    assert "trainer.devices" in line and "give a number of devices >= 1" in line


@pytest.mark.parametrize("value", ["false", "no", "off", "0", ""])
def test_divrl_traceback_false_means_off(console, no_model, monkeypatch, value):
    monkeypatch.setenv("DIVRL_TRACEBACK", value)
    monkeypatch.setattr("sys.argv", ["divrl"])
    line = sentence(*console("fit", "--config", DEMO, "--seed_everything", "-1"), "fit", expected_code=1)
    assert "must lie in" in line
