"""`divrl fit --config configs/demo_idglow.yaml`: SFT with identity gating, then group DPO, in one run; the stage switch
changes the objective, the logs follow it, and a run pre-empted before the switch resumes bit-exactly through it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from divrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
IDGLOW = ROOT / "configs" / "demo_idglow.yaml"

pytestmark = pytest.mark.usefixtures("in_repository_root")  # tests/conftest.py


def fit(root: Path, max_steps: int, *args: str, seconds: float | None = None) -> None:
    config = {
        "trainer": {
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "check_val_every_n_epoch": 100,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
            "callbacks": [
                {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": 2}},
                {"class_path": "divrl.training.LoRAExporter"},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
                },
            ]
            + ([{"class_path": "divrl.training.TrainTimeLimit", "init_args": {"seconds": seconds}}] if seconds else []),
        }
    }
    (root / "overrides.yaml").write_text(yaml.safe_dump(config))
    assert (
        main(
            [
                "fit",
                "--config",
                str(IDGLOW),
                "--config",
                str(root / "overrides.yaml"),
                "--trainer.max_steps",
                str(max_steps),
                "--model.sampling.group_size",
                "4",
                *args,
            ]
        )
        == 0
    )


def rows(root: Path) -> dict[int, dict]:
    out = {}
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        with path.open() as f:
            out.update({int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")})
    return out


def test_sft_then_group_dpo_in_one_run_resumes_bit_exactly_across_the_switch(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    fit(straight, 3)
    logged = rows(straight)
    assert [float(logged[s]["train/stage"]) for s in sorted(logged)] == [0, 0, 1]
    assert all(logged[s].get("train/fm_loss") and not logged[s].get("train/dpo_loss") for s in sorted(logged)[:2])
    assert logged[max(logged)].get("train/dpo_loss") and logged[max(logged)].get("reward/mean")  # DPO rolls out
    assert float(logged[max(logged)]["time/train_s"]) > float(logged[min(logged)]["time/train_s"]) > 0
    fit(resumed, 3, seconds=1e-6)  # stopped by its time budget after the first update, before the switch
    assert max(rows(resumed)) == 0
    fit(resumed, 3, "--ckpt_path", "last")
    for name in ("stage1", "final"):
        a = load_file(straight / f"lora/{name}/pytorch_lora_weights.safetensors")
        b = load_file(resumed / f"lora/{name}/pytorch_lora_weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    again = rows(resumed)
    assert [again[s]["train/loss"] for s in sorted(again)] == [logged[s]["train/loss"] for s in sorted(logged)]
