"""The settings of a FLUX.1 Kontext run (:class:`KontextConfig`, ``model.policy`` in YAML) and how they build a
:class:`~divrl.policy.KontextPolicy`: from the Hub or a local folder, or the built-in tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from divrl.policy.base import PolicyConfig
from divrl.policy.gating import check_window
from divrl.policy.kontext.policy import KontextPolicy
from divrl.utils import parse_dtype

__all__ = ["KontextConfig", "TINY"]

TINY = "tiny"
"""``model: tiny``: the built-in tiny offline model with random weights (:mod:`divrl.policy.tiny`)."""


@dataclass
class KontextConfig(PolicyConfig):
    """FLUX.1 Kontext (the default family): which model to train and how (fields of :class:`PolicyConfig`, and:).

    Attributes:
        model: a Hub id (``black-forest-labs/FLUX.1-Kontext-dev``, gated: accept the licence and log in), a local
            diffusers folder, or ``"tiny"`` for the built-in offline tiny model with random weights (tests).
        max_sequence_length: T5 tokens per prompt (paper: 128).
        guidance: FLUX's distilled guidance scale (paper: 2.5; a conditioning input of the guidance-distilled model,
            not classifier-free guidance).
        tiny_seed: weight seed of the tiny model (``model: tiny`` only).
        reference_positions: where a condition's several references sit in FLUX's position space: ``frame``
            (reference *i* gets position ids ``(i, h, w)``, rows and columns restarting at 0: the Kontext paper's
            multi-image scheme, PSR's) or ``stitch`` (side by side in frame 1: diffusers' community multi-image
            pipeline). One reference gets FLUX.1 Kontext's own ids either way.
        reference_window: identity gating, IdGlow's *temporal gating*: ``[low, high]``, the reference tokens join the
            transformer only at noise levels ``low ≤ σ ≤ high`` (IdGlow: ``[0.3, 0.6]``, its "critical semantic
            window", ``docs/reference.md``); outside it the network sees the prompt alone, so composition (high σ) and
            fine detail (low σ) are free of the reference. Training and sampling both honour it. ``null``: always.
    """

    model: str = "black-forest-labs/FLUX.1-Kontext-dev"
    max_sequence_length: int = 128
    guidance: float = 2.5
    tiny_seed: int = 0
    reference_positions: Literal["frame", "stitch"] = "frame"
    reference_window: tuple[float, float] | None = None

    diffusers_pipeline: ClassVar[str] = "FluxKontextPipeline"
    family_tag: ClassVar[str] = "flux.1-kontext"
    pipeline_max_references: ClassVar[int | None] = 1
    hub_licenses: ClassVar[dict[str, dict[str, str]]] = {
        "black-forest-labs/flux.1-kontext-dev": {
            "license": "other",
            "license_name": "flux-1-dev-non-commercial-license",
            "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/blob/main/LICENSE.md",
        }
    }

    def pipeline_call(self, height: int, width: int, num_steps: int) -> dict[str, object]:
        # The reference enters at the sample's own area, as in training (no snap to Kontext's preferred sizes).
        return {
            "height": height,
            "width": width,
            "num_inference_steps": num_steps,
            "guidance_scale": self.guidance,
            "max_sequence_length": self.max_sequence_length,
            "max_area": height * width,
            "_auto_resize": False,
        }

    def pipeline_reference(self, height: int, width: int) -> str | None:
        # divrl resizes the reference to the sample's size as a tensor; the pipeline would keep a PIL image's own size.
        # Contiguous, as divrl's resized references are: numpy_to_pt gives a channels-last tensor, which the resize
        # keeps and the VAE's convolutions round differently (a pixel off by one level in tests/test_export.py)
        return (
            "processor = pipe.image_processor  # the reference at the sample's size, resized as divrl does\n"
            "pixels = processor.numpy_to_pt(processor.pil_to_numpy(reference)).contiguous()\n"
            f"reference = processor.resize(pixels, {height}, {width})\n"
        )

    def pipeline_differences(self, height: int, width: int) -> list[str]:
        if self.reference_window is None:
            return []
        return [f"policy.reference_window {list(self.reference_window)} (identity gating) is divrl's own sampler's"]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference_window = check_window(self.reference_window)
        if self.torch_dtype != "auto":  # a typo is named here, not as a failed model load
            parse_dtype(self.torch_dtype, "policy.torch_dtype (or 'auto')")
        if isinstance(self.max_sequence_length, bool) or not self.max_sequence_length >= 1:
            raise ValueError(
                f"policy.max_sequence_length must be >= 1 (T5 tokens per prompt; paper: 128), got "
                f"{self.max_sequence_length}"
            )
        if not math.isfinite(self.guidance):
            raise ValueError(f"policy.guidance must be a finite number (paper: 2.5), got {self.guidance}")

    def load(self) -> KontextPolicy:
        """Load (or build) the policy."""
        common = dict(
            lora=self.lora,
            max_sequence_length=self.max_sequence_length,
            guidance=self.guidance,
            train_transformer=self.train_transformer,
            lora_compute_dtype=self.compute_dtype,
            reference_positions=self.reference_positions,
            reference_window=self.reference_window,
        )
        if self.model == TINY:
            from divrl.policy.tiny import tiny_kontext_components

            dtype = None if self.torch_dtype == "auto" else self.torch_dtype
            return KontextPolicy(**tiny_kontext_components(self.tiny_seed), base_dtype=dtype, model_id=TINY, **common)
        return KontextPolicy.from_pretrained(
            self.model,
            torch_dtype=self.torch_dtype,
            local_files_only=self.local_files_only,
            revision=self.revision,
            text_encoders=self.text_encoders,
            **common,
        )
