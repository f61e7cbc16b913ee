"""Start and stop real ``divrl serve-reward`` processes on 127.0.0.1 ports of their own (tests of the reward service)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RewardServer:
    """One ``divrl serve-reward`` process (its own session: stopping it stops its LitServe workers too)."""

    def __init__(self, block: dict, folder: Path, *args: str, api_key: str | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / f"reward-{self.port}.yaml"
        config.write_text(yaml.safe_dump(block))
        self.log = folder / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k != "DIVRL_REWARD_API_KEY"}
        tests = str(Path(__file__).resolve().parents[1])  # helpers.servers.brightness, for a CallableReward
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
        if api_key:
            env["DIVRL_REWARD_API_KEY"] = api_key
        self.api_key = api_key
        command = [
            sys.executable,
            "-m",
            "divrl.cli",
            "serve-reward",
            "--config",
            str(config),
            "--port",
            str(self.port),
            "--accelerator",
            "cpu",
            "--devices",
            "1",
            *args,
        ]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 120.0) -> RewardServer:
        deadline = time.monotonic() + timeout
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"divrl serve-reward exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                request = urllib.request.Request(self.url + "/health", headers=headers)
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"divrl serve-reward on port {self.port} not ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Kill the server and its workers, and wait until nothing listens on its port."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)


KILLED: dict[int, float] = {}
"""pid -> the time.monotonic() at which :class:`KillServer` killed it."""


def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class KillServer(_callback_base()):
    """A training callback that kills a reward server's process group after optimizer step ``at_step``."""

    def __init__(self, pid: int, at_step: int):
        self.pid, self.at_step = pid, at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step and self.pid not in KILLED:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            KILLED[self.pid] = time.monotonic()


def brightness(images, prompts, metadata):
    """A CallableReward function: each image's mean; NaN for the prompt "nan", a RuntimeError for the prompt "crash"."""

    if prompts[0] == "crash":
        raise RuntimeError("shape mismatch in the judge")
    scores = images.mean(dim=(1, 2, 3))
    return scores * float("nan") if prompts[0] == "nan" else scores
