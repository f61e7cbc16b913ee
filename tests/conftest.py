"""Shared fixtures: the optional DreamBooth photos beside the project, a short two-stage demo run, and small image
helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

DREAMBOOTH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def in_repository_root():
    """Run the module's tests from the repository root, where the shipped configs' relative paths (data/demo/...,
    runs/...) resolve, as for `divrl fit --config configs/demo.yaml`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="session")
def dreambooth_root() -> Path:
    """``../shared/datasets/dreambooth`` (30 subjects); tests using it skip cleanly when it is absent."""
    if not DREAMBOOTH.is_dir() or not any(DREAMBOOTH.glob("*/*.jpg")):
        pytest.skip(f"DreamBooth photos not found at {DREAMBOOTH}")
    return DREAMBOOTH


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory) -> Path:
    """The demo recipe cut to 2 updates, stage 2 from update 1, at lr 3e-3 so that the two stages' weights differ
    visibly: ``lora/stage1`` and ``lora/final``, for the tests of ``divrl export`` and ``divrl app`` (one run for both:
    about 12 s)."""
    from helpers.runs import short_demo_run

    out = tmp_path_factory.mktemp("two-stage") / "run"
    return short_demo_run(out, max_steps=2, switch_steps=1, optimizer={"init_args": {"lr": 3e-3}})


def colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation scaling and a hue rotation about the grey axis: colours change, the
    layout does not. ``images`` is ``(B, 3, H, W)`` in [0, 1]."""

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(1, generator=generator).item()

    x = images * uniform(0.75, 1.25)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.75, 1.25) + mean
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * uniform(0.6, 1.4)
    angle = uniform(-math.pi / 4, math.pi / 4)
    k = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    return torch.einsum("ij,bjhw->bihw", rotation, x).clamp(0, 1)


@pytest.fixture
def console(monkeypatch, capsys):
    """Run the console script (``divrl.cli.main()`` with ``sys.argv``) from the repository root: its exit code and
    what it printed (``capsys``' captured out and err)."""
    import logging
    import sys

    import lightning.pytorch  # noqa: F401 - its log handlers hold the sys.stderr of the test that imported it

    from divrl.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DIVRL_TRACEBACK", raising=False)

    def run(*args: str):
        for logger in [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
            for handler in logger.handlers:  # this test's stderr, not an earlier test's closed one ("Logging error")
                if type(handler) is logging.StreamHandler:
                    monkeypatch.setattr(handler, "stream", sys.stderr)
        monkeypatch.setattr("sys.argv", ["divrl", *args])
        try:
            code = main()
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
        return code, capsys.readouterr()

    return run


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: a refusal must come before it."""
    from divrl.training.module import DivRLModule

    def loaded(self):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(DivRLModule, "configure_model", loaded)
