"""Runs ``notebooks/pooling_ablation.ipynb`` headless (nbclient + ipykernel) and checks what it printed.

The notebook prints a table of nSSM means per variant and pool and ends with a machine-readable line
``ABLATION_RESULT {json}``. The checks below use that output: the table agrees with the JSON, the numbers have the
properties a structure reward must have, and one reported nSSM matches an independent brute-force recomputation.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F

from divrl.images import to_image_batch
from divrl.rewards.backbones import DenseDescriptor

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pooling_ablation.ipynb"
POOLS = ("1", "2", "4")
VARIANTS = ("pose change", "colour change", "different subject")


def execute(cwd: Path, monkeypatch, **env: str | None):
    """Execute the notebook in a fresh kernel with ``env`` set (``None`` unsets) and ``cwd`` as working directory.
    A failing cell raises ``nbclient.exceptions.CellExecutionError``, which fails the test with the traceback."""
    for key in ("DIVRL_DREAMBOOTH", "DIVRL_DINOV2", "DIVRL_ABLATION_SUBJECTS"):
        monkeypatch.delenv(key, raising=False)  # the developer's own settings must not leak into the run
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel process inherits this environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def printed(nb) -> str:
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")


def ablation_result(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("ABLATION_RESULT ")]
    assert len(lines) == 1, "the notebook must print exactly one ABLATION_RESULT line"
    return json.loads(lines[0].removeprefix("ABLATION_RESULT "))


def check_outputs(nb, num_subjects: int) -> dict:
    """The checks every run must pass, whatever the data source."""
    text = printed(nb)
    result = ablation_result(text)
    assert result["pools"] == [1, 2, 4]
    assert len(result["subjects"]) == num_subjects
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), "no figure shown"

    dense = result["backbones"]["dense descriptor"]
    for header in ("pool 1 (48x48)", "pool 2 (24x24)", "pool 4 (12x12)"):
        assert header in text
    table = text.split("nSSM, dense descriptor features")[1]
    for variant in VARIANTS:
        # the table row shows the same means and stds as the JSON (to its 3 printed decimals)
        row = re.search(rf"^\s*{variant}((?:\s+\d+\.\d{{3}} ± \d+\.\d{{3}}){{3}})\s*$", table, re.MULTILINE)
        assert row, f"no table row for {variant!r}"
        cells = re.findall(r"(\d+\.\d{3}) ± (\d+\.\d{3})", row.group(1))
        for pool, (shown_mean, shown_std) in zip(POOLS, cells, strict=True):
            assert float(shown_mean) == pytest.approx(dense["mean"][variant][pool], abs=6e-4)
            assert float(shown_std) == pytest.approx(dense["std"][variant][pool], abs=6e-4)

    for pool in POOLS:
        for variant in VARIANTS:
            values = dense["scores"][variant][pool]
            assert len(values) == num_subjects
            assert all(0.0 <= v <= 2.0 for v in values), (variant, pool, values)
            assert dense["mean"][variant][pool] == pytest.approx(statistics.fmean(values))
        means = {v: dense["mean"][v][pool] for v in VARIANTS}
        # a structure reward: moving the subject or replacing it counts, recolouring it does not
        assert means["pose change"] > means["colour change"], (pool, means)
        assert means["different subject"] > means["colour change"], (pool, means)

    # the conclusion is computed from these numbers: it names the pool with the largest pose - colour margin
    margin = {p: dense["mean"]["pose change"][p] - dense["mean"]["colour change"][p] for p in POOLS}
    assert f"margin is largest at pool {max(POOLS, key=margin.get)} " in text
    return result


def brute_force_nssm(gen: np.ndarray, ref: np.ndarray, pool: int) -> float:
    """nSSM of two ``(C, H, W)`` grids in float64, written out step by step: normalise each cell, average
    ``pool × pool`` blocks, ``SSM = F Fᵀ``, then the Pearson correlation over all pairs ``i ≠ j``, in plain
    loops."""

    def ssm(grid: np.ndarray) -> list[list[float]]:
        grid = grid / np.maximum(np.linalg.norm(grid, axis=0, keepdims=True), 1e-8)
        c, h, w = grid.shape
        pooled = grid.reshape(c, h // pool, pool, w // pool, pool).mean(axis=(2, 4))
        tokens = pooled.reshape(c, -1).T
        return (tokens @ tokens.T).tolist()

    a, b = ssm(gen), ssm(ref)
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mean_a = sum(a[i][j] for i, j in pairs) / len(pairs)
    mean_b = sum(b[i][j] for i, j in pairs) / len(pairs)
    cov = var_a = var_b = 0.0
    for i, j in pairs:
        da, db = a[i][j] - mean_a, b[i][j] - mean_b
        cov += da * db
        var_a += da * da
        var_b += db * db
    return 1.0 - cov / (var_a * var_b) ** 0.5


def test_notebook_is_committed_valid_and_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the notebook's outputs before committing"


@pytest.mark.slow  # runs the whole notebook (about 5 s)
def test_notebook_on_dreambooth_photos(dreambooth_root, monkeypatch):
    # No DIVRL_DREAMBOOTH: the notebook must find the photos beside the repository from the notebooks/ folder.
    nb = execute(NOTEBOOK.parent, monkeypatch, DIVRL_ABLATION_SUBJECTS="6")
    result = check_outputs(nb, num_subjects=6)
    assert result["source"] == "dreambooth"
    assert Path(result["root"]).resolve() == dreambooth_root.resolve()

    # The first subject's pose pair is its photos 0 and 1; recompute its nSSM independently of divrl's functional
    # code (only the image loading and the backbone are shared) and compare with what the notebook reported.
    photos = sorted((dreambooth_root / result["subjects"][0]).glob("*.jpg"))
    reference_path, pose_path = (Path(result["paths"][v][0]) for v in ("reference", "pose change"))
    assert (reference_path, pose_path) == (photos[0], photos[1])
    backbone = DenseDescriptor()

    def grid(path: Path) -> np.ndarray:
        image = F.interpolate(to_image_batch(path), size=(384, 384), mode="bilinear", antialias=True).clamp(0, 1)
        return backbone(image).visual[0].double().numpy()

    reference, pose = grid(reference_path), grid(pose_path)
    scores = result["backbones"]["dense descriptor"]["scores"]["pose change"]
    for pool in (2, 4):
        assert scores[str(pool)][0] == pytest.approx(brute_force_nssm(pose, reference, pool), abs=1e-5)


@pytest.mark.slow  # runs the whole notebook (about 5 s)
def test_notebook_falls_back_to_synthetic_subjects(tmp_path, monkeypatch):
    # Without the photos (and run from an unrelated folder) the notebook still runs, on the synthetic world.
    nb = execute(tmp_path, monkeypatch, DIVRL_DREAMBOOTH=str(tmp_path / "missing"), DIVRL_ABLATION_SUBJECTS="4")
    result = check_outputs(nb, num_subjects=4)
    assert result["source"] == "synthetic" and result["paths"] is None
    assert "source: synthetic" in printed(nb)
    assert list(tmp_path.iterdir()) == [], "the notebook must not write files"
