"""Bad input to the commands (issue 23, "Bad input, round two"): `divrl sample`, `score`, `evaluate`, `fit` and
`validate` refuse it with one sentence naming the flag and the fix, before loading a model; `divrl evaluate`'s
scores survive a moved folder and a killed run. Each case here failed before with a traceback, silence, or rework."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from divrl.cli import main
from divrl.policy import KontextConfig, LoRAConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
EVAL_DEMO = str(ROOT / "configs/eval_demo.yaml")


def sample_args(out: Path, *more: str) -> list[str]:
    return ["sample", "--config", DEMO, "--trainer.logger", "false", "--output_dir", str(out), *more]


# 1. counts below one -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--num_samples", "0"), ("--num_samples", "-3"), ("--num_steps", "0"), ("--num_identities", "0")],
)
def test_sample_refuses_counts_below_one_naming_the_flag(console, no_model, tmp_path, flag, value):
    out = tmp_path / "out"
    code, printed = console(*sample_args(out, flag, value))
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl sample: {flag} {value}: must be at least 1" in printed.err
    assert not out.exists()  # nothing written


def test_evaluate_refuses_counts_below_one_before_generating(console, no_model, tmp_path):
    out = tmp_path / "eval"
    code, printed = console(
        "evaluate", "--config", EVAL_DEMO, "--methods", "{base: null}", "--num_steps", "0", "--output_dir", str(out)
    )
    assert code == 1 and "divrl evaluate: --num_steps 0: must be at least 1" in printed.err
    assert "Traceback" not in printed.err and not out.exists()


# 2. an output folder that cannot be written --------------------------------------------------------------------------


def test_sample_into_a_file_names_output_dir(console, no_model, tmp_path):
    out = tmp_path / "taken.png"
    out.write_bytes(b"a file, not a folder")
    code, printed = console(*sample_args(out))
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl sample: --output_dir {out} is a file, not a folder; pass a folder" in printed.err
    assert out.read_bytes() == b"a file, not a folder"


def test_sample_on_a_read_only_file_system_names_output_dir(console, no_model, tmp_path, monkeypatch):
    out = tmp_path / "readonly" / "samples"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # chmod does not stop root: the file system says no instead
        if self.is_relative_to(tmp_path / "readonly"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, printed = console(*sample_args(out))
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl sample: cannot write to --output_dir {out} (Read-only file system); pass a folder" in printed.err


# 3. non-finite weights -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_lora(tmp_path_factory) -> Path:
    """A LoRA of the demo model whose weights diverged (NaN): what a blown-up run exports."""
    policy = KontextConfig(
        model=str(ROOT / "data/demo/tiny-kontext"), lora=LoRAConfig(rank=8, alpha=16.0), max_sequence_length=32
    ).build()
    with torch.no_grad():
        for name, parameter in policy.transformer.named_parameters():
            if "lora_B" in name:
                parameter.fill_(float("nan"))
    return policy.save_lora(tmp_path_factory.mktemp("nan_lora"))


def test_sample_names_a_lora_whose_weights_are_not_finite_and_writes_no_image(console, tmp_path, nan_lora):
    out = tmp_path / "out"
    code, printed = console(
        *sample_args(
            out, "--lora", str(nan_lora.parent), "--num_identities", "1", "--num_samples", "1", "--num_steps", "1"
        )
    )
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl sample: --lora {nan_lora}: its weights are not finite (NaN or inf in " in printed.err
    assert "export it again or pick another checkpoint" in printed.err
    assert not list(out.rglob("*.png")) and not (out / "samples.json").exists()


def test_a_sample_run_that_stops_midway_leaves_no_image_samples_json_does_not_list(tmp_path, monkeypatch):
    from divrl.training.module import DivRLModule

    real, calls = DivRLModule.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (the second identity)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DivRLModule, "generate", generate)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the second identity"):
        main(sample_args(out, "--num_identities", "2", "--num_samples", "2", "--num_steps", "1"))
    meta = json.loads((out / "samples.json").read_text())
    listed = {Path(f) for record in meta["samples"] for f in record["files"] + record["references"]}
    written = {p for p in out.rglob("*.png") if not p.name.endswith("_grid.png")}
    assert written and written == listed and meta["complete"] is False
    with pytest.raises(
        FileExistsError, match=r"holds the samples.json of an earlier run \(stopped before it finished\)"
    ):
        main(sample_args(out, "--num_identities", "2"))  # a rerun into it is refused, saying why


def test_evaluate_names_weights_that_are_not_finite(tmp_path, nan_lora, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval"
    with pytest.raises(
        ValueError,
        match=r"methods.diverged .*pytorch_lora_weights.safetensors: its weights are not "
        r"finite",
    ):
        main(
            [
                "evaluate",
                "--config",
                EVAL_DEMO,
                "--methods",
                f"{{diverged: {nan_lora.parent}}}",
                "--num_identities",
                "1",
                "--prompts_per_identity",
                "1",
                "--num_samples",
                "1",
                "--num_steps",
                "1",
                "--output_dir",
                str(out),
                "--progress",
                "false",
            ]
        )
    assert not list(out.rglob("*.png"))


# 4. divrl score ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--size", "0", "must be >= 16"),
        ("--size", "-5", "must be >= 16"),
        ("--pool", "0", "must be >= 1"),
        ("--timeout", "0", "must be > 0"),
        ("--timeout", "-1", "must be > 0"),
        ("--retries", "-1", "must be >= 0"),
    ],
)
def test_score_refuses_sizes_and_settings_out_of_range(console, flag, value, says):
    code, printed = console("score", flag, value)
    assert code == 2 and f"argument {flag}: {says}, got {value}" in printed.err
    assert "Traceback" not in printed.err and "nSSM" not in printed.out  # nothing scored


def test_score_json_into_a_missing_folder_creates_it(tmp_path):
    target = tmp_path / "new" / "folder" / "scores.json"
    assert main(["score", "--json", str(target)]) == 0
    assert len(json.loads(target.read_text())["scores"]) == 5  # the built-in example group


def test_score_json_naming_a_folder_is_refused_before_scoring(console, tmp_path):
    code, printed = console("score", "--json", str(tmp_path))
    assert code == 1 and "Traceback" not in printed.err and "nSSM" not in printed.out
    assert f"divrl score: --json {tmp_path} is a folder; give a file name" in printed.err


# 5. evaluate --samples_dir -------------------------------------------------------------------------------------------


def test_evaluate_names_a_missing_samples_dir_before_generating(console, tmp_path):
    out, missing = tmp_path / "eval", tmp_path / "no-such-samples"
    code, printed = console(
        "evaluate",
        "--config",
        EVAL_DEMO,
        "--methods",
        "{base: null}",
        "--samples_dir",
        str(missing),
        "--output_dir",
        str(out),
    )
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl evaluate: --samples_dir {missing} is not a folder" in printed.err
    assert not out.exists()  # nothing generated


def test_evaluate_names_a_missing_sample_method_before_generating(console, tmp_path):
    out, samples = tmp_path / "eval", tmp_path / "samples"
    (samples / "other" / "tgt_image").mkdir(parents=True)
    code, printed = console(
        "evaluate",
        "--config",
        EVAL_DEMO,
        "--methods",
        "{base: null}",
        "--samples_dir",
        str(samples),
        "--sample_methods",
        "[other, typo]",
        "--output_dir",
        str(out),
    )
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl evaluate: --sample_methods ['typo'] have no <method>/tgt_image folder in {samples}" in printed.err
    assert not out.exists()


# 6. --ckpt_path ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_given_a_lora_says_where_loras_go(console, no_model, tmp_path, nan_lora, command):
    code, printed = console(
        command,
        "--config",
        DEMO,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(nan_lora),
    )
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl {command}: --ckpt_path {nan_lora} is not a training checkpoint" in printed.err
    assert "divrl sample --lora" in printed.err and "divrl evaluate --methods" in printed.err


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_ckpt_path_that_does_not_exist_is_named(console, no_model, tmp_path, command):
    missing = tmp_path / "checkpoints" / "epoch=0-step=30.ckpt"
    code, printed = console(
        command,
        "--config",
        DEMO,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(missing),
    )
    assert code == 1 and "Traceback" not in printed.err
    assert f"divrl {command}: --ckpt_path {missing} does not exist" in printed.err


def test_ckpt_path_keywords_and_sharded_folders_pass_as_before(tmp_path):
    from divrl.training.checkpoints import resume_path

    sharded = tmp_path / "last.ckpt"  # FSDP2 writes a folder
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"dcp")
    for value in (None, "hpc", "best", "registry:model", "s3://bucket/run/last.ckpt", str(sharded)):
        assert resume_path(value, [str(tmp_path / "none")]) == value
    assert resume_path("last", [str(tmp_path)]) == str(sharded)  # the newest intact checkpoint (a folder)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"--ckpt_path .*lora is not a training checkpoint"):
        resume_path(str(lora), [])


# 7. scores.jsonl: moved folders, old files, torn lines --------------------------------------------------------------


def cheap_evaluation(folder: Path):
    from divrl.eval import EvalSuite, Evaluation, data_conditions
    from divrl.rewards import FeatureScorer
    from divrl.rewards.backbones import DenseDescriptor

    suite = EvalSuite(identity=FeatureScorer(DenseDescriptor(grid_size=24, cell=4), pool=1))
    conditions = data_conditions([str(ROOT / "data/demo/val-000000.tar")], 2, 2)

    def generate(condition, num_samples, seed):
        return torch.rand(num_samples, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    return Evaluation(suite, folder, num_samples=2, grid_conditions=0, progress=False), conditions, generate


def scored_again(monkeypatch) -> list:
    """Count the groups the suite scores from now on."""
    from divrl.eval.suite import EvalSuite

    real, calls = EvalSuite.score_group, []

    def score_group(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EvalSuite, "score_group", score_group)
    return calls


def test_a_moved_evaluation_folder_reuses_every_score(tmp_path, monkeypatch):
    evaluation, conditions, generate = cheap_evaluation(tmp_path / "eval")
    first = evaluation.run_method("base", conditions, generate)
    rows = [json.loads(line) for line in (tmp_path / "eval/base/scores.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rows} == {
        f"images/{c.id}/{c.prompt_index:03d}_{k}.png" for c in conditions for k in range(2)
    }  # relative to the method folder
    shutil.move(tmp_path / "eval", tmp_path / "moved")
    calls = scored_again(monkeypatch)
    evaluation, _, _ = cheap_evaluation(tmp_path / "moved")
    assert evaluation.run_method("base", conditions, generate) == first and calls == []


def test_scores_written_with_absolute_paths_are_still_reused(tmp_path, monkeypatch):
    evaluation, conditions, generate = cheap_evaluation(tmp_path / "eval")
    first = evaluation.run_method("base", conditions, generate)
    scores = tmp_path / "eval/base/scores.jsonl"
    old = [
        {**row, "file": str(tmp_path / "eval/base" / row["file"])}
        for row in map(json.loads, scores.read_text().splitlines())
    ]
    scores.write_text("".join(json.dumps(row) + "\n" for row in old))  # what divrl wrote before
    calls = scored_again(monkeypatch)
    assert cheap_evaluation(tmp_path / "eval")[0].run_method("base", conditions, generate) == first and calls == []


def test_a_torn_last_line_is_not_glued_to_the_next_row(tmp_path, monkeypatch):
    evaluation, conditions, generate = cheap_evaluation(tmp_path / "eval")
    first = evaluation.run_method("base", conditions, generate)
    scores = tmp_path / "eval/base/scores.jsonl"
    lines = scores.read_text().splitlines()
    torn = lines[-1][: len(lines[-1]) // 2]
    scores.write_text("\n".join(lines[:-1] + [torn]))  # killed while writing the last row
    calls = scored_again(monkeypatch)
    assert cheap_evaluation(tmp_path / "eval")[0].run_method("base", conditions, generate) == first
    assert len(calls) == 1  # the torn row's group only
    after = scores.read_text().splitlines()
    assert after[len(lines) - 1] == torn and len(after) == len(lines) + 2  # the torn line, then its group's 2 rows
    rows = [json.loads(line) for line in after if line != torn]  # every other line parses
    assert {r["key"] for r in rows} == {f"{c.key}/{k}" for c in conditions for k in range(2)}  # nothing is lost
