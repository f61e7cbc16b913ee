"""The generator being trained: FLUX.1 Kontext with a LoRA adapter (:class:`KontextPolicy`)."""

from divrl.policy.kontext import DEFAULT_LORA_TARGETS, Condition, KontextPolicy, LoRAConfig, ModelLoadError

__all__ = ["KontextPolicy", "LoRAConfig", "Condition", "ModelLoadError", "DEFAULT_LORA_TARGETS"]
