"""Loading FLUX.1 Kontext's pipeline from the Hub or a local folder with errors that say what to do
(:func:`load_pipeline`, behind :meth:`KontextPolicy.from_pretrained <divrl.policy.KontextPolicy.from_pretrained>`)."""

from __future__ import annotations

import os

import torch

from divrl.policy.loading import load_family_pipeline, load_hint

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

    skip = {} if text_encoders else dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    return load_family_pipeline(
        FluxKontextPipeline,
        model,
        who="KontextPolicy",
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
        revision=revision,
        skip=skip,
    )


def _load_hint(name: str, err: Exception) -> str:
    return load_hint(name, err, "KontextPolicy", "FluxKontextPipeline")
