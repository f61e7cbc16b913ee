"""Small helpers shared across divrl."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["parse_dtype", "load_pretrained", "load_image_processor", "mix_seeds"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, who: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``"float16"`` / ``"float32"`` (or a ``torch.dtype``, or ``None``) → dtype.

    Raises:
        ValueError: naming ``who`` and the accepted values, for anything else.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{who}: dtype must be one of 'float32', 'bfloat16', 'float16' or None, got {dtype!r}")
    return _DTYPES[key]


def _looks_like_path(model: str) -> bool:
    """A string that can only mean a filesystem path (a Hub id is ``name`` or ``namespace/name``)."""
    return os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\", "..\\")) or model in (".", "..")


def load_pretrained(
    loader: Callable[..., Any], model: str | os.PathLike, local_files_only: bool, who: str, example: str, **kwargs
) -> Any:
    """``loader(model, local_files_only=..., **kwargs)`` (a transformers ``from_pretrained``) with clear errors.

    ``model`` is a Hub id or a local ``save_pretrained`` folder. A string that can only be a path but does not exist
    raises ``FileNotFoundError`` at once (instead of a Hub lookup of a path); a failed load raises ``OSError`` naming
    the model, why it could not be found (offline? not cached?) and the fix. ``who`` prefixes the messages and
    ``example`` is a Hub id quoted in them.
    """
    name = os.fspath(model)
    if os.path.isdir(os.path.expanduser(name)):
        name = os.path.expanduser(name)
    elif os.path.exists(os.path.expanduser(name)):
        raise NotADirectoryError(
            f"{who}: model {name!r} is a file, not a folder written by save_pretrained; pass the "
            f"folder, or a Hugging Face Hub id such as {example!r}"
        )
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"{who}: model folder {name!r} does not exist; pass an existing folder written by save_pretrained, or a "
            f"Hugging Face Hub id such as {example!r}"
        )
    kwargs["local_files_only"] = local_files_only
    if local_files_only:
        # transformers 5.x (with peft installed) looks for an adapter_config.json on the Hub without forwarding
        # local_files_only, which means network retries on an offline machine; forward it explicitly.
        kwargs.setdefault("adapter_kwargs", {"local_files_only": True})
    try:
        return loader(name, **kwargs)
    except OSError as err:
        offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "it is neither a local folder nor in the local Hugging Face cache (offline: local_files_only or "
            "HF_HUB_OFFLINE)"
            if offline
            else "it is not a local folder and could not be fetched from the Hugging Face Hub (offline?)"
        )
        fix = "" if offline else " and set local_files_only: true (or HF_HUB_OFFLINE=1) on machines without a network"
        raise OSError(
            f"{who}: cannot load model {name!r}: {hint}. Download it once on a machine with a network (`hf download "
            f"{name}`){fix}, or pass the path of a local folder written by save_pretrained. Original error: "
            f"{str(err)[:300]}"
        ) from err


def load_image_processor(model: str | os.PathLike, local_files_only: bool) -> Any | None:
    """The checkpoint's image processor (its ``image_mean``, ``image_std``, ``crop_size``...), or ``None`` when it
    ships none. Loaded with the PIL backend: reading the statistics needs no torchvision."""
    import transformers
    from transformers import AutoImageProcessor

    name = os.fspath(model)
    if os.path.isdir(os.path.expanduser(name)):
        name = os.path.expanduser(name)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["backend"] = "pil"
    try:
        return AutoImageProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError):
        return None


def mix_seeds(*values: int) -> int:
    """A 63-bit seed from several integers (seed, rank, index), stable across runs and Python versions."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v) + 0x9E3779B9) % (2**63 - 1)
    return out


class Frozen:
    """Mixin for judge models (reward backbones, detectors, evaluation models) inside a trained module: they stay in
    eval mode (no dropout) whatever ``train()`` the parent module calls. List it before the ``nn.Module`` base."""

    def train(self, mode: bool = True):
        return super().train(False)
