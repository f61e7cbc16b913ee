"""The weight-free dense descriptor: hand-checkable histograms, invariances and equivariances."""

import math

import pytest
import torch

from divrl.rewards.backbones import DenseDescriptor, Features
from divrl.rewards.functional import nssm


def stripes(vertical: bool, size=64, period=8):
    idx = torch.arange(size)
    wave = ((idx // (period // 2)) % 2).float()
    img = wave.view(1, size).expand(size, size) if vertical else wave.view(size, 1).expand(size, size)
    return img.expand(3, size, size).unsqueeze(0).clone()


def test_shapes_and_determinism():
    bb = DenseDescriptor(grid_size=12, cell=4)
    x = torch.rand(2, 3, 50, 70)
    f = bb(x)
    assert isinstance(f, Features)
    assert f.semantic.shape == (2, 18, 12, 12) and f.visual.shape == (2, 27 + 9, 12, 12)
    assert f.semantic.dtype == torch.float32
    g = bb(x)
    assert torch.equal(f.semantic, g.semantic) and torch.equal(f.visual, g.visual)
    # batch independence
    one = bb(x[1:])
    assert torch.allclose(one.visual[0], f.visual[1], atol=1e-6)


def test_orientation_bins_hand_worked():
    bb = DenseDescriptor(grid_size=8, cell=8, orientations=9)
    # vertical stripes: horizontal gradients, angle 0, which sits half-way between bin 8 (centre 170 deg) and
    # bin 0 (centre 10 deg) -> equal energy in bins 0 and 8, nothing elsewhere.
    hist = bb._orientation_histograms(stripes(vertical=True))
    energy = hist.sum(dim=(0, 2, 3))
    assert energy[0] == pytest.approx(energy[8].item(), rel=1e-5)
    assert energy[1:8].abs().max() < 1e-6 * energy[0]
    # horizontal stripes: vertical gradients, angle 90 deg = the centre of bin 4
    hist = bb._orientation_histograms(stripes(vertical=False))
    energy = hist.sum(dim=(0, 2, 3))
    assert energy[4] > 0 and torch.cat([energy[:4], energy[5:]]).abs().max() < 1e-6 * energy[4]


def test_colour_histogram_bins():
    bb = DenseDescriptor(grid_size=4, cell=8)
    grey = torch.full((1, 3, 32, 32), 0.5)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    h_grey = bb._colour_histograms(grey)
    h_red = bb._colour_histograms(red)
    # Hellinger map of a distribution: unit L2 norm per cell
    assert torch.allclose(h_grey.norm(dim=1), torch.ones(1, 4, 4), atol=1e-5)
    assert torch.allclose(h_red.norm(dim=1), torch.ones(1, 4, 4), atol=1e-5)
    # mid-grey: achromatic bin (hue index 8) at the middle intensity level (index 1) -> channel 8 * 3 + 1
    assert h_grey[0, 8 * 3 + 1].min() > 0.999
    # pure red: chromatic, so the achromatic channels are empty, and it differs from grey completely
    assert h_red[0, 8 * 3 : 8 * 3 + 3].max() < 1e-3
    assert (h_red * h_grey).sum(1).max() < 1e-3


def test_shape_features_ignore_global_brightness_and_contrast():
    torch.manual_seed(0)
    bb = DenseDescriptor(grid_size=16, cell=8)
    x = torch.rand(1, 3, 16, 16)
    x = torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear")  # smooth, structured image
    darker = x * 0.6 + 0.1
    a, b = bb(x), bb(darker)
    shape_a, shape_b = a.semantic, b.semantic
    cos = torch.nn.functional.cosine_similarity(shape_a, shape_b, dim=1)
    assert cos.mean() > 0.99
    assert nssm(b.semantic, a.semantic).item() < 0.01


def test_translation_by_one_cell_shifts_the_grid():
    torch.manual_seed(1)
    bb = DenseDescriptor(grid_size=16, cell=8, context=1)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32), size=(128, 128), mode="bilinear")
    shifted = torch.roll(x, shifts=8, dims=3)  # exactly one cell to the right (native size: no resize)
    a, b = bb(x), bb(shifted)
    inner = slice(3, 12)  # away from the borders, where the roll wraps and block normalisation is one-sided
    for name in ("semantic", "visual"):
        fa, fb = getattr(a, name), getattr(b, name)
        assert torch.allclose(fb[..., inner, 4:12], fa[..., inner, 3:11], atol=1e-5), name


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cell >= 2"):
        DenseDescriptor(cell=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        DenseDescriptor()(torch.rand(2, 5, 8, 8))
    assert math.isfinite(DenseDescriptor(grid_size=4, cell=4)(torch.zeros(1, 3, 16, 16)).semantic.sum().item())
