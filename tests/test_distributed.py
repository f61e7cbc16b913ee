"""The demo under DDP with two CPU processes (gloo): it trains, the ranks read disjoint shards, and their adapters
stay identical (gradients are averaged across ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_ddp(tmp_path: Path, max_steps: int, callbacks: list[dict], timeout: int) -> None:
    """`divrl fit` of the demo in two gloo processes, with test callbacks importable from tests/helpers."""
    overrides = tmp_path / "over.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {
        "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": max_steps, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
        "callbacks": callbacks}}))  # fmt: skip
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "divrl.cli", "fit", "--config", str(ROOT / "configs/demo.yaml"),
                           "--config", str(overrides)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, timeout=timeout)  # a deadlock fails here, not CI  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def probe(out_dir: Path) -> dict:
    return {"class_path": "helpers.probe.RankProbe", "init_args": {"out_dir": str(out_dir)}}


@pytest.mark.slow
def test_demo_trains_under_ddp_with_disjoint_data_and_synchronised_weights(tmp_path):
    run_ddp(tmp_path, 3, [probe(tmp_path / "probe")], timeout=600)
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 3 * 2  # equal steps, batch_size 2 each
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])  # two shards, one per rank
    weights = [load_file(tmp_path / "probe" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-7) for k in weights[0])
    assert any(v.abs().max() > 0 for k, v in weights[0].items() if "lora_B" in k)  # and they trained


@pytest.mark.slow
def test_a_failure_on_one_rank_neither_deadlocks_nor_desynchronises(tmp_path):
    run_ddp(tmp_path, 2, [{"class_path": "helpers.probe.BreakRankOne"}, probe(tmp_path / "probe")], timeout=300)
    counters = [json.loads((tmp_path / "probe" / f"counters{r}.json").read_text()) for r in (0, 1)]
    assert counters[1]["skipped_groups"] == 2 and counters[0].get("skipped_groups", 0) == 0
    # rank 1's NaN loss skipped that update on both ranks
    assert counters[0]["skipped_updates"] == counters[1]["skipped_updates"] == 1
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    weights = [load_file(tmp_path / "probe" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-7) for k in weights[0])
