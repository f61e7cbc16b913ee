"""Rewards off the critical path: the demo policy's rollouts scored five ways, side by side in one run.

The reward is the demo's stage-2 reward (R2 on the weight-free dense descriptor) plus a fixed delay per group, a
stand-in for an expensive judge (Mind-the-Glitch's SD-2.1 features, Grounding DINO); by default the delay is set so
that scoring a batch in process takes as long as rolling it out (the balanced case, where overlap matters most).
Every mode runs the training module's own ``rollout_and_score`` on the same batches (one group per rollout chunk):

  sequential local      roll out the batch, then score its groups one by one in process
  overlapped local      system.overlap_rewards: each group is scored in a background thread while the next rolls out
  remote, 1 server      RemoteReward to one `divrl serve-reward` (LitServe, one worker), after the rollout
  remote, 2 servers     RemoteReward over two servers: groups in flight together, spread by load
  overlapped, 2 servers both: requests in flight while the rollout goes on

Printed per mode: the step (rollout + scoring, median over batches), the reward time hidden (the part of the
sequential in-process scoring time that no longer adds to the step: by overlap, by servers in parallel, or both),
and the reward throughput (images/s, the batch scored alone, no rollout). Goals: an overlapped step <= 1.15 x
max(rollout, reward) where sequential is their sum, and two servers >= 1.8x the throughput of one. The servers run
on this machine, so on a small CPU they compete with the rollout for cores; a sleep-dominated delay keeps the
comparison about scheduling, which is what it measures.

Run:  python benchmarks/reward_service.py [--groups 8] [--delay auto|SECONDS] [--batches 3] [--threads 1]
                                          [--resolution 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import yaml

from divrl.rewards import Group, Reward, RewardOutput

ROOT = Path(__file__).resolve().parents[1]
GATED = {
    "class_path": "divrl.rewards.GatedReward",
    "init_args": {
        "threshold": 0.5,
        "weight": 5.0,
        "scorer": {
            "class_path": "divrl.rewards.FeatureScorer",
            "init_args": {
                "pool": 2,
                "backbone": {
                    "class_path": "divrl.rewards.backbones.DenseDescriptor",
                    "init_args": {"grid_size": 24, "cell": 4},
                },
            },
        },
    },
}


class Delayed(Reward):
    """``reward`` plus ``delay`` seconds per group: a judge whose cost is set by hand."""

    def __init__(self, reward: Reward, delay: float):
        super().__init__()
        self.reward, self.delay = reward, delay

    def forward(self, group) -> RewardOutput:
        time.sleep(self.delay)
        return self.reward(group)


def delayed_block(delay: float) -> dict:
    return {"class_path": "reward_service.Delayed", "init_args": {"reward": GATED, "delay": delay}}


def start_server(block: dict, folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = folder / f"reward-{port}.yaml"
    config.write_text(yaml.safe_dump(block))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "divrl.cli",
            "serve-reward",
            "--config",
            str(config),
            "--port",
            str(port),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"divrl serve-reward on port {port} did not start")


def build_module(groups: int, resolution: int | None = None, group_size: int | None = None):
    """The demo's training module (policy built, no trainer; at ``resolution`` and ``group_size`` when given) and
    ``groups`` demo conditions."""
    from divrl.cli import run_lightning
    from divrl.data.stream import SkipCounter, read_identities, to_condition

    os.chdir(ROOT)
    cli = run_lightning(["--config", "configs/demo.yaml", "--trainer.logger", "false"], run=False)
    module = cli.model
    module.configure_model()
    module.system.rollout_chunk_groups = 1
    if resolution:
        module.sampling.resolution = resolution
    if group_size:
        module.sampling.group_size = group_size
    records = list(read_identities(sorted(str(p) for p in (ROOT / "data/demo").glob("train-*.tar")), SkipCounter(5)))
    samples = [to_condition(records[i % len(records)], i // len(records)) for i in range(groups)]
    return module, samples


def measure(module, reward, samples, overlap: bool, batches: int) -> tuple[float, float]:
    """Median step (rollout + scoring) and rollout seconds of ``batches`` batches."""
    from divrl.training.environment import RunEnvironment

    module.system.overlap_rewards = overlap
    steps, rollouts = [], []
    for b in range(batches + 1):  # the first batch warms up (allocations, the servers' first requests)
        env = RunEnvironment(module, reward, module.sampling)
        start = time.perf_counter()
        env.rollout_and_score(samples, module.sampling.group_size, torch.Generator().manual_seed(b))
        if b:
            steps.append(time.perf_counter() - start)
            rollouts.append(env.timings["rollout"])
    return statistics.median(steps), statistics.median(rollouts)


def throughput(module, reward, samples, images) -> float:
    """Images per second of ``reward`` on the batch's groups alone (its own concurrency, no rollout)."""
    from divrl.training.environment import score_groups

    g = module.sampling.group_size
    score_groups(reward, samples[:2], images[: 2 * g], g, torch.device("cpu"), lambda ok: ok)  # warm-up
    start = time.perf_counter()
    score_groups(reward, samples, images, g, torch.device("cpu"), lambda ok: ok)
    return images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--groups",
        type=int,
        default=16,
        help="conditions per batch (default 16: the last group's scoring, 1/16 of the batch's, is all "
        "that overlap cannot hide)",
    )
    parser.add_argument("--group-size", type=int, default=4, help="images per group (default 4)")
    parser.add_argument("--delay", default="auto", help="seconds added per group (auto: scoring = rollout)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per mode (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process (default 1: on a small CPU the rollout keeps one core and "
        "the reward, in a thread or a server process of one thread, gets the other, as a trainer "
        "and its reward GPUs would; 0 leaves torch's default)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="image side (default 64: at the demo's 32 px a rollout step is mostly Python, which a "
        "scoring thread slows down through the GIL; real models are not)",
    )
    args = parser.parse_args()

    from divrl.rewards import RemoteReward
    from divrl.rewards.config import build_reward

    sys.path.insert(0, str(Path(__file__).parent))  # reward_service.Delayed, as the servers import it
    if args.threads:
        torch.set_num_threads(args.threads)
    module, samples = build_module(args.groups, args.resolution, args.group_size)
    g = module.sampling.group_size
    plain = build_reward(GATED)
    _, rollout_s = measure(module, plain, samples, False, 1)
    with torch.no_grad():
        images = module._trajectories(samples, g, torch.Generator().manual_seed(0))[1].images
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        plain(Group(sample, images[i * g : (i + 1) * g]))
    compute_s = (time.perf_counter() - start) / len(samples)
    delay = max(rollout_s / len(samples) - compute_s, 0.0) if args.delay == "auto" else float(args.delay)
    local = build_reward(delayed_block(delay))
    print(
        f"divrl reward service, {torch.get_num_threads()} torch thread(s) here and 1 per server: demo policy, "
        f"{args.groups} groups x "
        f"G = {g} at {module.sampling.resolution}px, {module.sampling.num_steps} steps, one group per rollout chunk; "
        f"reward R2 (dense) + {delay * 1000:.0f} ms per group"
    )

    folder = Path(tempfile.mkdtemp(prefix="divrl-reward-service-"))
    servers = [start_server(delayed_block(delay), folder) for _ in range(2)]
    try:
        one = RemoteReward([servers[0][1]], timeout=120, max_in_flight=args.groups)
        two = RemoteReward([s[1] for s in servers], timeout=120, max_in_flight=args.groups)
        modes = [
            ("sequential local", local, False),
            ("overlapped local", local, True),
            ("remote, 1 server", one, False),
            ("remote, 2 servers", two, False),
            ("overlapped, 2 servers", two, True),
        ]
        rows = []
        for name, reward, overlap in modes:
            step, rollout = measure(module, reward, samples, overlap, args.batches)
            rows.append((name, step, rollout, throughput(module, reward, samples, images)))
    finally:
        for process, _ in servers:
            os.killpg(process.pid, signal.SIGKILL)
    sequential_step, rollout = rows[0][1], min(r[2] for r in rows)
    reward_s = sequential_step - rows[0][2]
    print(f"\nrollout alone {rollout:.2f} s, sequential in-process scoring {reward_s:.2f} s per batch\n")
    print(
        "| mode | step (s) | of which rollout (s) | reward time hidden | rewards/s (images) |\n"
        "| --- | ---: | ---: | ---: | ---: |"
    )
    for name, step, roll, rate in rows:
        hidden = (sequential_step - step) / reward_s if reward_s > 0 else float("nan")
        print(f"| {name} | {step:.2f} | {roll:.2f} | {hidden:.0%} | {rate:.1f} |")
    bound = max(rollout, reward_s)
    print(
        f"\noverlapped local step / max(rollout, reward) = {rows[1][1] / bound:.2f} (goal <= 1.15); "
        f"overlapped 2 servers: {rows[4][1] / bound:.2f}"
    )
    print(f"2 servers / 1 server reward throughput = {rows[3][3] / rows[2][3]:.2f}x (goal >= 1.8)")


if __name__ == "__main__":
    main()
