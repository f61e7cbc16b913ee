"""``divrl app``: the Gradio page on a short demo run, driven by Gradio's own Python client; its images and scores
against ``divrl sample``'s for the same reference, prompt, seed and steps; a screenshot in headless Chromium where
one is installed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio = pytest.importorskip("gradio")  # the `app` extra
from gradio_client import Client, handle_file  # noqa: E402

from divrl.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of the red plain disc on the right, small, on the beach"
pytestmark = pytest.mark.slow  # a 2-update demo run, the page, and four `divrl sample` runs: about 40 s


@pytest.fixture(scope="module")
def run(two_stage_run) -> Path:
    return two_stage_run  # the two stages' weights differ visibly


@pytest.fixture(scope="module")
def page(run):
    from divrl.app import build_app
    from divrl.cli_app import studio_for

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    try:
        studio = studio_for(argparse.Namespace(lora=run, config=None, base=None))
        app = build_app(studio)
        app.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
        yield app.local_url, studio
        app.close()
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    import random

    from divrl.data.synthetic import random_identity, random_pose, render
    from divrl.images import to_pil

    rng = random.Random(5)
    image, _ = render(random_identity(rng), random_pose(rng), size=64)  # a subject of the demo's synthetic world
    path = tmp_path_factory.mktemp("ref") / "subject.png"
    to_pil(image).save(path)
    return path


def divrl_sample(out: Path, reference: Path, lora: Path | None, steps: int = 4) -> dict:
    args = ["sample", "--config", "configs/demo.yaml", "--trainer.logger", "false", "--reference", str(reference)]
    args += ["--prompts", json.dumps([PROMPT]), "--num_samples", "2", "--num_steps", str(steps), "--seed", "7"]
    args += ["--output_dir", str(out)] + (["--lora", str(lora)] if lora is not None else [])
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main(args)
    finally:
        os.chdir(cwd)
    return json.loads((out / "samples.json").read_text())["samples"][0]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_client_gets_divrl_samples_images_and_scores(page, run, reference, tmp_path):
    url, studio = page
    client = Client(url, verbose=False)
    base, trained, table, summary = client.predict(
        [handle_file(str(reference))], None, PROMPT, 7, 2, 4, 2, api_name="/generate"
    )
    expected = divrl_sample(tmp_path / "final", reference, run / "lora/final")
    assert len(trained) == 2 and len(base) == 2
    for got, file in zip(trained, expected["files"]):
        assert np.array_equal(pixels(got["image"]), pixels(file))
    rows = [row for row in table["value"]["data"] if row[0] == "final"]
    columns = table["value"]["headers"]
    assert columns == ["model", "sample", "reward", "nssm", "vsm"]
    for k, row in enumerate(rows):
        assert row[2] == pytest.approx(expected["reward"][k], abs=1e-6)
        assert row[3] == pytest.approx(expected["nssm"][k], abs=1e-6) and row[4] == pytest.approx(
            expected["vsm"][k], abs=1e-6
        )
    assert trained[0]["caption"] == f"reward {rows[0][2]:.3f} · nssm {rows[0][3]:.3f} · vsm {rows[0][4]:.3f}"
    plain = divrl_sample(tmp_path / "base", reference, None)  # the base model: the adapter off
    for got, file in zip(base, plain["files"]):
        assert np.array_equal(pixels(got["image"]), pixels(file))
    assert not np.array_equal(pixels(base[0]["image"]), pixels(trained[0]["image"]))  # the LoRA changed the sample
    assert "stage-2 reward" in summary


def test_the_slider_picks_the_stage1_weights(page, run, reference, tmp_path):
    url, _ = page
    _, trained, _, summary = Client(url, verbose=False).predict(
        [handle_file(str(reference))], None, PROMPT, 7, 2, 4, 1, api_name="/generate"
    )
    expected = divrl_sample(tmp_path / "stage1", reference, run / "lora/stage1")
    assert np.array_equal(pixels(trained[0]["image"]), pixels(expected["files"][0]))
    assert "stage-1 reward" in summary


def test_bad_requests_are_answered_with_a_sentence(page, reference):
    url, _ = page
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="type a prompt"):
        client.predict([handle_file(str(reference))], None, "  ", 0, 1, 2, 2, api_name="/generate")
    with pytest.raises(Exception, match="upload at least one reference image"):
        client.predict(None, None, PROMPT, 0, 1, 2, 2, api_name="/generate")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine")
def test_a_screenshot_in_headless_chromium(page, tmp_path):
    url, _ = page
    shot = tmp_path / "app.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,900",
            "--virtual-time-budget=8000",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = pixels(shot)
    assert image.shape[:2] == (900, 1280) and image.std() > 5  # a rendered page, not a blank one
