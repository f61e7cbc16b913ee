"""Multi-subject generation end to end (offline): the two-subject demo trains and exports a LoRA that diffusers loads,
the synthetic world's scenes, and `divrl evaluate`'s per-subject columns recomputed from its saved images."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.lora_parity import assert_lora_reproduced_by_diffusers
from PIL import Image

from divrl.cli import main
from divrl.data.stream import ConditionSample, SkipCounter, read_identities
from divrl.data.synthetic import (
    multi_subject_records,
    random_identity,
    render_scene,
    scene_poses,
    write_demo_multi_dataset,
)
from divrl.eval import EvalSuite
from divrl.images import to_image_batch
from divrl.policy import KontextConfig, LoRAConfig
from divrl.rewards import (
    BackboneEmbedder,
    FeatureScorer,
    Group,
    PairwiseSubjectConsistency,
    PerSubjectDivRL,
    PlainBackgroundDetector,
    SubjectLocator,
)
from divrl.rewards.backbones import DenseDescriptor

ROOT = Path(__file__).resolve().parents[1]
DEMO_MULTI = ROOT / "configs" / "demo_multi.yaml"
MODEL = ROOT / "data" / "demo" / "tiny-kontext-multi"

pytestmark = pytest.mark.usefixtures("in_repository_root")


# ---------------------------------------------------------------------------------------------------- data


def test_scenes_place_subjects_left_to_right_and_the_detector_reads_them_in_that_order():
    rng = random.Random(0)
    identities = [random_identity(rng) for _ in range(3)]
    image, masks = render_scene(identities, scene_poses(3, rng), 96)
    boxes = PlainBackgroundDetector()(image[None], "object")[0]
    assert len(boxes) == 3
    for k, box in enumerate(boxes):  # each detected box is the tight box of subject k's mask
        ys, xs = torch.nonzero(masks[k] > 0.5, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_multi_subject_records_name_every_subject_and_draw_psr_counts():
    records = list(multi_subject_records(200, size=32, seed=3))
    counts = [len(r.references) for r in records]
    assert set(counts) <= {2, 3, 4} and counts.count(2) > 150  # PSR's mix: 0.9 / 0.05 / 0.05
    for record in records[:20]:
        subjects = record.extra["subjects"]
        assert len(subjects) == len(record.references) == len(record.masks)
        named = [prompt.index(word) for prompt in record.prompts[:1] for word in subjects]
        assert named == sorted(named)  # every subject named, left to right
        assert "on the left" in record.prompts[0] and "on the right" in record.prompts[0]
        for image, mask in zip(record.references, record.masks):  # each reference shows its subject alone
            assert (
                image.size == mask.size == (32, 32)
                and 0 < int(torch.from_numpy(np.asarray(mask)).sum()) < 255 * 32 * 32
            )


def test_the_committed_demo_shards_are_what_the_generator_writes(tmp_path):
    paths = write_demo_multi_dataset(tmp_path)
    for path in paths:
        assert path.read_bytes() == (ROOT / "data" / "demo-multi" / path.name).read_bytes()
    records = list(read_identities([str(p) for p in paths if p.name.startswith("val")], SkipCounter(10)))
    assert len(records) == 8 and all(len(r.references) == 2 and len(r.extra["subjects"]) == 2 for r in records)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_repository_root) -> Path:
    out = tmp_path_factory.mktemp("multi")
    config = {
        "trainer": {
            "default_root_dir": str(out),
            "max_steps": 2,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
            "callbacks": [
                {"class_path": "divrl.training.LoRAExporter"},
                {"class_path": "divrl.training.RolloutImageLogger", "init_args": {"every_n_rollouts": 1}},
            ],
        },
        "model": {"sampling": {"group_size": 4}, "objective": {"micro_batch_size": 4}},
    }
    path = out / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(DEMO_MULTI), "--config", str(path)]) == 0
    return out


def test_the_two_subject_demo_logs_per_subject_rewards_and_grids(trained):
    rows = []
    for path in sorted(trained.glob("lightning_logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(path.open()) if r.get("reward/mean")]
    assert len(rows) == 2
    for name in (
        "reward/psr",
        "reward/psr/sc_1",
        "reward/psr/sc_2",
        "reward/psr/found",
        "reward/divrl",
        "reward/divrl/nssm_1",
        "reward/divrl/vsm_2",
        "reward/divrl/found",
    ):
        assert name in rows[0] and rows[0][name] != "", name
    for row in rows:  # the weighted sum: R = PSR + per-subject DivRL
        assert float(row["reward/mean"]) == pytest.approx(
            float(row["reward/psr"]) + float(row["reward/divrl"]), abs=1e-5
        )
    grids = sorted((trained / "rollouts").glob("*.png"))
    assert len(grids) == 2


def test_a_lora_trained_on_two_references_loads_in_diffusers_for_one(trained):
    config = KontextConfig(
        model=str(MODEL.relative_to(ROOT)), lora=LoRAConfig(rank=8, alpha=16.0), max_sequence_length=32
    )
    assert_lora_reproduced_by_diffusers(
        config, trained / "lora/final", "a photo of the red plain disc on the left", min_change=1e-5
    )


# ---------------------------------------------------------------------------------------------------- evaluation


def demo_suite(**kwargs) -> EvalSuite:
    backbone = DenseDescriptor(grid_size=24, cell=4)
    embedder = BackboneEmbedder(backbone, size=32)
    locator = SubjectLocator(PlainBackgroundDetector(), "hungarian", embedder)
    return EvalSuite(
        subject_consistency=PairwiseSubjectConsistency(locator, embedder),
        per_subject=PerSubjectDivRL(locator, FeatureScorer(backbone, pool=1), crop_size=32),
        identity=FeatureScorer(backbone, pool=1),
        consistency_metric="sc",
        diversity_metric="subject_nssm",
        **kwargs,
    )


def test_eval_suite_scores_each_subject_and_leaves_single_reference_columns_empty():
    record = next(multi_subject_records(1, size=64, seed=7, subjects=(2,), weights=None))
    sample = ConditionSample(record.id, record.prompts[0], record.references, record.masks, metadata=dict(record.extra))
    rng = random.Random(1)
    identities = [random_identity(rng) for _ in range(2)]
    images = torch.stack([render_scene(identities, scene_poses(2, rng), 64)[0] for _ in range(3)])
    suite = demo_suite()
    values = suite.score_group(record.references[0], images, record.prompts[0], record.masks[0], sample=sample)
    expected = suite.subject_consistency(Group(sample, images))
    assert values["sc"] == pytest.approx(expected.reward.tolist(), abs=1e-6)
    assert values["sc_2"] == pytest.approx(expected.components["sc_2"].tolist(), abs=1e-6)
    assert values["sc_3"] == [None] * 3 and values["vsm"] == [None] * 3 and values["mtg_nssm"] == [None] * 3
    per = suite.per_subject(Group(sample, images))
    assert values["subject_vsm"] == pytest.approx(per.components["vsm"].tolist(), abs=1e-6)
    # one reference: the single-reference columns are there, and SC scores its one subject
    single = ConditionSample(
        "one",
        record.prompts[0],
        record.references[:1],
        record.masks[:1],
        metadata={"subjects": record.extra["subjects"][:1]},
    )
    values = suite.score_group(record.references[0], images, record.prompts[0], record.masks[0], sample=single)
    assert None not in values["vsm"] and None not in values["sc_1"] and values["sc_2"] == [None] * 3


def test_evaluate_on_two_subject_data_writes_per_subject_columns(tmp_path):
    config = {
        "num_identities": 2,
        "prompts_per_identity": 1,
        "num_samples": 2,
        "num_steps": 4,
        "progress": False,
        "grid_conditions": 1,
        "methods": {"base": None},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--config", "configs/eval_demo_multi.yaml", "--config", str(path), "--output_dir", str(out)])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["columns"] == [
        "sc",
        "sc_1",
        "sc_2",
        "sc_3",
        "sc_4",
        "found",
        "ref_found",
        "subject_vsm",
        "subject_nssm",
    ]
    overall = metrics["methods"]["base"]["overall"]
    assert overall["samples"] == 4 and overall["sc_n"] == 4 and overall["sc_3_n"] == 0 and overall["ref_found"] == 1
    assert "| method | SC ↑ | SC-1 ↑ | SC-2 ↑ |" in (out / "table.md").read_text()
    grid = Image.open(out / "base" / "grid.png")
    assert grid.width == 4 * 128  # both references, then the two samples
    # SC recomputed from the saved images with PSR's protocol (order, whole-image fallback) at the demo's settings
    rows = [json.loads(line) for line in (out / "base" / "scores.jsonl").read_text().splitlines()]
    records = list(read_identities(["data/demo-multi/val-000000.tar"], SkipCounter(10)))[:2]
    embedder = BackboneEmbedder(DenseDescriptor(grid_size=24, cell=4), size=32)
    reward = PairwiseSubjectConsistency(SubjectLocator(PlainBackgroundDetector(), "order"), embedder)
    for record in records:
        mine = [r for r in rows if r["id"] == record.id]
        images = torch.cat([to_image_batch(str(out / "base" / r["file"])) for r in mine])
        sample = ConditionSample(
            record.id, record.prompts[0], record.references, record.masks, metadata=dict(record.extra)
        )
        assert [r["sc"] for r in mine] == pytest.approx(reward(Group(sample, images)).reward.tolist(), abs=1e-6)


def test_divrl_data_synthetic_writes_multi_subject_shards_and_refuses_misplaced_flags(tmp_path, capsys):
    out = tmp_path / "multi"
    assert (
        main(
            [
                "data",
                "synthetic",
                "--out",
                str(out),
                "--subjects",
                "3,4",
                "--subject-weights",
                "1,0",
                "--num-identities",
                "3",
                "--resolution",
                "32",
            ]
        )
        == 0
    )
    records = list(read_identities([str(p) for p in sorted(out.glob("*.tar"))], SkipCounter(10)))
    assert len(records) == 3 and all(len(r.references) == 3 == len(r.extra["subjects"]) for r in records)
    for argv, message in (
        (["synthetic", "--subjects", "5"], "counts among 2, 3, 4"),
        (["synthetic", "--subjects", "2,x"], "comma-separated list of int"),
        (["synthetic", "--subjects", "2,3", "--subject-weights", "1"], "one non-negative weight"),
        (["synthetic", "--subject-weights", "1"], "--subject-weights needs --subjects"),
        (["dreambooth", "--src", str(tmp_path), "--subjects", "2"], "--subjects applies only"),
    ):
        assert main(["data", *argv, "--out", str(tmp_path / "refused")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_divrl_sample_takes_several_references_and_scores_each_subject(tmp_path):
    record = list(read_identities(["data/demo-multi/val-000000.tar"], SkipCounter(10)))[0]
    files = []
    for k, image in enumerate(record.references):
        files.append(tmp_path / f"subject{k}.png")
        image.save(files[-1])
    out = tmp_path / "samples"
    command = [
        "sample",
        "--config",
        str(DEMO_MULTI),
        "--trainer.logger",
        "false",
        "--reference",
        f"[{files[0]}, {files[1]}]",
        "--subjects",
        f"[{', '.join(record.extra['subjects'])}]",
        "--prompts",
        f"[{record.prompts[0]}]",
        "--num_samples",
        "2",
        "--num_steps",
        "4",
        "--output_dir",
        str(out),
    ]
    assert main(command) == 0
    meta = json.loads((out / "samples.json").read_text())
    sample = meta["samples"][0]
    assert sample["id"] == "subject0_and_subject1" and len(sample["files"]) == 2
    assert len(sample["psr/sc_1"]) == 2 and len(sample["divrl/vsm_2"]) == 2
    # the numbers are the demo reward of these images against both references (recomputed from the 8-bit PNGs the
    # command scored as floats: 1e-3)
    images = torch.cat([to_image_batch(f) for f in sample["files"]])
    embedder = BackboneEmbedder(DenseDescriptor(grid_size=24, cell=4), size=32)
    psr = PairwiseSubjectConsistency(
        SubjectLocator(PlainBackgroundDetector(), "hungarian", embedder), embedder, on_missing="score"
    )
    condition = ConditionSample(
        "x", record.prompts[0], record.references, [None, None], metadata={"subjects": record.extra["subjects"]}
    )
    assert sample["psr"] == pytest.approx(psr(Group(condition, images)).reward.tolist(), abs=1e-3)
    with pytest.raises(ValueError, match="one mask .or null. and one category word per reference"):
        main(command[:-1] + [str(tmp_path / "other"), "--mask", f"[{files[0]}]"])
