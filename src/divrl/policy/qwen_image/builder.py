"""Loading Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``: 2509 and 2511) from the Hub or a local folder, with
errors that say what to do (:func:`load_pipeline`, behind :meth:`QwenEditPolicy.from_pretrained
<divrl.policy.qwen_image.QwenEditPolicy>`), and saving a pipeline in the released format (:func:`save_pipeline`).

The processor is read with :class:`~divrl.policy.qwen_image.tiny.ImageTextProcessor` (Qwen2-VL's processor without
its video half, which needs torchvision) from the model's ``processor`` folder and handed to ``from_pretrained``, so
the same code loads the released models and the tiny ones wherever torchvision is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from divrl.policy.loading import load_family_pipeline

__all__ = ["load_pipeline", "save_pipeline", "QWEN_EDIT_MODELS"]

QWEN_EDIT_MODELS = {
    "Qwen/Qwen-Image-Edit-2511": "20B multi-image editor (1-3 references), Apache-2.0: the one to train",
    "Qwen/Qwen-Image-Edit-2509": "20B multi-image editor (1-3 references), Apache-2.0",
}
"""The released Qwen-Image-Edit-Plus checkpoints on the Hub."""


def load_processor(model: str | os.PathLike, *, local_files_only: bool = False, revision: str | None = None):
    """The model's processor (its ``processor`` subfolder) as an :class:`ImageTextProcessor`."""
    from divrl.policy.qwen_image.tiny import ImageTextProcessor

    local = Path(os.fspath(model)).expanduser()
    if local.is_dir():
        return ImageTextProcessor.from_pretrained(local / "processor")
    return ImageTextProcessor.from_pretrained(
        os.fspath(model), subfolder="processor", local_files_only=local_files_only, revision=revision
    )


def load_pipeline(
    model: str | os.PathLike = "Qwen/Qwen-Image-Edit-2511",
    *,
    torch_dtype: str | torch.dtype | None = "auto",
    local_files_only: bool = False,
    revision: str | None = None,
    text_encoders: bool = True,
):
    """A ``QwenImageEditPlusPipeline`` from a Hub id (:data:`QWEN_EDIT_MODELS`) or a local folder in diffusers' format.

    Args:
        model: Hub id or a folder written by :func:`save_pipeline` (``QwenImageEditPlusPipeline.save_pretrained``).
        torch_dtype: ``"auto"`` = bfloat16 with CUDA, float32 on CPU; ``None`` = as stored; or a dtype name.
        local_files_only: never contact the Hub.
        revision: Hub revision (branch, tag or commit).
        text_encoders: load the Qwen2.5-VL encoder, its tokenizer and processor; ``False`` when every condition is
            precomputed.

    Raises:
        ModelLoadError: the model is missing, another family's folder, gated, or not reachable; the message says what
            to do.
    """
    from diffusers import QwenImageEditPlusPipeline

    if text_encoders:
        skip = {"processor": _processor_or_none(model, local_files_only, revision)}
    else:
        skip = dict(text_encoder=None, tokenizer=None, processor=None)
    return load_family_pipeline(
        QwenImageEditPlusPipeline,
        model,
        who="QwenEditPolicy",
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
        revision=revision,
        skip=skip,
    )


def _processor_or_none(model, local_files_only, revision):
    """The processor, or ``None`` when it cannot be read (the pipeline loader then names what is wrong with the model;
    a model that loads without its processor is refused by the config, naming it)."""
    try:
        return load_processor(model, local_files_only=local_files_only, revision=revision)
    except (OSError, ValueError):
        return None


def save_pipeline(pipe, folder: str | os.PathLike) -> None:
    """``pipe.save_pretrained(folder)`` in the released format: ``model_index.json`` names the processor
    ``transformers.Qwen2VLProcessor`` (as the Hub's models do), not the text-and-image subclass it was built with."""
    pipe.save_pretrained(folder, safe_serialization=True)
    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text())
    config["processor"] = ["transformers", "Qwen2VLProcessor"]
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (
        "processor/processor_config.json",
        "processor/tokenizer_config.json",
        "tokenizer/tokenizer_config.json",
    ):  # AutoProcessor resolves the class named there
        path = Path(folder) / name
        if path.is_file():
            settings = json.loads(path.read_text())
            if settings.get("processor_class") == "ImageTextProcessor":
                settings["processor_class"] = "Qwen2VLProcessor"
                path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
