"""Training against served rewards: a demo run that loses one of its two reward servers half-way finishes with the
weights of the run that kept both (served = in process is checked group by group in tests/test_reward_service.py, on
channels-last images as training decodes them), and a run that loses every server stops within its configured time, exits
non-zero, and leaves the checkpoint before it intact. Real ``divrl serve-reward`` processes on ports of their own."""

from __future__ import annotations

import logging
import time

import pytest
import torch

pytest.importorskip("litserve")

from helpers.servers import KILLED, RewardServer, listening
from test_overlap import demo_fit
from test_reward_service import GATED

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_repository_root")]


def remote(*servers, **settings) -> list[dict]:
    return [
        {
            "class_path": "divrl.rewards.RemoteReward",
            "init_args": {"urls": [s.url for s in servers], "timeout": 5.0, "retries": 3, "backoff": 0.5, **settings},
        }
    ]


def kill(server, step: int) -> dict:
    return {"class_path": "helpers.servers.KillServer", "init_args": {"pid": server.process.pid, "at_step": step}}


def test_losing_one_of_two_servers_mid_run_changes_nothing(tmp_path, caplog):
    a, b = RewardServer(GATED, tmp_path), RewardServer(GATED, tmp_path)  # both start at once
    try:
        a.wait_ready(), b.wait_ready()
        both = demo_fit(
            tmp_path / "both", 6, "--model.system.overlap_rewards", "true", switch=None, rewards=remote(a, b)
        )
        with caplog.at_level(logging.WARNING):
            one = demo_fit(
                tmp_path / "one",
                6,
                "--model.system.overlap_rewards",
                "true",
                switch=None,
                rewards=remote(a, b),
                callbacks=(kill(b, 3),),
            )
    finally:
        a.stop()
        b.stop()
    assert not listening(a.port) and not listening(b.port)
    assert all(torch.equal(one[k], both[k]) for k in both)  # (served = in process: tests/test_reward_service.py)
    assert f"reward server {b.url}/predict failed at" in caplog.text
    assert f"reward server {b.url}/predict failed at" in caplog.text.split("did not come back")[0]
    assert "did not come back" in caplog.text and f"reward server {a.url}/predict failed" not in caplog.text


def test_losing_every_server_stops_in_time_and_keeps_the_last_checkpoint(tmp_path, console):
    import yaml

    server = RewardServer(GATED, tmp_path).wait_ready()
    config = {
        "trainer": {
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "dirpath": str(tmp_path / "ckpt")},
                },
                kill(server, 3),
            ],
        },
        "model": {"rewards": remote(server, timeout=1.0, retries=2, backoff=0.2)},
    }
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(config))
    try:
        code, out = console(
            "fit",
            "--config",
            "configs/demo.yaml",
            "--config",
            str(tmp_path / "overrides.yaml"),
            "--trainer.max_steps",
            "8",
        )
        ended = time.monotonic()
    finally:
        server.stop()
    assert code == 1
    assert f"the reward server {server.url}/predict failed for 2 s (timeout x retries)" in out.err
    assert ended - KILLED[server.process.pid] < 2 + 20  # the give-up time, plus the rollout under way and the exit
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert saved == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    checkpoint = torch.load(tmp_path / "ckpt" / saved[-1], weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 3 and checkpoint["divrl"]["rollouts_done"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
