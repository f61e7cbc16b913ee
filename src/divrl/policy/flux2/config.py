"""The settings of a FLUX.2 [klein] run (:class:`Flux2KleinConfig`, ``model.policy`` in YAML with
``class_path: divrl.policy.flux2.Flux2KleinConfig``) and how they build a :class:`~divrl.policy.flux2.Flux2KleinPolicy`:
from the Hub or a local folder, or the built-in tiny klein."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from divrl.policy.base import PolicyConfig
from divrl.policy.flux2.policy import KLEIN_LORA_TARGETS, Flux2KleinPolicy
from divrl.policy.gating import check_window
from divrl.policy.lora import DEFAULT_LORA_TARGETS
from divrl.utils import parse_dtype

__all__ = ["Flux2KleinConfig", "TINY_KLEIN", "KLEIN_TEXT_LAYERS"]

TINY_KLEIN = "tiny"
"""``model: tiny``: the built-in tiny offline klein with random weights (:mod:`divrl.policy.flux2.tiny`)."""

KLEIN_TEXT_LAYERS = (9, 18, 27)
"""The Qwen3 hidden layers klein stacks into a prompt embedding (the pipeline's ``text_encoder_out_layers``)."""


PIPELINE_MIN_SIDE = 64
"""``Flux2KleinPipeline`` refuses reference images with a side under this (``Flux2ImageProcessor.check_image_input``)."""
PIPELINE_MAX_AREA = 1024 * 1024
"""... and shrinks those above this many pixels to it."""


@dataclass
class Flux2KleinConfig(PolicyConfig):
    """FLUX.2 [klein]: which model to train and how (fields of :class:`~divrl.policy.PolicyConfig`, and:).

    Attributes:
        model: a Hub id (``black-forest-labs/FLUX.2-klein-base-4B``, the undistilled 4B, Apache-2.0; the 9B ones are
            gated), a local diffusers folder (``Flux2KleinPipeline.save_pretrained``), or ``"tiny"`` for the built-in
            offline tiny klein with random weights (tests).
        guidance_scale: classifier-free guidance ``s`` of the base models, with the empty negative prompt as the
            pipeline does (velocity ``neg + s·(cond − neg)``: two transformer calls per step); the pipeline's default
            is 4.0. ``1`` turns CFG off (one call). A step-distilled model refuses ``s > 1``.
        cfg_batched: run the conditional and the unconditional halves of CFG as one batched transformer call
            (``2B`` rows) instead of two calls (``benchmarks/rollout.py --family klein`` measures both).
        max_sequence_length: text tokens per prompt (the pipeline's default: 512).
        text_encoder_out_layers: the text encoder's hidden layers stacked into each token's embedding (klein: 9,
            18, 27); ``null``: klein's, or the tiny model's ``(1, 2, 3)`` with ``model: tiny``.
        tiny_seed: weight seed of the tiny model (``model: tiny`` only).
        reference_window: identity gating (IdGlow's temporal gating): ``[low, high]``; the reference tokens join the
            transformer only at noise levels ``low ≤ σ ≤ high``; ``null``: always.
    """

    model: str = "black-forest-labs/FLUX.2-klein-base-4B"
    guidance_scale: float = 4.0
    cfg_batched: bool = False
    max_sequence_length: int = 512
    text_encoder_out_layers: tuple[int, ...] | None = None
    tiny_seed: int = 0
    reference_window: tuple[float, float] | None = None

    diffusers_pipeline: ClassVar[str] = "Flux2KleinPipeline"
    family_tag: ClassVar[str] = "flux.2-klein"
    pipeline_match: ClassVar[str] = (
        ", to rounding (one grey level in a few pixels on the float32 CPU demo): the pipeline turns PIL references "
        "into tensors of another memory layout, which the VAE's convolutions round differently"
    )
    hub_licenses: ClassVar[dict[str, dict[str, str]]] = {
        "black-forest-labs/flux.2-klein-4b": {"license": "apache-2.0"},
        "black-forest-labs/flux.2-klein-base-4b": {"license": "apache-2.0"},
    }

    def pipeline_call(self, height: int, width: int, num_steps: int) -> dict[str, object]:
        call: dict[str, object] = {
            "height": height,
            "width": width,
            "num_inference_steps": num_steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }
        if self.text_encoder_out_layers is not None:
            call["text_encoder_out_layers"] = tuple(self.text_encoder_out_layers)
        return call

    def pipeline_reference(self, height: int, width: int) -> str | None:
        # divrl resizes the reference to the sample's size as a tensor (nearest, as the image processor's resize of a
        # tensor does); the pipeline takes PIL images only and keeps their own size. A PIL image of the resized pixels
        # (a uint8 round trip: exact) is what divrl's sampler sees. Under the pipeline's 64-pixel minimum it would
        # be refused: the card then says the sample is not reproduced (pipeline_differences)
        if min(height, width) < PIPELINE_MIN_SIDE:
            return None
        return (
            "processor = pipe.image_processor  # the reference at the sample's size, resized as divrl does\n"
            "pixels = processor.numpy_to_pt(processor.pil_to_numpy(reference)).contiguous()\n"
            f"reference = processor.numpy_to_pil(processor.pt_to_numpy(processor.resize(pixels, {height}, {width})))[0]\n"
        )

    def pipeline_differences(self, height: int, width: int) -> list[str]:
        out = []
        if min(height, width) < PIPELINE_MIN_SIDE:
            out.append(
                f"the sample size {height} × {width} (divrl reads the reference at the sample's size; the pipeline "
                f"refuses references under {PIPELINE_MIN_SIDE} pixels a side, so the snippet passes the photo as it "
                f"is, at its own size, which must be at least {PIPELINE_MIN_SIDE} pixels a side)"
            )
        elif height * width > PIPELINE_MAX_AREA:
            out.append(
                f"the sample size {height} × {width} (divrl reads the reference at the sample's size; the pipeline "
                f"shrinks references above {PIPELINE_MAX_AREA} pixels)"
            )
        if self.reference_window is not None:
            out.append(
                f"policy.reference_window {list(self.reference_window)} (identity gating) is divrl's own sampler's"
            )
        return out

    PRECOMPUTE_SETTINGS: ClassVar[dict] = {"guidance_scale": 1.0}
    """``divrl data --precompute`` loads the model without guidance: the payload always holds the empty negative
    prompt, and a step-distilled model refuses any (:func:`divrl.policy.loading.precompute_config`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference_window = check_window(self.reference_window)
        if self.torch_dtype != "auto":
            parse_dtype(self.torch_dtype, "policy.torch_dtype (or 'auto')")
        if isinstance(self.max_sequence_length, bool) or not self.max_sequence_length >= 1:
            raise ValueError(
                f"policy.max_sequence_length must be >= 1 (text tokens per prompt; klein: 512), got "
                f"{self.max_sequence_length}"
            )
        if isinstance(self.guidance_scale, bool) or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(
                f"policy.guidance_scale must be a finite number >= 0 (klein base: 4.0; 1: no CFG), got "
                f"{self.guidance_scale}"
            )
        if self.lora is not None and tuple(self.lora.target_modules) == tuple(DEFAULT_LORA_TARGETS):
            self.lora = replace(self.lora, target_modules=KLEIN_LORA_TARGETS)  # saved in the run's settings as trained
        layers = self.text_encoder_out_layers
        if layers is not None and (
            not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            raise ValueError(
                f"policy.text_encoder_out_layers must be a non-empty list of layer indices >= 0 (klein: "
                f"[9, 18, 27]), got {layers}"
            )

    def load(self) -> Flux2KleinPolicy:
        """Load (or build) the policy."""
        from divrl.policy.flux2.tiny import TINY_TEXT_LAYERS

        layers = self.text_encoder_out_layers or (TINY_TEXT_LAYERS if self.model == TINY_KLEIN else KLEIN_TEXT_LAYERS)
        common = dict(
            lora=self.lora,
            guidance_scale=self.guidance_scale,
            cfg_batched=self.cfg_batched,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=tuple(layers),
            train_transformer=self.train_transformer,
            lora_compute_dtype=self.compute_dtype,
            reference_window=self.reference_window,
        )
        if self.model == TINY_KLEIN:
            from divrl.policy.flux2.tiny import tiny_klein_components

            dtype = None if self.torch_dtype == "auto" else self.torch_dtype
            policy = Flux2KleinPolicy(
                **tiny_klein_components(self.tiny_seed), base_dtype=dtype, model_id=TINY_KLEIN, **common
            )
        else:
            policy = Flux2KleinPolicy.from_pretrained(
                self.model,
                torch_dtype=self.torch_dtype,
                local_files_only=self.local_files_only,
                revision=self.revision,
                text_encoders=self.text_encoders,
                **common,
            )
        encoder = policy.text_encoder
        if encoder is not None and max(layers) > encoder.config.num_hidden_layers:
            raise ValueError(
                f"policy.text_encoder_out_layers {list(layers)}: the text encoder of {self.model} has "
                f"{encoder.config.num_hidden_layers} layers; give indices up to it (klein: [9, 18, 27])"
            )
        return policy
