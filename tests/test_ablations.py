"""benchmarks/ablations.py: its configs change only the rewards, its tables and statistics are what a hand computation
gives, and at its smallest (1 seed, 2 methods, 2 updates) its numbers are those of the same `divrl fit` /
`divrl evaluate` run done directly, it does not rerun finished runs, and `--replot` redraws identical figures."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from divrl.cli import run_lightning
from divrl.rewards import LinearReward, NSSMReward, VSMReward

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools")]

import ablation_report  # noqa: E402
import disentanglement  # noqa: E402
import objectives  # noqa: E402

ABLATIONS = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
EXPECTED = {
    "nssm_only.yaml": (NSSMReward, None),
    "vsm_only.yaml": (VSMReward, None),
    "linear_w0.25.yaml": (LinearReward, 0.25),
    "linear_w0.5.yaml": (LinearReward, 0.5),
    "linear_w0.75.yaml": (LinearReward, 0.75),
}


def without_rewards(cfg) -> dict:
    flat = cfg.clone().as_dict()
    flat.pop("config", None)
    flat["model"].pop("rewards")
    return flat


@pytest.mark.parametrize("config", ABLATIONS, ids=lambda p: p.name)
def test_each_ablation_config_changes_only_the_reward_of_both_stages(config, tmp_path):
    assert {p.name for p in ABLATIONS} == set(EXPECTED)
    cli = run_lightning(["--config", str(DEMO), "--trainer.default_root_dir", str(tmp_path)], run=False)
    demo = cli.parser.parse_args(["--config", str(DEMO)])
    cfg = cli.parser.parse_args(["--config", str(DEMO), "--config", str(config)])
    assert without_rewards(cfg) == without_rewards(demo)  # same model, data, optimizer, budget, stage switch
    rewards = cli.parser.instantiate_classes(cfg).model.rewards
    kind, weight = EXPECTED[config.name]
    assert [type(r) for r in rewards] == [kind, kind]
    assert all(r.scorer.pool == 2 and r.scorer.backbone.grid_size == 24 for r in rewards)  # the demo's features
    if weight is not None:
        assert [r.weight for r in rewards] == [weight, weight]


def entry(part, method, seed, **eval_metrics) -> dict:
    return {"part": part, "method": method, "seed": seed, "config": {}, "metrics": {"eval": eval_metrics}}


def test_reward_table_is_mean_and_sample_sd_and_marks_gaps_beyond_the_spread():
    ratios = {"divrl": [0.60, 0.70, 0.65], "linear_w0.5": [0.30, 0.32, 0.31], "nssm_only": [0.62, 0.70, 0.68]}
    runs = [entry("rewards", "base", None, consistency_ratio=0.9, diversity_over_consistency=0.2)]
    for method, values in ratios.items():
        for seed, value in enumerate(values):
            runs.append(entry("rewards", method, seed, consistency_ratio=value, diversity_over_consistency=0.5))
    runs.append({**entry("rewards", "base", 0), "metrics": {"val": {"updates": [0], "nssm": [0.4]}}})
    body = ablation_report.tables({"runs": runs})["ablations-rewards"]
    divrl = next(line for line in body.splitlines() if line.startswith("| DivRL"))
    assert f"{statistics.mean(ratios['divrl']):.3f} ± {statistics.stdev(ratios['divrl']):.3f}" == "0.650 ± 0.050"
    assert "| 0.650 ± 0.050 | 0.500 ± 0.000 | 3 |" in divrl
    assert "| base model | — | — | — | 0.900 | 0.200 | 1 evaluation |" in body  # the seeded validation entry ignored
    # linear: gap -0.34 against sds 0.05 + 0.01; nSSM only: gap +0.017 against 0.05 + 0.042
    assert "linear, w = 0.5 against DivRL (R1 → R2): consistency ratio -0.340 (larger than the spread)" in body
    assert "nSSM only against DivRL (R1 → R2): consistency ratio +0.017 (within the spread)" in body


def test_objectives_summary_takes_the_last_validation_before_each_budget_point():
    def curve(rewards):  # validations at 0, 10, 20, 30 s of a 40 s budget, the last at 41 s
        times = [0, 10, 20, 30, 41]
        return [
            {"seconds": t, "batches": i, "reward": r, "nssm": r, "vsm": 1 - r}
            for i, (t, r) in enumerate(zip(times, rewards))
        ]

    saved = {
        "budget": 40.0,
        "seeds": [0, 1],
        "curves": {
            "grpo": {"0": curve([0.1, 0.2, 0.3, 0.4, 0.5]), "1": curve([0.1, 0.3, 0.3, 0.5, 0.7])},
            "nft": {"0": curve([0.1, 0.1, 0.1, 0.1, 0.1]), "1": curve([0.1, 0.1, 0.1, 0.1, 0.12])},
        },
    }
    table, pairs = objectives.summary(saved)
    assert table["grpo"]["25%"]["reward"] == pytest.approx((0.25, statistics.stdev([0.2, 0.3])))  # at 10 s
    assert table["grpo"]["50%"]["reward"] == pytest.approx((0.3, 0.0))  # at 20 s
    assert table["grpo"]["100%"]["reward"] == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))  # the last one
    assert [(p["better"], p["worse"]) for p in pairs] == [("grpo", "nft")]
    assert pairs[0]["gap"] == pytest.approx(0.6 - 0.11)


@pytest.mark.slow  # about 8 s: a real fit
def test_objective_curves_count_the_batches_trained_before_each_validation(tmp_path):
    """A real objectives run (its own override config, cut to 2 batches, validation after each): the curve's batches are
    the batches trained before each validation, as the checkpoint Lightning names after its optimizer steps says."""
    from divrl.cli import main

    objectives.overrides(tmp_path, "grpo", budget=1000.0, val_every=1)
    small = ["--trainer.max_steps", "2", "--model.sampling.group_size", "2", "--model.objective.micro_batch_size", "2"]
    small += ["--data.val_identities", "1", "--model.sampling.val_group_size", "1"]
    assert main([*objectives.fit_command(tmp_path, "grpo"), *small]) == 0
    curve = objectives.read_curve(tmp_path / "grpo")
    assert [c["batches"] for c in curve] == [1, 2]
    assert [p.name for p in (tmp_path / "grpo/checkpoints").glob("*.ckpt")] == ["epoch=1-step=2.ckpt"]
    assert 0 < curve[0]["seconds"] < curve[1]["seconds"]


def test_auc_is_the_mann_whitney_statistic_and_recolouring_keeps_brightness_and_layout():
    from scipy.stats import mannwhitneyu

    positive, negative = [0.9, 0.4, 0.7, 0.7], [0.1, 0.7, 0.3]
    u = mannwhitneyu(positive, negative).statistic
    assert disentanglement.auc(positive, negative) == pytest.approx(u / (len(positive) * len(negative)))
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    turned = disentanglement.recolour(images)
    assert torch.allclose(turned.mean(1), images.mean(1), atol=1e-6)  # the grey axis is the rotation's axis
    assert not torch.allclose(turned, images, atol=0.05)
    assert torch.allclose(disentanglement.recolour(disentanglement.recolour(turned)), images, atol=1e-5)  # 3 × 120°


def script(*args: str, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks/ablations.py"), "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "true"})


def divrl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "divrl.cli", *args], cwd=ROOT, check=True, capture_output=True)


def metadata(file) -> dict:
    """A safetensors file's metadata with its JSON values parsed and their lists sorted: safetensors writes the map,
    and peft the ``target_modules`` set, in an order that changes from process to process."""

    def tidy(value):
        if isinstance(value, dict):
            return {k: tidy(v) for k, v in value.items()}
        return sorted(map(str, value)) if isinstance(value, list) else value

    return {k: tidy(json.loads(v)) if v.startswith("{") else v for k, v in (file.metadata() or {}).items()}


SMALL = (
    "--seeds",
    "0",
    "--only",
    "divrl,vsm_only,disentanglement",
    "--fit-args",
    "--trainer.max_steps 2 --data.steps_per_epoch 1 --trainer.check_val_every_n_epoch 1",
    "--eval-args",
    "--num_samples 1 --num_steps 2",
)


@pytest.mark.slow
def test_smallest_run_equals_the_direct_divrl_runs_resumes_and_replots(tmp_path):
    from readme_numbers import scalars

    out = tmp_path / "runs"
    done = script(*SMALL, "--dreambooth", str(tmp_path / "none"), out=out)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "ablations.json").read_text())
    keys = [(e["part"], e["method"], e["seed"]) for e in saved["runs"]]
    assert keys == [
        ("rewards", "base", None),
        ("rewards", "base", 0),
        ("rewards", "divrl", 0),
        ("rewards", "vsm_only", 0),
    ]
    runs = {e["method"]: e for e in saved["runs"] if e["seed"] == 0}
    assert runs["base"]["metrics"]["val"]["updates"] == [0]
    for method in ("divrl", "vsm_only"):
        metrics = runs[method]["metrics"]
        assert {"consistency_ratio", "diversity_over_consistency", "vsm", "mtg_nssm"} <= set(metrics["eval"])
        assert metrics["val"]["updates"] == [1, 2] and len(metrics["val"]["nssm"]) == len(metrics["val"]["vsm"]) == 2
    assert runs["divrl"]["metrics"]["eval"] != runs["vsm_only"]["metrics"]["eval"]  # R1 = nSSM vs VSM: other LoRAs

    # the same `divrl fit` and `divrl evaluate`, run directly from the recorded arguments
    config, direct = runs["vsm_only"]["config"], tmp_path / "direct"
    divrl(*config["fit"], "--trainer.default_root_dir", str(direct))
    methods = json.dumps({"vsm_only": str(direct / "lora/final")})
    divrl(*config["evaluate"], "--methods", methods, "--output_dir", str(direct / "eval"), "--progress", "false")
    metrics = json.loads((direct / "eval/metrics.json").read_text())["methods"]["vsm_only"]["overall"]
    assert metrics == runs["vsm_only"]["metrics"]["eval"]
    logged = scalars(direct)
    assert [v for _, v in sorted(logged["val/vsm"])] == runs["vsm_only"]["metrics"]["val"]["vsm"]
    assert [v for _, v in sorted(logged["val/nssm"])] == runs["vsm_only"]["metrics"]["val"]["nssm"]  # tracked
    assert statistics.mean(v for _, v in logged["reward/vsm"]) == pytest.approx(
        runs["vsm_only"]["metrics"]["train"]["reward/vsm"], rel=1e-12
    )
    lora = "lora/final/pytorch_lora_weights.safetensors"  # the same tensors, bit for bit, and the same metadata
    with safe_open(direct / lora, "pt") as mine, safe_open(out / "rewards/vsm_only/seed0" / lora, "pt") as theirs:
        assert metadata(mine) == metadata(theirs) and sorted(mine.keys()) == sorted(theirs.keys())
        assert all(torch.equal(mine.get_tensor(k), theirs.get_tensor(k)) for k in mine.keys())

    # the disentanglement part scores DivRL's samples as `divrl evaluate` did
    generated = saved["disentanglement"]["results"][0]["pairs"]["generated: DivRL"]
    rows = (out / "rewards/divrl/seed0/eval/divrl/scores.jsonl").read_text().splitlines()
    evaluated = sorted((round(r["mtg_nssm"], 4), round(r["vsm"], 4)) for r in map(json.loads, rows))
    scored = sorted(map(tuple, generated))
    assert len(scored) == len(evaluated) == 32  # 8 identities x 4 prompts x 1 sample
    assert max(abs(a - b) for pair, row in zip(scored, evaluated) for a, b in zip(pair, row)) <= 1e-4
    assert any("DreamBooth" in note for note in saved["disentanglement"]["unavailable"])

    # a rerun trains nothing; other arguments in the same folder are refused
    stamp = (out / "rewards/divrl/seed0/run.json").stat().st_mtime_ns
    again = script(*SMALL, "--dreambooth", str(tmp_path / "none"), out=out)
    assert again.returncode == 0 and (out / "rewards/divrl/seed0/run.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "ablations.json").read_text())["runs"] == saved["runs"]
    other_fit = SMALL[5].replace("max_steps 2", "max_steps 3")  # the same evaluation, another fit
    other = script("--seeds", "0", "--only", "divrl", "--fit-args", other_fit, "--eval-args", SMALL[7], out=out)
    assert other.returncode != 0 and "made with other arguments" in other.stderr

    # --replot redraws the same figures from the JSON alone
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["ablations_curves.png", "ablations_disentanglement.png", "ablations_frontier.png"]
    replot = script("--replot", "--json", str(out / "ablations.json"), "--figures", str(tmp_path / "replot"), out=out)
    assert replot.returncode == 0, replot.stderr[-2000:]
    for name in figures:
        assert (tmp_path / "replot" / name).read_bytes() == (out / name).read_bytes(), name


def test_merge_refuses_to_average_runs_made_with_other_settings(tmp_path):
    import ablations

    path = tmp_path / "ablations.json"
    saved = json.loads((ROOT / "docs/ablations.json").read_text())
    by_method = {}
    for run in saved["runs"]:  # the shipped results: every seed of a method made with the same settings
        by_method.setdefault((run["part"], run["method"], run["seed"] is None), set()).add(ablations.settings_of(run))
    assert (
        all(len(settings) == 1 for settings in by_method.values()) and len(by_method) == 16
    )  # 14 methods, 2 shared base evaluations
    path.write_text(json.dumps(saved))
    divrl_seed0 = next(r for r in saved["runs"] if r["method"] == "divrl" and r["seed"] == 0)
    again = ablations.merge(path, [divrl_seed0], None)  # the same run again: replaced in place
    assert again["runs"] == saved["runs"] and again["wall_seconds"] == saved["wall_seconds"]
    other = {**divrl_seed0, "config": {**divrl_seed0["config"], "fit": [*divrl_seed0["config"]["fit"], "--x", "1"]}}
    with pytest.raises(SystemExit, match="rewards/divrl runs made with other settings"):
        ablations.merge(path, [other], None)
