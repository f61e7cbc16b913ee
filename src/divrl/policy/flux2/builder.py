"""Loading FLUX.2 [klein]'s pipeline from the Hub or a local folder, with errors that say what to do
(:func:`load_pipeline`, behind :meth:`Flux2KleinPolicy.from_pretrained <divrl.policy.flux2.Flux2KleinPolicy>`)."""

from __future__ import annotations

import os

import torch

from divrl.policy.loading import load_family_pipeline

__all__ = ["load_pipeline", "KLEIN_MODELS"]

KLEIN_MODELS = {
    "black-forest-labs/FLUX.2-klein-base-4B": "base (undistilled, CFG), 4B, Apache-2.0: the one to train",
    "black-forest-labs/FLUX.2-klein-4B": "step-distilled (4 steps, no CFG), 4B, Apache-2.0",
    "black-forest-labs/FLUX.2-klein-base-9B": "base (undistilled, CFG), 9B, FLUX non-commercial licence (gated)",
    "black-forest-labs/FLUX.2-klein-9B": "step-distilled (4 steps, no CFG), 9B, FLUX non-commercial licence (gated)",
}
"""The released klein checkpoints on the Hub."""


def load_pipeline(
    model: str | os.PathLike = "black-forest-labs/FLUX.2-klein-base-4B",
    *,
    torch_dtype: str | torch.dtype | None = "auto",
    local_files_only: bool = False,
    revision: str | None = None,
    text_encoders: bool = True,
):
    """A ``Flux2KleinPipeline`` from a Hub id (:data:`KLEIN_MODELS`) or a local folder in diffusers' format.

    Args:
        model: Hub id or a folder written by ``Flux2KleinPipeline.save_pretrained``.
        torch_dtype: ``"auto"`` = bfloat16 with CUDA, float32 on CPU; ``None`` = as stored; or a dtype name.
        local_files_only: never contact the Hub.
        revision: Hub revision (branch, tag or commit).
        text_encoders: load the Qwen3 text encoder (and tokenizer); ``False`` when every condition is precomputed.

    Raises:
        ModelLoadError: the model is missing, another family's folder, gated, or not reachable; the message says what
            to do.
    """
    from diffusers import Flux2KleinPipeline

    skip = {} if text_encoders else dict(text_encoder=None, tokenizer=None)
    return load_family_pipeline(
        Flux2KleinPipeline,
        model,
        who="Flux2KleinPolicy",
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
        revision=revision,
        skip=skip,
    )
