"""The `divrl` console script: `divrl score` on the built-in example and on image files."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from divrl.cli import main
from divrl.examples import example_group
from divrl.images import to_image_batch, to_pil
from divrl.rewards import FeatureScorer, GatedReward
from divrl.rewards.backbones import DenseDescriptor


def parse_table(text):
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] != "linear":
            cols = [p for p in parts if p.replace(".", "", 1).lstrip("-").isdigit()]
            if len(cols) == 4:
                rows[line[: line.index(cols[0])].strip()] = [float(c) for c in cols]
    return rows


def test_score_builtin_example_prints_the_rewards(capsys):
    assert main(["score"]) == 0
    rows = parse_table(capsys.readouterr().out)
    reference, mask, images, names = example_group()
    expected = GatedReward(FeatureScorer(DenseDescriptor()))(reference, images, ref_mask=mask)
    assert list(rows) == names
    for k, name in enumerate(names):
        assert rows[name][0] == pytest.approx(expected.components["nssm"][k].item(), abs=1e-3)
        assert rows[name][1] == pytest.approx(expected.components["vsm"][k].item(), abs=1e-3)
        assert rows[name][2] == pytest.approx(expected.reward[k].item(), abs=1e-3)
    # the example tells the story: moving earns diversity and keeps identity; recolouring loses identity
    assert rows["moved, rotated, smaller"][0] > 0.5 and rows["moved, rotated, smaller"][1] > 0.9
    assert rows["identical copy"][:2] == [0.0, 1.0]
    assert rows["recoloured (same layout)"][0] < 0.1 and rows["recoloured (same layout)"][1] < 0.1


def test_score_image_files_writes_json(tmp_path):
    reference, mask, images, names = example_group(size=128)
    to_pil(reference).save(tmp_path / "ref.png")
    to_pil(mask.expand(3, -1, -1)).convert("L").save(tmp_path / "mask.png")
    paths = []
    for k, image in enumerate(images):
        paths.append(tmp_path / f"gen_{k}.png")
        to_pil(image).save(paths[-1])
    out_json = tmp_path / "scores.json"
    argv = [
        "score",
        "--reference",
        str(tmp_path / "ref.png"),
        "--ref-mask",
        str(tmp_path / "mask.png"),
        "--size",
        "128",
        "--json",
        str(out_json),
        *map(str, paths),
    ]
    assert main(argv) == 0
    rows = json.loads(out_json.read_text())["scores"]
    assert [r["image"] for r in rows] == [p.name for p in paths]
    expected = GatedReward(FeatureScorer(DenseDescriptor()))(
        to_image_batch(tmp_path / "ref.png")[0], to_image_batch([str(p) for p in paths]), ref_mask=mask[None]
    )
    got = torch.tensor([[r["nssm"], r["vsm"], r["r2"]] for r in rows])
    want = torch.stack([expected.components["nssm"], expected.components["vsm"], expected.reward], 1)
    assert torch.allclose(got, want, atol=1e-5)
    assert [r["penalized"] for r in rows] == expected.gated.tolist()


def test_score_errors_name_the_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match="without --reference"):
        main(["score", str(tmp_path / "a.png")])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        main(["score", "--reference", str(broken), str(broken)])


@pytest.mark.skipif(shutil.which("divrl") is None, reason="console script not installed (pip install -e .)")
def test_console_script_is_installed():
    out = subprocess.run(["divrl", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("divrl ")
    assert subprocess.run([sys.executable, "-m", "divrl.cli", "--help"], capture_output=True).returncode == 0
