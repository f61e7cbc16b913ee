"""FLUX.2 [klein], the second model family: :class:`Flux2KleinPolicy` (policy.py), its conditioning and precomputed
payload (:class:`KleinEncoder`, encoder.py), loading from the Hub or a folder (builder.py), a run's settings
(:class:`Flux2KleinConfig`, config.py) and a tiny offline klein (tiny.py). Select it in YAML with
``model.policy: {class_path: divrl.policy.flux2.Flux2KleinConfig, init_args: {model: ...}}``."""

from divrl.policy.flux2.config import KLEIN_TEXT_LAYERS, TINY_KLEIN, Flux2KleinConfig
from divrl.policy.flux2.encoder import KleinCondition, KleinEncoder
from divrl.policy.flux2.policy import KLEIN_LORA_TARGETS, Flux2KleinPolicy, klein_flops
from divrl.policy.loading import register_family

register_family("Flux2KleinPipeline", "FLUX.2 [klein]", "divrl.policy.flux2.Flux2KleinConfig", "flux.2-klein")

__all__ = [
    "Flux2KleinPolicy",
    "Flux2KleinConfig",
    "KleinCondition",
    "KleinEncoder",
    "KLEIN_LORA_TARGETS",
    "KLEIN_TEXT_LAYERS",
    "TINY_KLEIN",
    "klein_flops",
]
