"""`divrl evaluate` end to end on the demo config (offline): the files it writes, numbers recomputed from its saved
images, resuming, refusing mixed settings, and scoring samples another system generated (DreamBench++ layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from divrl.cli import main
from divrl.data.stream import SkipCounter, read_identities
from divrl.eval import BackgroundSegmenter, scale_invariant_iou
from divrl.images import to_image_batch, to_mask_batch
from divrl.policy import KontextConfig, LoRAConfig

ROOT = Path(__file__).resolve().parents[1]
EVAL_DEMO = ROOT / "configs" / "eval_demo.yaml"


pytestmark = pytest.mark.usefixtures("in_repository_root")  # tests/conftest.py


@pytest.fixture(scope="module")
def tuned_lora(tmp_path_factory, in_repository_root) -> Path:
    """A LoRA for the demo model with non-zero weights (a stand-in for a trained one: only the plumbing is tested)."""
    policy = KontextConfig(
        model="data/demo/tiny-kontext", lora=LoRAConfig(rank=8, alpha=16.0), max_sequence_length=32
    ).build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return policy.save_lora(tmp_path_factory.mktemp("lora"))


def evaluate(tmp_path: Path, name: str = "run", **settings) -> tuple[int, Path]:
    out = tmp_path / "eval"
    config = {
        "num_identities": 2,
        "prompts_per_identity": 2,
        "num_samples": 2,
        "num_steps": 4,
        "progress": False,
        "grid_conditions": 2,
        **settings,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["evaluate", "--config", str(EVAL_DEMO), "--config", str(path), "--output_dir", str(out)]), out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tuned_lora) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    code, out = evaluate(tmp, methods={"base": None, "tuned": str(tuned_lora)})
    assert code == 0
    return out


def test_evaluate_writes_metrics_table_frontier_grids_and_images(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["base", "tuned"]
    assert metrics["protocol"]["columns"] == ["vsm", "si_iou", "mtg_nssm", "sdino"]
    for name in ("base", "tuned"):
        overall = metrics["methods"][name]["overall"]
        assert overall["samples"] == 8 and overall["vsm_n"] == 8  # 2 identities x 2 prompts x 2 samples
        assert 0 <= overall["consistency_ratio"] <= 1 and 0 <= overall["si_iou"] <= 1
        assert list(metrics["methods"][name]["by_category"]) == ["object"]
        images = sorted((evaluated / name / "images").glob("*/*.png"))
        assert [f"{p.parent.name}/{p.name}" for p in images] == [
            f"val_0000{i}/00{p}_{k}.png" for i in (0, 1) for p in (0, 1) for k in (0, 1)
        ]
        assert len((evaluated / name / "scores.jsonl").read_text().splitlines()) == 8
        assert Image.open(evaluated / name / "grid.png").size[0] >= 3 * 128  # reference + 2 samples per row
    table = (evaluated / "table.md").read_text()
    assert "| method | VSM-0.7 ↑ | si-IoU ↓ | MTG-nSSM ↑ | sDINO ↑ |" in table
    assert table.count("| base |") == 1 and table.count("| tuned |") == 1 and "DenseDescriptor" in table
    frontier = Image.open(evaluated / "frontier.png")
    assert frontier.format == "PNG" and frontier.size[0] > 400


def test_the_tuned_lora_changes_the_samples_and_every_method_sees_the_same_noise(evaluated):
    base = to_image_batch(str(evaluated / "base/images/val_00000/000_0.png"))
    tuned = to_image_batch(str(evaluated / "tuned/images/val_00000/000_0.png"))
    other_seed = to_image_batch(str(evaluated / "base/images/val_00000/000_1.png"))
    assert (base - tuned).abs().mean() > 0.02
    assert not torch.equal(base, other_seed)  # other noise; barely other pixels: the base model copies its reference
    seeds = {json.loads((evaluated / m / "generation.json").read_text())["seed"] for m in ("base", "tuned")}
    assert seeds == {0}


def test_reported_numbers_match_a_recomputation_from_the_saved_images(evaluated):
    record = next(read_identities(["data/demo/val-000000.tar"], SkipCounter(10)))
    ref_mask = to_mask_batch(record.mask)
    rows = [json.loads(line) for line in (evaluated / "base/scores.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["key"].startswith(f"{record.id}/000/")]
    images = to_image_batch([str(evaluated / "base" / r["file"]) for r in first])  # relative to the method folder
    expected = scale_invariant_iou(BackgroundSegmenter(0.1)(images), ref_mask)
    assert [r["si_iou"] for r in first] == pytest.approx(expected.tolist(), abs=1e-6)
    overall = json.loads((evaluated / "metrics.json").read_text())["methods"]["base"]["overall"]
    for column in ("vsm", "si_iou", "mtg_nssm", "sdino"):
        assert overall[column] == pytest.approx(sum(r[column] for r in rows) / len(rows), abs=1e-6)
    consistent = [r for r in rows if r["vsm"] > 0.6]
    assert overall["consistency_ratio"] == pytest.approx(len(consistent) / len(rows))
    if consistent:
        assert overall["diversity_over_consistency"] == pytest.approx(
            sum(r["mtg_nssm"] for r in consistent) / len(consistent), abs=1e-6
        )


def test_a_rerun_resumes_without_generating_or_scoring_again(evaluated, tuned_lora):
    images = sorted(evaluated.glob("*/images/*/*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    scores = (evaluated / "base/scores.jsonl").read_text()
    before = json.loads((evaluated / "metrics.json").read_text())
    code, _ = evaluate(evaluated.parent, "again", methods={"base": None, "tuned": str(tuned_lora)})
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in images} == stamps
    assert (evaluated / "base/scores.jsonl").read_text() == scores
    assert json.loads((evaluated / "metrics.json").read_text())["methods"] == before["methods"]


def test_other_generation_settings_under_one_output_dir_are_refused(evaluated, tuned_lora):
    with pytest.raises(ValueError, match=r"other settings \(num_steps: 4 → 6\)"):
        evaluate(evaluated.parent, "steps", methods={"base": None}, num_steps=6)


def test_missing_weights_fail_before_any_generation(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate(tmp_path, methods={"base": None, "divrl": str(tmp_path / "no-such-lora")})
    assert not (tmp_path / "eval").exists()


def test_samples_of_another_system_in_the_dreambench_layout(evaluated, tmp_path):
    """Lay out the base model's images as another method's DreamBench++ samples and score them."""
    root = tmp_path / "samples" / "other"
    records = {r.id: r for r in read_identities(["data/demo/val-000000.tar"], SkipCounter(10))}
    for row in map(json.loads, (evaluated / "base/scores.jsonl").read_text().splitlines()):
        identity, prompt, k = row["key"].split("/")
        stem = f"{int(prompt)}_{k}"
        for folder in ("src_image", "text", "tgt_image"):
            (root / folder / identity).mkdir(parents=True, exist_ok=True)
        records[identity].reference.save(root / "src_image" / identity / f"{stem}.jpg", quality=95)
        (root / "text" / identity / f"{stem}.txt").write_text(row["prompt"] + "\n")
        Image.open(evaluated / "base" / row["file"]).save(root / "tgt_image" / identity / f"{stem}.png")
    code, out = evaluate(tmp_path, methods={}, samples_dir=str(tmp_path / "samples"))
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["other"]
    other = metrics["methods"]["other"]
    assert other["overall"]["samples"] == 8 and list(other["by_category"]) == ["object"]  # categories from the data
    base = json.loads((evaluated / "metrics.json").read_text())["methods"]["base"]["overall"]
    # the same images scored without the reference masks of the data (segmented instead): close, not identical
    assert other["overall"]["sdino"] == pytest.approx(base["sdino"], abs=0.05)


def test_other_scoring_models_rescore_without_regenerating(tmp_path):
    small = {"methods": {"base": None}, "num_identities": 1, "prompts_per_identity": 1}
    assert evaluate(tmp_path, "first", **small)[0] == 0
    image = next((tmp_path / "eval/base/images").glob("*/*.png"))
    stamp = image.stat().st_mtime_ns
    before = json.loads((tmp_path / "eval/metrics.json").read_text())["methods"]["base"]["overall"]
    identity = {
        "class_path": "divrl.rewards.FeatureScorer",
        "init_args": {
            "backbone": {
                "class_path": "divrl.rewards.backbones.DenseDescriptor",
                "init_args": {"grid_size": 24, "cell": 4},
            },
            "pool": 1,
            "tau_v": 0.2,
        },
    }
    assert evaluate(tmp_path, "second", **small, suite={"init_args": {"identity": identity}})[0] == 0
    after = json.loads((tmp_path / "eval/metrics.json").read_text())["methods"]["base"]["overall"]
    assert (tmp_path / "eval/base/scores.jsonl.stale").is_file() and image.stat().st_mtime_ns == stamp
    assert after["vsm"] > before["vsm"]  # a laxer visual threshold: more matched cells count as consistent
    assert "VSM-0.2" in (tmp_path / "eval/table.md").read_text()


def test_retrained_weights_at_the_same_path_are_refused(tmp_path, tuned_lora):
    import os
    import shutil

    lora = tmp_path / "lora"
    shutil.copytree(tuned_lora.parent, lora)  # the fixture returns the .safetensors file
    small = {"methods": {"tuned": str(lora)}, "num_identities": 1, "prompts_per_identity": 1}
    assert evaluate(tmp_path, "first", **small)[0] == 0
    weights = lora / "pytorch_lora_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    with pytest.raises(ValueError, match="weights_files"):
        evaluate(tmp_path, "second", **small)
