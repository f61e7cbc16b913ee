"""The settings of a Qwen-Image-Edit-Plus run (:class:`QwenEditConfig`, ``model.policy`` in YAML with
``class_path: divrl.policy.qwen_image.QwenEditConfig``) and how they build a
:class:`~divrl.policy.qwen_image.QwenEditPolicy`: from the Hub or a local folder, or the built-in tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from divrl.policy.base import PolicyConfig
from divrl.policy.gating import check_window
from divrl.policy.lora import DEFAULT_LORA_TARGETS
from divrl.policy.qwen_image.policy import QWEN_EDIT_LORA_TARGETS, QwenEditPolicy
from divrl.utils import parse_dtype

__all__ = ["QwenEditConfig", "TINY_QWEN_EDIT"]

TINY_QWEN_EDIT = "tiny"
"""``model: tiny``: the built-in tiny offline model with random weights (:mod:`divrl.policy.qwen_image.tiny`)."""


@dataclass
class QwenEditConfig(PolicyConfig):
    """Qwen-Image-Edit-Plus: which model to train and how (fields of :class:`~divrl.policy.PolicyConfig`, and:).

    Attributes:
        model: a Hub id (``Qwen/Qwen-Image-Edit-2511`` or ``-2509``, Apache-2.0), a local diffusers folder, or
            ``"tiny"`` for the built-in offline tiny model with random weights (tests).
        true_cfg_scale: true classifier-free guidance ``s`` with :attr:`negative_prompt` (velocity ``neg + s·(cond −
            neg)`` rescaled per token to the conditional velocity's norm: two transformer calls per step); the
            pipeline's default is 4.0; any value ``<= 1`` turns CFG off (one call), as in the pipeline.
        negative_prompt: the negative prompt (``" "``, as Qwen's examples).
        condition_image_size: pixel area each reference is resized to for the Qwen2.5-VL encoder (the pipeline's
            384² = 147456); ``null``: the pipeline's, or 32² with ``model: tiny``.
        vae_image_size: pixel area each reference is resized to for the VAE (the pipeline's 1024² = 1048576,
            whatever the output size); ``null``: the pipeline's, or 32² with ``model: tiny``.
        tiny_seed: weight seed of the tiny model (``model: tiny`` only).
        reference_window: identity gating: ``[low, high]``; the reference *latent* tokens join the transformer only
            at noise levels ``low ≤ σ ≤ high``; ``null``: always. Unlike FLUX, the prompt embedding still carries the
            references (the VL encoder read them), so outside the window the composition is not the prompt's alone.
    """

    model: str = "Qwen/Qwen-Image-Edit-2511"
    true_cfg_scale: float = 4.0
    negative_prompt: str = " "
    condition_image_size: int | None = None
    vae_image_size: int | None = None
    tiny_seed: int = 0
    reference_window: tuple[float, float] | None = None

    diffusers_pipeline: ClassVar[str] = "QwenImageEditPlusPipeline"
    family_tag: ClassVar[str] = "qwen-image-edit"
    hub_licenses: ClassVar[dict[str, dict[str, str]]] = {
        "qwen/qwen-image-edit-2509": {"license": "apache-2.0"},
        "qwen/qwen-image-edit-2511": {"license": "apache-2.0"},
    }

    def pipeline_call(self, height: int, width: int, num_steps: int) -> dict[str, object]:
        call: dict[str, object] = {
            "height": height,
            "width": width,
            "num_inference_steps": num_steps,
            "true_cfg_scale": self.true_cfg_scale,
        }
        if self.true_cfg_scale > 1:
            call["negative_prompt"] = self.negative_prompt
        return call

    def pipeline_differences(self, height: int, width: int) -> list[str]:
        out = []
        for name, pipeline_area in (("condition_image_size", 384 * 384), ("vae_image_size", 1024 * 1024)):
            value = getattr(self, name)
            if (value is not None and value != pipeline_area) or (value is None and self.model == "tiny"):
                out.append(f"policy.{name} {value or 32 * 32} (the pipeline resizes references to {pipeline_area})")
        if self.reference_window is not None:
            out.append(
                f"policy.reference_window {list(self.reference_window)} (identity gating) is divrl's own sampler's"
            )
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference_window = check_window(self.reference_window)
        if self.torch_dtype != "auto":
            parse_dtype(self.torch_dtype, "policy.torch_dtype (or 'auto')")
        if isinstance(self.true_cfg_scale, bool) or not math.isfinite(self.true_cfg_scale) or self.true_cfg_scale < 0:
            raise ValueError(
                f"policy.true_cfg_scale must be a finite number >= 0 (the pipeline's 4.0; 1: no CFG), got "
                f"{self.true_cfg_scale}"
            )
        for name in ("condition_image_size", "vae_image_size"):
            area = getattr(self, name)
            if area is not None and (isinstance(area, bool) or not isinstance(area, int) or area < 32 * 32):
                raise ValueError(
                    f"policy.{name} must be a pixel area >= 1024 (32 x 32), e.g. 147456 (384 x 384), got {area!r}"
                )
        if self.lora is not None and tuple(self.lora.target_modules) == tuple(DEFAULT_LORA_TARGETS):
            self.lora = replace(self.lora, target_modules=QWEN_EDIT_LORA_TARGETS)  # saved in the run's settings

    def load(self) -> QwenEditPolicy:
        """Load (or build) the policy."""
        tiny = self.model == TINY_QWEN_EDIT
        sizes = {
            name: value
            for name, value in (
                ("condition_image_size", self.condition_image_size),
                ("vae_image_size", self.vae_image_size),
            )
            if value is not None or tiny
        }
        sizes = {name: value or 32 * 32 for name, value in sizes.items()}
        common = dict(
            lora=self.lora,
            true_cfg_scale=self.true_cfg_scale,
            negative_prompt=self.negative_prompt,
            train_transformer=self.train_transformer,
            lora_compute_dtype=self.compute_dtype,
            reference_window=self.reference_window,
            **sizes,
        )
        if tiny:
            from divrl.policy.qwen_image.tiny import tiny_qwen_edit_components

            dtype = None if self.torch_dtype == "auto" else self.torch_dtype
            return QwenEditPolicy(
                **tiny_qwen_edit_components(self.tiny_seed), base_dtype=dtype, model_id=TINY_QWEN_EDIT, **common
            )
        policy = QwenEditPolicy.from_pretrained(
            self.model,
            torch_dtype=self.torch_dtype,
            local_files_only=self.local_files_only,
            revision=self.revision,
            text_encoders=self.text_encoders,
            **common,
        )
        if self.text_encoders and policy.pipeline().processor is None:
            from divrl.policy.base import ModelLoadError

            raise ModelLoadError(
                f"QwenEditPolicy: the processor of {self.model} (its processor/ folder) could not be "
                f"read; the model needs it to read references with the prompt"
            )
        return policy
