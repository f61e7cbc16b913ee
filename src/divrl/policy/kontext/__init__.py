"""FLUX.1 Kontext, the default model family: :class:`KontextPolicy` (policy.py), its conditioning and precomputed
payload (:class:`KontextEncoder`, encoder.py), loading from the Hub or a folder (builder.py), a run's settings
(:class:`KontextConfig`, config.py) and FLUX's sigma schedule (schedule.py)."""

from divrl.policy.base import ModelLoadError
from divrl.policy.kontext.config import TINY, KontextConfig
from divrl.policy.kontext.encoder import Condition, KontextEncoder
from divrl.policy.kontext.policy import KontextPolicy
from divrl.policy.kontext.schedule import calculate_shift, flux_sigmas, scheduler_sigmas
from divrl.policy.loading import register_family
from divrl.policy.lora import DEFAULT_LORA_TARGETS, LoRAConfig

register_family("FluxKontextPipeline", "FLUX.1 Kontext", "divrl.policy.KontextConfig", "flux.1-kontext")

__all__ = [
    "KontextPolicy",
    "KontextConfig",
    "KontextEncoder",
    "Condition",
    "ModelLoadError",
    "TINY",
    "LoRAConfig",
    "DEFAULT_LORA_TARGETS",
    "calculate_shift",
    "flux_sigmas",
    "scheduler_sigmas",
]
