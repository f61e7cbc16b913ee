"""LPIPS without torchvision (divrl.eval.lpips), offline.

The backbone is a torchvision-format checkpoint with random weights written to a temporary torch hub cache, so the
real loading path runs without a network; the calibration weights are the ones torchmetrics ships. The distances are
checked against a brute-force reference written independently (functional convolutions from the raw state dict,
per-pixel normalisation loops, explicit dot products with the calibration vectors) and against torchmetrics' own
LPIPS network with our backbone substituted for torchvision's.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from divrl.eval.lpips import BACKBONES, LPIPS, default_lin_weights_path, hub_cache_path

ALEX_FILE = "alexnet-owt-7be5be79.pth"

# torchvision's AlexNet ``features``: (index, out, in, kernel); VGG16: (index, out, in), all 3x3.
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
VGG_CONVS = [
    (0, 64, 3),
    (2, 64, 64),
    (5, 128, 64),
    (7, 128, 128),
    (10, 256, 128),
    (12, 256, 256),
    (14, 256, 256),
    (17, 512, 256),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def random_checkpoint(convs, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict (``features.N.weight/bias``) with He-scaled random weights, plus a dummy
    ``classifier.1.weight`` that the loader must ignore."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for conv in convs:
        index, cout, cin = conv[:3]
        k = conv[3] if len(conv) > 3 else 3
        state[f"features.{index}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2.0 / (cin * k * k))
        state[f"features.{index}.bias"] = 0.05 * torch.randn(cout, generator=g)
    state["classifier.1.weight"] = torch.randn(4, 4, generator=g)
    return state


@pytest.fixture(scope="module")
def alex_state() -> dict[str, torch.Tensor]:
    return random_checkpoint(ALEX_CONVS, seed=0)


@pytest.fixture(scope="module")
def alex_path(tmp_path_factory, alex_state):
    path = tmp_path_factory.mktemp("alex") / ALEX_FILE
    torch.save(alex_state, path)
    return path


@pytest.fixture(scope="module")
def model(alex_path) -> LPIPS:
    return LPIPS(backbone_weights=alex_path)


@pytest.fixture(scope="module")
def lin_state() -> dict[str, torch.Tensor]:
    return torch.load(default_lin_weights_path("alex"), map_location="cpu", weights_only=True)


def images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: a low-resolution random field upsampled, plus a little noise, kept in [0, 1]
    low = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------- brute-force reference


def reference_lpips(state, lins, img0: torch.Tensor, img1: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """LPIPS written out longhand in float64: scaling per channel, ``F.conv2d`` from the raw state dict, per-pixel
    normalisation by explicit loops on the first layer, dot products with the calibration vectors."""
    sd = {k: v.double() for k, v in state.items()}

    def prep(img):
        x = img.double() * 2 - 1
        return torch.stack([(x[:, c] - SHIFT[c]) / SCALE[c] for c in range(3)], dim=1)

    def conv_relu(x, index, stride=1, padding=1):
        return F.relu(F.conv2d(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], stride, padding))

    def alex_taps(x):
        r1 = conv_relu(x, 0, stride=4, padding=2)
        r2 = conv_relu(F.max_pool2d(r1, 3, 2), 3, padding=2)
        r3 = conv_relu(F.max_pool2d(r2, 3, 2), 6)
        r4 = conv_relu(r3, 8)
        r5 = conv_relu(r4, 10)
        return [r1, r2, r3, r4, r5]

    def vgg_taps(x):
        taps, blocks = [], [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
        for b, block in enumerate(blocks):
            if b:
                x = F.max_pool2d(x, 2, 2)
            for index in block:
                x = conv_relu(x, index)
            taps.append(x)
        return taps

    taps = alex_taps if net == "alex" else vgg_taps
    t0, t1 = taps(prep(img0)), taps(prep(img1))
    total = torch.zeros(img0.shape[0], dtype=torch.float64)
    for layer, (f0, f1) in enumerate(zip(t0, t1, strict=True)):
        w = lins[f"lin{layer}.model.1.weight"].double().flatten()
        if layer == 0:  # pixel by pixel
            n0, n1 = torch.empty_like(f0), torch.empty_like(f1)
            for b, i, j in itertools.product(range(f0.shape[0]), range(f0.shape[2]), range(f0.shape[3])):
                v0, v1 = f0[b, :, i, j], f1[b, :, i, j]
                n0[b, :, i, j] = v0 / (math.sqrt(float((v0 * v0).sum())) + 1e-10)
                n1[b, :, i, j] = v1 / (math.sqrt(float((v1 * v1).sum())) + 1e-10)
        else:
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        h, wd = f0.shape[-2:]
        total += torch.einsum("bchw,c->b", (n0 - n1) ** 2, w) / (h * wd)
    return total


# ---------------------------------------------------------------- loading


def test_loads_through_the_torch_hub_cache(tmp_path, monkeypatch, alex_state, model):
    path = tmp_path / "hub" / "checkpoints" / ALEX_FILE
    path.parent.mkdir(parents=True)
    torch.save(alex_state, path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert hub_cache_path(BACKBONES["alex"]["url"]) == path
    x, y = images(2, seed=3), images(2, seed=4)
    for local_only in (True, False):  # cached: neither mode downloads
        cached = LPIPS(local_files_only=local_only)
        for index, *_ in ALEX_CONVS:
            assert torch.equal(cached.features[index].weight, alex_state[f"features.{index}.weight"])
            assert torch.equal(cached.features[index].bias, alex_state[f"features.{index}.bias"])
        assert torch.equal(cached(x, y), model(x, y))  # same weights as the explicit-path model


def test_layout_mirrors_torchvision(model, lin_state):
    names = {k for k in model.state_dict() if k.startswith("features.")}
    assert names == {f"features.{i}.{p}" for i, *_ in ALEX_CONVS for p in ("weight", "bias")}
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == [
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
    ]
    assert model.taps == (1, 4, 7, 9, 11)
    for k, lin in enumerate(model.lins):
        assert torch.equal(lin.weight, lin_state[f"lin{k}.model.1.weight"]) and lin.bias is None
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())


def test_torchmetrics_calibration_file_layout(lin_state):
    assert sorted(lin_state) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert [tuple(lin_state[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [
        (1, c, 1, 1) for c in (64, 192, 384, 256, 256)
    ]
    assert all(bool((v >= 0).all()) for v in lin_state.values())


# ---------------------------------------------------------------- values


def test_matches_brute_force_reference(model, alex_state, lin_state):
    x, y = images(2, seed=5), images(2, seed=6)
    got = model(x, y)
    assert got.shape == (2,) and bool((got > 0).all())
    torch.testing.assert_close(got.double(), reference_lpips(alex_state, lin_state, x, y), atol=1e-5, rtol=1e-5)


def test_custom_calibration_weights(tmp_path, alex_path, alex_state):
    g = torch.Generator().manual_seed(7)
    lins = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 192, 384, 256, 256))
    }
    torch.save(lins, tmp_path / "lins.pth")
    custom = LPIPS(backbone_weights=alex_path, lin_weights=tmp_path / "lins.pth")
    x, y = images(1, size=48, seed=8), images(1, size=48, seed=9)
    torch.testing.assert_close(custom(x, y).double(), reference_lpips(alex_state, lins, x, y), atol=1e-5, rtol=1e-5)


def test_matches_torchmetrics_network(model, monkeypatch):
    """torchmetrics' own LPIPS module, with its torchvision backbone replaced by ours (eps differs: 1e-8 inside
    the square root there, 1e-10 outside it here, as in the reference code)."""
    tm = pytest.importorskip("torchmetrics.functional.image.lpips")
    if not hasattr(tm, "_get_tv_model_features") or not hasattr(tm, "_LPIPS"):
        pytest.skip("torchmetrics' private LPIPS layout changed")
    monkeypatch.setattr(tm, "_get_tv_model_features", lambda net, pretrained=False: copy.deepcopy(model.features))
    reference = tm._LPIPS(pretrained=True, net="alex", pnet_rand=False).eval()
    x, y = images(3, seed=10), images(3, seed=11)
    with torch.no_grad():
        expected = reference(x, y, normalize=True).flatten()
    torch.testing.assert_close(model(x, y), expected, atol=1e-5, rtol=1e-5)


def test_properties(model):
    x, y = images(3, seed=12), images(3, seed=13)
    assert torch.equal(model(x, x), torch.zeros(3))
    torch.testing.assert_close(model(x, y), model(y, x), atol=1e-6, rtol=1e-6)
    # batch-1 second argument broadcasts over the first
    torch.testing.assert_close(
        model(x, y[:1]), torch.stack([model(x[i : i + 1], y[:1])[0] for i in range(3)]), atol=1e-6, rtol=1e-6
    )
    # rectangular images work too
    assert model(images(2, size=64)[..., :48], images(2, size=64, seed=2)[..., :48]).shape == (2,)


def test_pairwise_is_the_mean_over_pairs(model):
    x = images(4, seed=14)
    loop = [model(x[i : i + 1], x[j : j + 1])[0] for i, j in itertools.combinations(range(4), 2)]
    torch.testing.assert_close(model.pairwise_distances(x), torch.stack(loop), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.pairwise(x), torch.stack(loop).mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.pairwise(x, batch_size=3), torch.stack(loop).mean(), atol=1e-6, rtol=1e-6)
    # the backbone runs once per image, not once per pair
    calls = []
    handle = model.features[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        model.pairwise(x, batch_size=3)
    finally:
        handle.remove()
    assert calls == [3, 1]


def test_gradients_flow_to_inputs(model):
    x = images(1, seed=15).requires_grad_(True)
    model(x, images(1, seed=16)).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_vgg_backbone(tmp_path):
    state = random_checkpoint(VGG_CONVS, seed=17)
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    vgg = LPIPS(net="vgg16", backbone_weights=tmp_path / "vgg16-397923af.pth")
    assert vgg.net == "vgg" and vgg.taps == (3, 8, 15, 22, 29)
    lins = torch.load(default_lin_weights_path("vgg"), map_location="cpu", weights_only=True)
    x, y = images(1, size=32, seed=18), images(1, size=32, seed=19)
    torch.testing.assert_close(vgg(x, y).double(), reference_lpips(state, lins, x, y, net="vgg"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- errors


def test_local_files_only_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / ALEX_FILE
    with pytest.raises(FileNotFoundError) as info:
        LPIPS(local_files_only=True)
    assert str(expected) in str(info.value) and "download.pytorch.org" in str(info.value)
    assert "backbone_weights" in str(info.value)


def test_failed_download_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="network unreachable") as info:
        LPIPS()
    assert str(tmp_path / "hub" / "checkpoints" / ALEX_FILE) in str(info.value)


def test_bad_checkpoints(tmp_path, alex_state):
    renamed = {k.replace("features.", "backbone."): v for k, v in alex_state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(RuntimeError, match=r"missing features\.0\.bias, features\.0\.weight") as info:
        LPIPS(backbone_weights=tmp_path / "renamed.pth")
    assert "renamed.pth" in str(info.value) and "backbone_weights" in str(info.value)

    wrong = dict(alex_state, **{"features.3.weight": torch.zeros(192, 64, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match=r"features\.3\.weight: file \(192, 64, 3, 3\)"):
        LPIPS(backbone_weights=tmp_path / "wrong.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read the backbone checkpoint file .*garbage.pth"):
        LPIPS(backbone_weights=tmp_path / "garbage.pth")

    with pytest.raises(FileNotFoundError, match="absent.pth"):
        LPIPS(backbone_weights=tmp_path / "absent.pth")


def test_bad_calibration_file(tmp_path, alex_path, lin_state):
    partial = {k: v for k, v in lin_state.items() if not k.startswith("lin4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"missing \['lin4\.model\.1\.weight'\]"):
        LPIPS(backbone_weights=alex_path, lin_weights=tmp_path / "partial.pth")
    vgg_lins = torch.load(default_lin_weights_path("vgg"), map_location="cpu", weights_only=True)
    torch.save(vgg_lins, tmp_path / "vgg.pth")
    with pytest.raises(RuntimeError, match="wrong shapes"):
        LPIPS(backbone_weights=alex_path, lin_weights=tmp_path / "vgg.pth")


def test_bad_inputs(model):
    x = images(2)
    with pytest.raises(ValueError, match=r"img0 must be in \[0, 1\]"):
        model(x * 2 - 1, x)
    with pytest.raises(ValueError, match=r"img1 must be in \[0, 1\]"):
        model(x, x + 0.5)
    with pytest.raises(ValueError, match=r"img1 must be in \[0, 1\]"):
        model(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match=r"img0 must have shape \(B, 3, H, W\)"):
        model(x[:, :1], x)
    with pytest.raises(ValueError, match="float tensor"):
        model((x * 255).to(torch.uint8), x)
    with pytest.raises(ValueError, match="batch size 1"):
        model(x, images(3))
    with pytest.raises(ValueError, match="at least 31x31"):
        model(x[..., :24, :24], x[..., :24, :24])
    with pytest.raises(ValueError, match="at least 2 images"):
        model.pairwise(x[:1])
    with pytest.raises(ValueError, match="net must be 'alex' or 'vgg'"):
        LPIPS(net="squeeze")
    # float rounding just past the range is tolerated (and clamped)
    assert model(x, (x + 1e-7).clamp(max=1 + 1e-6)).shape == (2,)
