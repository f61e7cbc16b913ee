"""`divrl fit` on Qwen-Image-Edit-Plus (the tiny model, true CFG on): the demo's two DivRL stages train on-policy
and resume across the stage switch bit-identically; the multi-subject demo (PSR + per-subject DivRL, two references
per condition, the multi-subject shards unchanged) trains with only the policy swapped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QWEN = [
    "--model.policy",
    "divrl.policy.qwen_image.QwenEditConfig",
    "--model.policy.model",
    "tiny",
    "--model.policy.true_cfg_scale",
    "3.0",
    "--model.sampling.group_size",
    "4",
    "--model.objective.init_args.micro_batch_size",
    "4",
    "--trainer.limit_val_batches",
    "0",
]


def run(root: Path, config: str, max_steps: int, *args: str) -> None:
    callbacks = [
        {"class_path": "divrl.training.LoRAExporter"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
        },
    ]
    if config == "demo.yaml":
        callbacks.insert(0, {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": 2}})
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}}
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / config),
                *QWEN,
                "--trainer.default_root_dir",
                str(root),
                "--trainer.logger",
                json.dumps(logger),
                "--trainer.callbacks",
                json.dumps(callbacks),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.max_steps",
                str(max_steps),
                *args,
            ]
        )
        == 0
    )


def metrics(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("reward/mean")]
    return rows


@pytest.mark.slow  # two 4-update fits on the tiny model (~40 s on 2 cores)
def test_both_stages_train_on_policy_and_resume_across_the_switch_bit_identically(tmp_path, in_repository_root):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, "demo.yaml", 4)
    rows = metrics(straight)
    assert [float(r["train/stage"]) for r in rows] == [0, 0, 1, 1]
    assert all(float(r["train/ratio_max_dev"]) < 1e-6 for r in rows)  # the guided velocity on both paths
    run(resumed, "demo.yaml", 3)
    run(resumed, "demo.yaml", 4, "--ckpt_path", "last")
    for name in ("stage1", "final"):
        a = load_file(straight / f"lora/{name}/pytorch_lora_weights.safetensors")
        b = load_file(resumed / f"lora/{name}/pytorch_lora_weights.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained


def test_the_multi_subject_demo_trains_on_qwen_edit_unchanged(tmp_path, in_repository_root):
    run(tmp_path, "demo_multi.yaml", 2)
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(float(r["train/ratio_max_dev"]) < 1e-6 for r in rows)
    assert all(-1 <= float(r["reward/psr"]) <= 1 and 0 <= float(r["reward/psr/found"]) <= 1 for r in rows)
    lora = load_file(tmp_path / "lora/final/pytorch_lora_weights.safetensors")
    assert any(".img_mlp.net.0.proj." in k for k in lora) and any(".txt_mlp.net.2." in k for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
