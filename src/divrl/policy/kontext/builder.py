"""Loading FLUX.1 Kontext's pipeline from the Hub or a local folder with errors that say what to do
(:func:`load_pipeline`, behind :meth:`KontextPolicy.from_pretrained <divrl.policy.KontextPolicy.from_pretrained>`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from divrl.policy.base import ModelLoadError
from divrl.utils import parse_dtype

__all__ = ["load_pipeline"]


def load_pipeline(
    model: str | os.PathLike = "black-forest-labs/FLUX.1-Kontext-dev",
    *,
    torch_dtype: str | torch.dtype | None = "auto",
    local_files_only: bool = False,
    revision: str | None = None,
    text_encoders: bool = True,
):
    """A ``FluxKontextPipeline`` from a Hub id or a local folder in diffusers' format, with errors that say what to do.

    Args:
        model: Hub id (``black-forest-labs/FLUX.1-Kontext-dev``, gated: accept its licence on the Hub and log in) or a
            folder written by ``FluxKontextPipeline.save_pretrained``.
        torch_dtype: dtype of the frozen weights: ``"auto"`` = bfloat16 when CUDA is available, else float32 (CPU
            kernels for bf16 are slow); ``None`` = as stored; or an explicit dtype name.
        local_files_only: never contact the Hub (offline machines with a populated cache).
        revision: Hub revision (branch, tag or commit).
        text_encoders: load the CLIP and T5 encoders; ``False`` skips them (9.8 GB in bf16 for FLUX.1 Kontext: T5-XXL
            9.52 GB + CLIP-L 0.25 GB, benchmarks/precompute.py) when every condition comes precomputed.

    Raises:
        ModelLoadError: the model is missing, gated, or not reachable; the message says what to do.
    """
    from diffusers import FluxKontextPipeline

    name = os.fspath(model)
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(
                f"KontextPolicy: {name!r} has no model_index.json; it is not a diffusers pipeline folder. Save one "
                f"with FluxKontextPipeline.save_pretrained(folder), or pass a Hub id"
            )
    elif local.exists():
        raise ModelLoadError(f"KontextPolicy: model {name!r} is a file, not a diffusers pipeline folder; pass the folder "
                             f"holding model_index.json (FluxKontextPipeline.save_pretrained), or a Hub id")
    elif name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a Hub id has exactly one "/"
        raise ModelLoadError(
            f"KontextPolicy: model folder {name!r} does not exist (relative paths start at {os.getcwd()!r}; run "
            f"from the repository root for the shipped configs); pass an existing folder or a Hub id"
        )
    if torch_dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        dtype = parse_dtype(torch_dtype, "KontextPolicy")
        skip = {} if text_encoders else dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
        pipe = FluxKontextPipeline.from_pretrained(
            name, dtype=dtype, local_files_only=local_files_only, revision=revision, **skip
        )
    except Exception as err:  # noqa: BLE001 - re-raised with instructions, original chained
        if isinstance(err, (OSError, ValueError)) or type(err).__name__.endswith(("RepoError", "HTTPError")):
            raise ModelLoadError(_load_hint(name, err)) from err
        raise
    return pipe


def _load_hint(name: str, err: Exception) -> str:
    text = str(err)
    gated = "gated" in text.lower() or "401" in text or "403" in text or type(err).__name__ == "GatedRepoError"
    if gated:
        what = (
            f"{name!r} is gated: accept its licence on the model's Hub page, then log in with `hf auth login` (or set "
            f"HF_TOKEN)"
        )
    else:
        what = (
            f"{name!r} is neither a local diffusers folder nor reachable on the Hugging Face Hub (offline, or a wrong "
            f"id). Download it once (`hf download {name}`) and set model.policy.local_files_only: true (or "
            f"HF_HUB_OFFLINE=1), or pass the path of a folder written by FluxKontextPipeline.save_pretrained"
        )
    return f"KontextPolicy: cannot load the model: {what}. Original error: {type(err).__name__}: {text[:300]}"
