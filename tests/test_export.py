"""``divrl export``: the Hub-ready folder of a short demo run, its model card (parsed by ``huggingface_hub``), the card's
diffusers snippet against ``divrl sample``'s image, and the upload against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.fake_hub import FakeHub
from huggingface_hub import ModelCard
from PIL import Image

from divrl.cli import main
from divrl.export import ExportError, find_run, push_to_hub

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a 2-update demo run (about 12 s), then export, sample and upload: about 25 s in all


@pytest.fixture(scope="module")
def run(two_stage_run) -> Path:
    """The demo recipe cut to 2 updates, stage 2 from update 1: lora/stage1 and lora/final."""
    return two_stage_run


@pytest.fixture(scope="module")
def card(run) -> Path:
    out = run.parent / "card"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    try:
        assert main(["export", str(run), "--out", str(out), "--num-identities", "2", "--num-samples", "2"]) == 0
    finally:
        os.chdir(cwd)
    return out


def test_the_folder_holds_both_loras_the_config_and_a_card_the_hub_client_parses(run, card):
    assert (card / "pytorch_lora_weights.safetensors").read_bytes() == (
        run / "lora/final/pytorch_lora_weights.safetensors"
    ).read_bytes()
    assert (card / "stage1/pytorch_lora_weights.safetensors").read_bytes() == (
        run / "lora/stage1/pytorch_lora_weights.safetensors"
    ).read_bytes()
    config = yaml.safe_load((card / "training_config.yaml").read_text())
    saved = yaml.safe_load(next(run.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert config["model"] == saved["model"] and config["trainer"] == saved["trainer"] and "ckpt_path" not in config

    parsed = ModelCard.load(card / "README.md")
    data = parsed.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "image-to-image"
    assert {"lora", "divrl", "flux.1-kontext"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # the base's own card (data/demo/tiny-kontext/README.md)
    assert "base_model" not in data  # a local folder is no Hub id
    assert [w["output"]["url"] for w in data["widget"]] == ["images/sample_0.png", "images/sample_1.png"]
    for entry in data["widget"]:
        assert (card / entry["output"]["url"]).is_file() and entry["text"].startswith("a photo of")
    body = parsed.text
    assert "`NSSMReward` → `GatedReward` (threshold 0.5, weight 5.0); stage 2 from update 1" in body
    assert "| optimizer updates | 2 |" in body and "| LoRA | rank 8, alpha 16.0 |" in body
    assert "update 2, end of stage 2" in body
    grid = Image.open(card / "images/samples.png")
    assert grid.height > Image.open(card / "images/sample_0.png").height  # the two conditions' grids, stacked


def test_the_cards_snippet_reproduces_divrl_sample(card, tmp_path):
    code = re.search(r"```python\n(.*?)```", (card / "README.md").read_text(), re.S).group(1)
    assert code.count('image.save("sample.png")') == 1
    # the snippet loads the base by the config's path (relative to the repository): run it from there
    target = tmp_path / "sample.png"
    done = subprocess.run(
        [sys.executable, "-c", code.replace('"sample.png"', repr(str(target)))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ours = np.asarray(Image.open(card / "images/sample_0.png"))  # divrl sample's first image, copied by the export
    theirs = np.asarray(Image.open(target))
    assert ours.shape == theirs.shape == (32, 32, 3)
    assert np.array_equal(ours, theirs)
    # not a vacuous match: the sample is not the reference, and the second condition's sample differs
    assert not np.array_equal(theirs, np.asarray(Image.open(card / "images/sample_1.png")))


def test_the_samples_of_divrl_sample_are_reused_with_their_seed(run, card, tmp_path):
    samples = tmp_path / "samples"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main(
            [
                "sample",
                "--config",
                str(card / "training_config.yaml"),
                "--lora",
                str(card),
                "--trainer.logger",
                "false",
                "--output_dir",
                str(samples),
                "--num_identities",
                "1",
                "--num_samples",
                "2",
                "--seed",
                "3",
            ]
        )
        assert (
            main(["export", str(run / "lora/final"), "--out", str(tmp_path / "again"), "--samples", str(samples)]) == 0
        )
    finally:
        os.chdir(cwd)
    assert (tmp_path / "again/stage1/pytorch_lora_weights.safetensors").is_file()  # found beside lora/final
    assert (tmp_path / "again/images/sample_0.png").read_bytes() == next(samples.glob("*/000_0.png")).read_bytes()
    from divrl.utils import mix_seeds

    assert f"manual_seed({mix_seeds(3, 0)})" in (tmp_path / "again/README.md").read_text()


def test_push_uploads_every_file_to_the_hub_and_refusals_leave_the_folder(card, tmp_path):
    with FakeHub() as hub:
        url = push_to_hub(card, "someone/divrl-demo", private=True, token=hub.token, endpoint=hub.url)
        assert hub.repos["someone/divrl-demo"]["visibility"] == "private"
        local = {p.relative_to(card).as_posix(): p.read_bytes() for p in card.rglob("*") if p.is_file()}
        assert hub.files["someone/divrl-demo"] == local and "README.md" in local
        assert url.endswith("/someone/divrl-demo/commit/" + "0" * 40)
        with pytest.raises(
            ExportError,
            match=r"^--push-to-hub someone/x: the Hub refused the upload: this account is not authenticated",
        ):
            push_to_hub(card, "someone/x", token="hf_wrong", endpoint=hub.url)
    with pytest.raises(ExportError, match=r"cannot reach the Hub .*; .* is ready: upload it later with `hf upload"):
        push_to_hub(card, "someone/x", token="hf_any", endpoint=url.split("/someone")[0])  # the server is gone
    assert (card / "README.md").is_file()


def test_the_command_uploads_with_hf_endpoint_and_says_so_when_offline(run, tmp_path):
    env = {**os.environ, "HF_TOKEN": "hf_fake_token"}
    command = [sys.executable, "-m", "divrl.cli", "export", str(run), "--num-samples", "0", "--push-to-hub", "me/demo"]
    with FakeHub() as hub:
        done = subprocess.run(
            [*command, "--out", str(tmp_path / "a")],
            env={**env, "HF_ENDPOINT": hub.url},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"uploaded to {hub.url}/me/demo/commit/" in done.stdout
        assert set(hub.files["me/demo"]) >= {"README.md", "pytorch_lora_weights.safetensors", "training_config.yaml"}
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "b")],
        env={**env, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("divrl export: --push-to-hub me/demo: the Hub client is offline")
    )
    assert (tmp_path / "b/README.md").is_file()  # the folder stays


def test_bad_inputs_are_named(run, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        find_run(tmp_path / "nowhere")
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ExportError, match="is a training checkpoint; export the LoRA folder"):
        find_run(ckpt)
    (tmp_path / "half/lora/stage1").mkdir(parents=True)
    (tmp_path / "half/lora/stage1/pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match=r"no lora/final/.*\(it has stage1: pass .*half/lora/stage1\)"):
        find_run(tmp_path / "half")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        main(["export", str(run), "--out", str(tmp_path / "full")])
    with pytest.raises(ExportError, match="give the repository as OWNER/NAME"):
        main(["export", str(run), "--out", str(tmp_path / "new"), "--push-to-hub", "justaname"])
