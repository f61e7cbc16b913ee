"""A short demo run through the real command line, for tests that need a run folder (``divrl export``, ``divrl app``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def short_demo_run(out: Path, max_steps: int, switch_steps: int, **model) -> Path:
    """``divrl fit --config configs/demo.yaml`` cut to ``max_steps`` updates with stage 2 from ``switch_steps``, writing
    ``lora/stage1`` and ``lora/final`` under ``out``; ``model``: further ``model:`` settings."""
    overlay = out.parent / f"{out.name}.yaml"
    settings = {
        "trainer": {
            "max_steps": max_steps,
            "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": switch_steps}},
                {"class_path": "divrl.training.LoRAExporter"},
            ],
        },
        "data": {"steps_per_epoch": 2},
    }
    if model:
        settings["model"] = model
    overlay.write_text(yaml.safe_dump(settings))
    done = subprocess.run(
        [sys.executable, "-m", "divrl.cli", "fit", "--config", "configs/demo.yaml", "--config", str(overlay)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out
