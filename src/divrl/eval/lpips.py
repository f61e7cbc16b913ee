"""LPIPS (learned perceptual image patch similarity) in plain torch, with no torchvision.

LPIPS (Zhang et al., 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") measures how
different two images look. Both images go through a frozen ImageNet classifier (AlexNet here, or optionally VGG16);
at five ReLU layers the feature vector of every pixel is scaled to unit length, the two images' vectors are
subtracted and squared, a learned non-negative weight per channel (a 1x1 convolution, the "linear calibration")
sums the channels, and the result is averaged over the pixels. The five layer scores are added. 0 means identical;
typical values for unrelated photographs are 0.5 to 0.8. The mean LPIPS over all pairs of a set of samples
(:meth:`LPIPS.pairwise`) is the usual "LPIPS diversity" of a generator: higher means more varied samples.

Weights, two files:

* The backbone: torchvision's ImageNet checkpoint, ``alexnet-owt-7be5be79.pth`` (or ``vgg16-397923af.pth``), a
  plain state dict with keys ``features.N.weight`` / ``features.N.bias`` (and ``classifier.*``, which is ignored).
  By default it is read through :func:`torch.hub.load_state_dict_from_url`, i.e. from
  ``$TORCH_HOME/hub/checkpoints/<file>`` when cached there (``$TORCH_HOME`` defaults to ``~/.cache/torch``) and
  downloaded from ``download.pytorch.org`` otherwise; ``local_files_only=True`` never downloads. A local path can
  be given instead (``backbone_weights=``).
* The calibration: the LPIPS v0.1 linear weights that torchmetrics ships inside its wheel,
  ``<torchmetrics>/functional/image/lpips_models/{alex,vgg}.pth``: five tensors ``lin{k}.model.1.weight`` of shape
  ``(1, C_k, 1, 1)`` (``model.1`` because the original layer is ``Sequential(Dropout, Conv2d)``), C = 64, 192,
  384, 256, 256 for AlexNet and 64, 128, 256, 512, 512 for VGG16. ``lin_weights=`` overrides the path.

Why a reimplementation: torchmetrics' and the ``lpips`` package's LPIPS build their backbone with torchvision, and
torchvision cannot be a dependency here: its wheels are pinned to one exact torch build, and beside the CPU (or
otherwise pinned) torch this project installs, PyPI's torchvision fails to import. The network is small, so it is
rebuilt here from ``nn.Conv2d`` / ``nn.ReLU`` / ``nn.MaxPool2d`` with exactly torchvision's module indices inside
``features``, so that torchvision's checkpoint loads unchanged, and the arithmetic follows the reference LPIPS code
(input scaling layer, unit normalisation ``x / (sqrt(sum x^2) + 1e-10)``, spatial mean). Inputs here are images in
``[0, 1]`` (the reference code takes ``[-1, 1]``; the conversion is done internally).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from divrl.utils import Frozen

__all__ = ["BACKBONES", "LPIPS", "default_lin_weights_path", "hub_cache_path"]

BACKBONES: dict[str, dict] = {
    "alex": {
        "url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        # (index in torchvision's ``features``, in_channels, out_channels, kernel, stride, padding)
        "convs": [
            (0, 3, 64, 11, 4, 2),
            (3, 64, 192, 5, 1, 2),
            (6, 192, 384, 3, 1, 1),
            (8, 384, 256, 3, 1, 1),
            (10, 256, 256, 3, 1, 1),
        ],
        "pools": [2, 5, 12],
        "pool": (3, 2),  # MaxPool2d(kernel_size, stride)
        "length": 13,
        "taps": (1, 4, 7, 9, 11),  # relu1 .. relu5
        "channels": (64, 192, 384, 256, 256),
        "min_size": 31,  # the smallest H, W for which relu5 has at least one pixel
    },
    "vgg": {
        "url": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "convs": [
            (i, cin, cout, 3, 1, 1)
            for i, cin, cout in [
                (0, 3, 64),
                (2, 64, 64),
                (5, 64, 128),
                (7, 128, 128),
                (10, 128, 256),
                (12, 256, 256),
                (14, 256, 256),
                (17, 256, 512),
                (19, 512, 512),
                (21, 512, 512),
                (24, 512, 512),
                (26, 512, 512),
                (28, 512, 512),
            ]
        ],
        "pools": [4, 9, 16, 23, 30],
        "pool": (2, 2),
        "length": 31,
        "taps": (3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        "channels": (64, 128, 256, 512, 512),
        "min_size": 16,
    },
}
"""The supported backbones: torchvision's ``features`` layout (conv indices and shapes, max-pool indices), the
checkpoint URL, the tapped ReLU indices and their channel counts."""

_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}
_EPS = 1e-10  # the reference LPIPS normalisation: x / (||x|| + eps)
_RANGE_TOL = 1e-5  # images may overshoot [0, 1] by float rounding this much; they are clamped


def hub_cache_path(url: str) -> Path:
    """Where :func:`torch.hub.load_state_dict_from_url` caches ``url``: ``<torch.hub.get_dir()>/checkpoints/<file>``
    (``$TORCH_HOME/hub/checkpoints/...``; ``$TORCH_HOME`` defaults to ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def default_lin_weights_path(net: str = "alex") -> Path:
    """The LPIPS calibration weights torchmetrics ships: ``<torchmetrics>/functional/image/lpips_models/<net>.pth``."""
    net = _canonical_net(net)
    # find_spec locates the installed package without importing it (importing torchmetrics takes about a second)
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "LPIPS needs the calibration weights shipped with torchmetrics (functional/image/lpips_models/"
            f"{net}.pth); install torchmetrics or pass lin_weights=<path to {net}.pth>"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    return package_dir / "functional" / "image" / "lpips_models" / f"{net}.pth"


def _canonical_net(net: str) -> str:
    key = str(net).lower()
    if key not in _NET_ALIASES:
        raise ValueError(f"LPIPS: net must be 'alex' or 'vgg' (got {net!r})")
    return _NET_ALIASES[key]


def _build_features(spec: dict) -> nn.Sequential:
    """torchvision's ``features`` stack for ``spec``: a ReLU after every conv, max-pools at ``spec['pools']``."""
    layers: list[nn.Module | None] = [None] * spec["length"]
    for index, cin, cout, kernel, stride, padding in spec["convs"]:
        layers[index] = nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding)
        layers[index + 1] = nn.ReLU(inplace=False)
    for index in spec["pools"]:
        layers[index] = nn.MaxPool2d(kernel_size=spec["pool"][0], stride=spec["pool"][1])
    assert all(layer is not None for layer in layers), "backbone layout has gaps"
    return nn.Sequential(*layers)


def _torch_load(path: Path, what: str, fix: str) -> Mapping[str, Tensor]:
    """``torch.load`` a tensor-only checkpoint on CPU, with an error that names ``path`` and ``fix``."""
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS: {what} file not found: {path}. {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"LPIPS: could not read the {what} file {path} ({type(err).__name__}: {err}). {fix}"
        ) from err
    return _as_state_dict(state, path, what, fix)


def _as_state_dict(state: object, source: object, what: str, fix: str) -> Mapping[str, Tensor]:
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(f"LPIPS: the {what} file {source} is not a state dict of tensors. {fix}")
    return state


class LPIPS(Frozen, nn.Module):
    """LPIPS distance between images in ``[0, 1]``, AlexNet (default) or VGG16 backbone; frozen, always in eval mode.

    Args:
        net: ``"alex"`` (the standard LPIPS metric) or ``"vgg"`` (VGG16).
        backbone_weights: local path to torchvision's ImageNet checkpoint (``alexnet-owt-7be5be79.pth`` /
            ``vgg16-397923af.pth``). ``None``: the torchvision URL through :func:`torch.hub.load_state_dict_from_url`,
            which reads ``$TORCH_HOME/hub/checkpoints/<file>`` when present and downloads otherwise.
        lin_weights: path to the LPIPS calibration weights (keys ``lin{k}.model.1.weight``). ``None``: the file
            torchmetrics ships (:func:`default_lin_weights_path`).
        local_files_only: with ``backbone_weights=None``, never download: a missing cached file is a
            :class:`FileNotFoundError` naming the expected path.

    ``forward(img0, img1)`` returns the ``(B,)`` distances; :meth:`pairwise` the mean distance over all pairs of a
    set. Parameters do not require grad; gradients still flow to inputs that require grad (LPIPS as a loss).
    """

    shift: Tensor
    scale: Tensor

    def __init__(
        self,
        net: str = "alex",
        backbone_weights: str | os.PathLike | None = None,
        lin_weights: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        self.net = _canonical_net(net)
        spec = BACKBONES[self.net]
        self.taps: tuple[int, ...] = spec["taps"]
        self.channels: tuple[int, ...] = spec["channels"]
        self.min_size: int = spec["min_size"]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _build_features(spec)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels)

        self._load_backbone(spec["url"], backbone_weights, local_files_only)
        self._load_lins(lin_weights)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ loading

    def _load_backbone(self, url: str, path: str | os.PathLike | None, local_files_only: bool) -> None:
        """Load torchvision's ``features.*`` tensors (``classifier.*`` and other keys are ignored)."""
        filename = os.path.basename(url)
        if path is not None:
            source: object = Path(path)
            fix = (
                f"Pass backbone_weights= the path of torchvision's {filename} (a state dict with "
                "'features.N.weight' keys), or None to use the torch hub cache."
            )
            state = _torch_load(Path(path), "backbone checkpoint", fix)
        else:
            cached = hub_cache_path(url)
            source = cached
            fix = (
                f"Download {url} and place it at {cached} (set $TORCH_HOME to choose the cache root), "
                "or pass backbone_weights=<local path>."
            )
            if local_files_only and not cached.is_file():
                raise FileNotFoundError(
                    f"LPIPS: the {self.net} backbone checkpoint is not cached at {cached} and local_files_only=True "
                    f"forbids downloading. {fix}"
                )
            try:
                state = torch.hub.load_state_dict_from_url(
                    url, map_location="cpu", check_hash=False, progress=False, weights_only=True
                )
            except Exception as err:
                raise RuntimeError(
                    f"LPIPS: could not load the {self.net} backbone checkpoint {filename} "
                    f"(cache path {cached}; {type(err).__name__}: {err}). {fix}"
                ) from err
            state = _as_state_dict(state, cached, "backbone checkpoint", fix)

        prefix = "features."
        wanted = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        expected = self.features.state_dict()
        missing = sorted(set(expected) - set(wanted), key=_key_order)
        unexpected = sorted(set(wanted) - set(expected), key=_key_order)
        bad_shapes = [
            f"features.{k}: file {tuple(wanted[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in wanted and wanted[k].shape != v.shape
        ]
        if missing or unexpected or bad_shapes:
            problems = []
            if missing:
                problems.append("missing " + ", ".join(prefix + k for k in missing))
            if unexpected:
                problems.append("unexpected " + ", ".join(prefix + k for k in unexpected))
            if bad_shapes:
                problems.append("wrong shapes " + "; ".join(bad_shapes))
            raise RuntimeError(
                f"LPIPS: {source} is not a torchvision {self.net} checkpoint ({'; '.join(problems)}). {fix}"
            )
        self.features.load_state_dict({k: v.float() for k, v in wanted.items()}, strict=True)

    def _load_lins(self, path: str | os.PathLike | None) -> None:
        """Load the five calibration tensors ``lin{k}.model.1.weight`` ``(1, C_k, 1, 1)``, strictly."""
        lin_path = Path(path) if path is not None else default_lin_weights_path(self.net)
        fix = (
            f"Pass lin_weights= the LPIPS v0.1 calibration file for net={self.net!r} "
            f"(torchmetrics ships it as functional/image/lpips_models/{self.net}.pth)."
        )
        state = _torch_load(lin_path, "LPIPS calibration", fix)
        keys = [f"lin{k}.model.1.weight" for k in range(len(self.channels))]
        missing = [k for k in keys if k not in state]
        unexpected = sorted(set(state) - set(keys))
        bad_shapes = [
            f"{k}: {tuple(state[k].shape)} instead of {(1, c, 1, 1)}"
            for k, c in zip(keys, self.channels, strict=True)
            if k in state and tuple(state[k].shape) != (1, c, 1, 1)
        ]
        if missing or unexpected or bad_shapes:
            problems = []
            if missing:
                problems.append(f"missing {missing}")
            if unexpected:
                problems.append(f"unexpected {unexpected}")
            if bad_shapes:
                problems.append("wrong shapes " + "; ".join(bad_shapes))
            raise RuntimeError(
                f"LPIPS: {lin_path} is not an LPIPS calibration file for net={self.net!r} "
                f"({'; '.join(problems)}). {fix}"
            )
        with torch.no_grad():
            for lin, key in zip(self.lins, keys, strict=True):
                lin.weight.copy_(state[key].float())

    # ------------------------------------------------------------------ mode

    # ------------------------------------------------------------------ computation

    def _check_images(self, images: Tensor, name: str) -> Tensor:
        """Validate a float ``(B, 3, H, W)`` tensor in ``[0, 1]``; return it clamped, in the parameters' dtype."""
        if not isinstance(images, Tensor):
            raise TypeError(
                f"LPIPS: {name} must be a torch.Tensor of shape (B, 3, H, W) in [0, 1] (got {type(images).__name__})"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LPIPS: {name} must have shape (B, 3, H, W) (got {tuple(images.shape)})")
        if not images.is_floating_point():
            raise ValueError(
                f"LPIPS: {name} must be a float tensor in [0, 1] (got dtype {images.dtype}; divide uint8 images by 255)"
            )
        if images.shape[0] == 0:
            raise ValueError(f"LPIPS: {name} is an empty batch")
        height, width = images.shape[-2:]
        if min(height, width) < self.min_size:
            raise ValueError(
                f"LPIPS: {name} is {height}x{width}; net={self.net!r} needs images of at least "
                f"{self.min_size}x{self.min_size}"
            )
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if not (lo >= -_RANGE_TOL and hi <= 1 + _RANGE_TOL):  # also rejects NaN
            raise ValueError(
                f"LPIPS: {name} must be in [0, 1] (got values in [{lo:.4g}, {hi:.4g}]); "
                "convert [-1, 1] images with (x + 1) / 2"
            )
        dtype = self.shift.dtype
        return images.to(dtype).clamp(0.0, 1.0)

    def features_of(self, images: Tensor) -> list[Tensor]:
        """The unit-normalised tapped features of ``images`` (``[0, 1]``, validated): one ``(B, C_k, h_k, w_k)``
        tensor per layer, each pixel's channel vector divided by its norm (+1e-10)."""
        x = self._check_images(images, "images")
        return self._normalised_features(x)

    def _normalised_features(self, x: Tensor) -> list[Tensor]:
        x = ((x * 2 - 1) - self.shift) / self.scale
        outs: list[Tensor] = []
        last = self.taps[-1]
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outs.append(x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + _EPS))
            if index == last:
                break
        return outs

    def _distance(self, feats0: Sequence[Tensor], feats1: Sequence[Tensor]) -> Tensor:
        """Sum over layers of the spatial mean of the calibrated squared feature difference; ``(B,)``."""
        total = None
        for f0, f1, lin in zip(feats0, feats1, self.lins, strict=True):
            layer = lin((f0 - f1) ** 2).mean(dim=(1, 2, 3))
            total = layer if total is None else total + layer
        return total

    def forward(self, img0: Tensor, img1: Tensor) -> Tensor:
        """LPIPS distance between ``img0`` and ``img1``, float ``(B, 3, H, W)`` images in ``[0, 1]``; returns ``(B,)``.

        ``img1`` may have batch size 1, in which case it is compared with every image of ``img0``.
        """
        x0 = self._check_images(img0, "img0")
        x1 = self._check_images(img1, "img1")
        if x1.shape != x0.shape and not (x1.shape[0] == 1 and x1.shape[1:] == x0.shape[1:]):
            raise ValueError(
                f"LPIPS: img1 must have img0's shape {tuple(x0.shape)} or batch size 1 (got {tuple(x1.shape)})"
            )
        if x1.shape[0] == x0.shape[0]:
            feats = self._normalised_features(torch.cat([x0, x1]))
            n = x0.shape[0]
            return self._distance([f[:n] for f in feats], [f[n:] for f in feats])
        return self._distance(self._normalised_features(x0), self._normalised_features(x1))

    def pairwise_distances(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """LPIPS between every unordered pair ``i < j`` of ``images`` (``(B, 3, H, W)`` in ``[0, 1]``, B >= 2), in the
        order (0, 1), (0, 2), ..., (B-2, B-1): a ``(B (B - 1) / 2,)`` tensor. Backbone features are computed once
        per image (``batch_size`` images at a time), not once per pair."""
        if isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] < 2:
            raise ValueError(f"LPIPS.pairwise: needs at least 2 images to form a pair (got {images.shape[0]})")
        x = self._check_images(images, "images")
        if batch_size < 1:
            raise ValueError(f"LPIPS.pairwise: batch_size must be >= 1 (got {batch_size})")
        chunks = [self._normalised_features(c) for c in x.split(batch_size)]
        feats = [torch.cat(layer) for layer in zip(*chunks, strict=True)]
        out = []
        for i in range(x.shape[0] - 1):
            out.append(self._distance([f[i : i + 1] for f in feats], [f[i + 1 :] for f in feats]))
        return torch.cat(out)

    def pairwise(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Mean LPIPS over all unordered pairs ``i < j`` of ``images`` (``(B, 3, H, W)`` in ``[0, 1]``, B >= 2): the
        "LPIPS between samples" diversity metric, a 0-d tensor. See :meth:`pairwise_distances`."""
        return self.pairwise_distances(images, batch_size=batch_size).mean()

    def extra_repr(self) -> str:
        return f"net={self.net!r}, taps={self.taps}"


def _key_order(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (int(head) if head.isdigit() else 10**9, key)
