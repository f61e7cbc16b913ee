"""The demo in two CPU processes (gloo), under DDP, FSDP2 and FSDP1: it trains, the ranks read disjoint shards, their
adapters stay identical, FSDP2 and FSDP1 train the same adapter as DDP, and runs resumed from FSDP2's sharded
checkpoint (torchao's 8-bit AdamW) and from FSDP1's (bitsandbytes' 8-bit AdamW) continue the uninterrupted run
exactly.

Two launchers, as users have them: Lightning's own (``divrl fit --trainer.devices 2``: rank 0 starts rank 1 once it is
set up) for the plain DDP run and the runs that stop on an error, where rank 0 is the process that must find out about
rank 1 on its own (torchrun would stop the other rank as soon as one exits); torchrun (``examples/torchrun.sh``, and
SLURM's ``srun`` alike: both ranks start at once, about 4 s sooner on two cores) for the others."""

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
FSDP2 = {"class_path": "divrl.training.FSDP2Strategy"}
FSDP1 = {"class_path": "divrl.training.FSDP1Strategy"}
STAGES = {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": 60}}
"""The demo configs' stage switch (their two rewards need it): the callbacks given here replace the config's list."""


def staged(callbacks: list[dict]) -> list[dict]:
    """``callbacks`` with the demo's stage switch first when they have none of their own."""
    return callbacks if any(c["class_path"].endswith("StageSwitch") for c in callbacks) else [STAGES, *callbacks]


def run(
    tmp_path: Path,
    max_steps: int,
    callbacks: list[dict],
    timeout: int,
    config: str = "configs/demo.yaml",
    strategy: str | dict = "ddp",
    *args: str,
    succeed: bool = True,
    torchrun: bool = False,
) -> str:
    """`divrl fit` in two gloo processes, with test callbacks importable from tests/helpers; started by Lightning's
    launcher, or with ``torchrun`` by ``torch.distributed.run``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = tmp_path / "over.yaml"
    overrides.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 2,
                    "strategy": strategy,
                    "max_steps": max_steps,
                    "logger": False,
                    "enable_checkpointing": any("ModelCheckpoint" in c["class_path"] for c in callbacks),
                    "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": staged(callbacks),
                }
            }
        )
    )
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    fit = ["-m", "divrl.cli", "fit", "--config", str(ROOT / config), "--config", str(overrides), *args]
    done = subprocess.run(
        [sys.executable, *launcher, *fit],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # a deadlock fails here, not CI
    assert (done.returncode == 0) == succeed, done.stderr[-3000:]
    return done.stderr


def probe(out_dir: Path) -> dict:
    return {"class_path": "helpers.probe.RankProbe", "init_args": {"out_dir": str(out_dir)}}


def probed(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """What each rank wrote: its identities, world and step, and its (gathered) LoRA weights."""
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, [load_file(out_dir / f"rank{r}.safetensors") for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Three updates of the demo under DDP, started by Lightning's launcher (``divrl fit --trainer.devices 2``, rank 0
    first: the one run that succeeds under it); the folder of its probe."""
    out = tmp_path_factory.mktemp("ddp")
    run(out, 3, [probe(out / "probe")], 600)
    return out / "probe"


@pytest.mark.slow
def test_demo_trains_under_ddp_with_disjoint_data_and_synchronised_weights(ddp_run):
    ranks = [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 3 * 2  # equal steps, batch_size 2 each
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])  # two shards, one per rank
    weights = [load_file(ddp_run / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-7) for k in weights[0])
    assert any(v.abs().max() > 0 for k, v in weights[0].items() if "lora_B" in k)  # and they trained


@pytest.mark.slow
def test_a_failure_on_one_rank_neither_deadlocks_nor_desynchronises(tmp_path):
    run(tmp_path, 2, [{"class_path": "helpers.probe.BreakRankOne"}, probe(tmp_path / "probe")], 300, torchrun=True)
    counters = [json.loads((tmp_path / "probe" / f"counters{r}.json").read_text()) for r in (0, 1)]
    assert counters[1]["skipped_groups"] == 2 and counters[0].get("skipped_groups", 0) == 0
    # rank 1's NaN loss skipped that update on both ranks
    assert counters[0]["skipped_updates"] == counters[1]["skipped_updates"] == 1
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    weights = [load_file(tmp_path / "probe" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-7) for k in weights[0])


@pytest.mark.slow
def test_a_reward_error_on_one_rank_stops_both_ranks_with_its_message(tmp_path):
    """A configuration error inside the reward on rank 1 only: rank 1 raises it, rank 0 learns of it in their one
    agreement and stops too, instead of waiting for rank 1 in the next collective."""
    stderr = run(tmp_path, 3, [{"class_path": "helpers.probe.MisconfiguredRewardOnRankOne"}], 300, succeed=False)
    assert "probe: this reward is misconfigured" in stderr  # rank 1's own message
    assert "the reward failed on another rank" in stderr  # rank 0's


@pytest.mark.slow
def test_rollouts_with_no_finite_reward_on_any_rank_apply_nothing_and_stop_together(tmp_path):
    stderr = run(
        tmp_path,
        10,
        [{"class_path": "helpers.probe.NonFiniteRewardEverywhere"}],
        300,
        "configs/demo.yaml",
        "ddp",
        "--model.system.max_empty_rollouts",
        "3",
        succeed=False,
    )
    assert "3 rollouts in a row had no group with a finite reward (NSSMReward" in stderr
    counters = [json.loads((tmp_path / "probe" / f"counters{r}.json").read_text()) for r in (0, 1)]
    # both ranks stopped at the same rollout, every group skipped, no update applied (or attempted and skipped)
    assert all(
        c["empty_rollouts"] == 3
        and c["skipped_groups"] == 3 * 2
        and c.get("skipped_updates", 0) == 0
        and c["global_step"] == 0
        for c in counters
    ), counters


@pytest.mark.slow
def test_compiled_blocks_with_selective_checkpointing_stay_on_policy_under_fsdp2(tmp_path):
    """policy.compile with selective checkpointing under FSDP2: each block's forward is traced and compiled inside
    FSDP2's all-gather hooks (backend aot_eager: the same graphs without inductor's code generation, which costs
    minutes on two cores; inductor's numerics are tests/test_speed.py's); every update of both ranks is on-policy,
    the compile time is logged, and the ranks hold one adapter that trained."""
    keys = ["train/ratio_max_dev", "perf/compile_s"]
    callbacks = [
        probe(tmp_path),
        {"class_path": "helpers.probe.MetricsProbe", "init_args": {"out_dir": str(tmp_path), "keys": keys}},
    ]
    run(
        tmp_path,
        2,
        callbacks,
        600,
        "configs/demo.yaml",
        FSDP2,
        "--model.policy.compile",
        "true",
        "--model.policy.compile_backend",
        "aot_eager",
        "--model.policy.gradient_checkpointing",
        "selective",
        torchrun=True,
    )
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"metrics{rank}.json").read_text())
        assert len(rows) == 2 and all(r["train/ratio_max_dev"] <= 1e-6 for r in rows)
        assert rows[0]["perf/compile_s"] > 0  # the first rollout and update compiled the blocks
    _, weights = probed(tmp_path)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(v.abs().max() > 0 for k, v in weights[0].items() if "lora_B" in k)


@pytest.mark.slow
def test_fsdp2_and_fsdp1_train_the_same_adapter_as_ddp_on_disjoint_data(tmp_path, ddp_run):
    """FSDP2 (fully_shard per FLUX block, reduce-scatter of gradients), FSDP1 (each block's frozen base one unit, the
    LoRA weights unwrapped and all-reduced; here with activation checkpointing of the wrapped blocks) and DDP
    (all-reduce) see the same data and noise on each rank, so after three updates their adapters agree to float
    rounding."""
    ddp, ddp_w = probed(ddp_run)
    checkpointing = ("--model.policy.gradient_checkpointing", "full")
    for name, strategy, args in (("fsdp2", FSDP2, ()), ("fsdp1", FSDP1, checkpointing)):
        out = tmp_path / name
        counter = {"class_path": "helpers.probe.GatherCounter", "init_args": {"out_dir": str(out)}}
        exporter = {"class_path": "divrl.training.LoRAExporter"}
        run(out, 3, [probe(out), counter, exporter], 600, "configs/demo.yaml", strategy, *args, torchrun=True)
        fsdp, fsdp_w = probed(out)
        assert [r["ids"] for r in fsdp] == [r["ids"] for r in ddp], name
        assert set(fsdp[0]["ids"]).isdisjoint(fsdp[1]["ids"]) and all(r["step"] == 3 for r in fsdp)
        assert all(torch.equal(fsdp_w[0][k], fsdp_w[1][k]) for k in fsdp_w[0]), name  # one adapter on both ranks
        assert any(v.abs().max() > 0 for k, v in fsdp_w[0].items() if "lora_B" in k)
        for key in ddp_w[0]:
            torch.testing.assert_close(
                fsdp_w[0][key], ddp_w[0][key], atol=2e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )
        exported = load_file(out / "lora/final/pytorch_lora_weights.safetensors")
        assert {k.removeprefix("transformer.") for k in exported} == set(fsdp_w[0])
        assert all(torch.equal(exported[f"transformer.{k}"], v) for k, v in fsdp_w[0].items())
        # units: the demo model's 4 blocks and the root. FSDP2 keeps each gathered for the whole rollout (5
        # all-gathers, not one per unit per denoising step); FSDP1 (FULL_SHARD) gathers every block at each of the 4
        # steps and its root once
        gathers = json.loads((out / "gathers0.json").read_text())
        assert gathers["units"] == 5
        assert gathers["per_rollout"] == [{"fsdp2": 5, "fsdp1": 1 + 4 * 4}[name]] * 3, name


@pytest.mark.slow
def test_fsdp1_with_bitsandbytes_8bit_adamw_resumes_exactly(tmp_path):
    """FSDP1 with a bf16 frozen base and bitsandbytes' 8-bit AdamW (it sees only the unwrapped fp32 LoRA weights):
    the dtypes stay as loaded, checkpoints are single files holding the adapter and its 8-bit states under the
    unwrapped names, and a run resumed from step 2 ends where the uninterrupted run ends."""
    pytest.importorskip("bitsandbytes")
    adamw8bit = (
        "--model.optimizer",
        "bitsandbytes.optim.AdamW8bit",
        "--model.optimizer.lr",
        "3e-4",
        "--model.optimizer.min_8bit_size",
        "16",  # the tiny model's adapters are small
        "--model.policy.torch_dtype",
        "bfloat16",
    )
    every_step = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
    }
    full_run = [every_step, probe(tmp_path / "full")]
    run(tmp_path / "full", 3, full_run, 600, "configs/demo.yaml", FSDP1, *adamw8bit, torchrun=True)
    step2 = tmp_path / "full/checkpoints/epoch=0-step=2.ckpt"
    assert step2.is_file()
    state = torch.load(step2, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in state["optimizer_states"][0]["state"].values()]
    moments = [v for s in states for v in s.values() if torch.is_tensor(v)]
    assert any(t.dtype == torch.uint8 for t in moments)
    run(
        tmp_path / "cut",
        3,
        [every_step, probe(tmp_path / "cut")],
        600,
        "configs/demo.yaml",
        FSDP1,
        *adamw8bit,
        "--ckpt_path",
        str(step2),
        torchrun=True,
    )
    (full, full_w), (cut, cut_w) = probed(tmp_path / "full"), probed(tmp_path / "cut")
    # the adapter alone, under the names DDP and one device use (no FSDP1 wrapper prefix, no frozen weight)
    assert {k.removeprefix("policy.transformer.").replace(".default", "") for k in state["state_dict"]} == set(
        full_w[0]
    )
    assert [r["step"] for r in cut] == [3, 3] and [r["ids"] for r in cut] == [r["ids"][-2:] for r in full]
    assert all(r["dtypes"] == {"frozen": ["torch.bfloat16"], "trained": ["torch.float32"]} for r in full + cut)
    assert all(torch.equal(cut_w[0][k], cut_w[1][k]) for k in cut_w[0])
    for key in full_w[0]:
        torch.testing.assert_close(cut_w[0][key], full_w[0][key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("in_repository_root")
def test_demo_fsdp_resumes_from_its_sharded_checkpoint_exactly(tmp_path):
    """configs/demo_fsdp.yaml with torchao's 8-bit AdamW (its states shard with FSDP2): resumed from the sharded
    checkpoint of its third update (in a folder of its own, as FSDP1's test does), it ends where the uninterrupted run
    ends, 8-bit states included."""
    pytest.importorskip("torchao")
    adamw8bit = ("--model.optimizer", "torchao.optim.AdamW8bit", "--model.optimizer.lr", "3e-4")
    callbacks = [
        {"class_path": "divrl.training.StageSwitch", "init_args": {"switch_steps": 2}},
        {"class_path": "divrl.training.LoRAExporter"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
        },
    ]
    full_run = [*callbacks, probe(tmp_path / "full")]
    run(tmp_path / "full", 4, full_run, 600, "configs/demo_fsdp.yaml", FSDP2, *adamw8bit, torchrun=True)
    step3 = tmp_path / "full/checkpoints/epoch=0-step=3.ckpt"
    assert step3.is_dir() and sorted(p.name for p in step3.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sum(p.stat().st_size for p in step3.iterdir()) < 5e6  # the adapter and its optimizer, not the base
    run(
        tmp_path / "cut",
        4,
        [*callbacks, probe(tmp_path / "cut")],
        600,
        "configs/demo_fsdp.yaml",
        FSDP2,
        *adamw8bit,
        "--ckpt_path",
        str(step3),
        torchrun=True,
    )
    checkpoint = tmp_path / "cut/checkpoints/last.ckpt"
    state = torch.load(checkpoint / "meta.pt", weights_only=False)
    assert state["global_step"] == 4 and state["divrl"]["stage"] == 1
    assert not (tmp_path / "cut/lora/stage1").exists()  # resumed after the switch: it does not fire again
    (full, full_w), (cut, cut_w) = probed(tmp_path / "full"), probed(tmp_path / "cut")
    assert [r["step"] for r in cut] == [4, 4] and cut[0]["ids"] == full[0]["ids"][-len(cut[0]["ids"]) :]
    for key in full_w[0]:
        torch.testing.assert_close(cut_w[0][key], full_w[0][key], atol=1e-6, rtol=1e-5)
    # one process samples from the sharded checkpoint folder exactly as from the exported LoRA of the same step
    from divrl.cli import main

    for name, weights in (("ckpt", checkpoint), ("lora", tmp_path / "cut/lora/final")):
        assert (
            main(
                [
                    "sample",
                    "--config",
                    str(ROOT / "configs/demo.yaml"),
                    "--trainer.logger",
                    "false",
                    "--lora",
                    str(weights),
                    "--num_identities",
                    "1",
                    "--num_samples",
                    "2",
                    "--num_steps",
                    "3",
                    "--output_dir",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    images = [sorted((tmp_path / name).glob("*/000_[01].png")) for name in ("ckpt", "lora")]
    assert len(images[0]) == 2 and [p.read_bytes() for p in images[0]] == [p.read_bytes() for p in images[1]]


@pytest.mark.slow
def test_overlapped_scoring_under_ddp_trains_the_same_weights_and_agrees_on_errors(tmp_path):
    """Each rank scores its own groups in the background while it rolls out the next: the weights are those of the
    run without overlap, bit for bit, and a reward error on one rank still stops both (one agreement, after scoring)."""
    chunks = ("--model.system.rollout_chunk_groups", "1")
    overlap = (*chunks, "--model.system.overlap_rewards", "true")
    for name, args in (("sequential", chunks), ("overlapped", overlap)):
        run(
            tmp_path / name,
            2,
            [probe(tmp_path / f"{name}/probe")],
            600,
            "configs/demo.yaml",
            "ddp",
            *args,
            torchrun=True,
        )
    _, sequential = probed(tmp_path / "sequential/probe")
    _, overlapped = probed(tmp_path / "overlapped/probe")
    assert all(torch.equal(overlapped[r][k], sequential[r][k]) for r in (0, 1) for k in sequential[r])
    stderr = run(
        tmp_path / "error",
        1,
        [{"class_path": "helpers.probe.MisconfiguredRewardOnRankOne"}],
        300,
        "configs/demo.yaml",
        "ddp",
        *overlap,
        succeed=False,
    )
    assert "probe: this reward is misconfigured" in stderr and "the reward failed on another rank" in stderr
