"""The generator being trained: the :class:`Policy` seam (base.py) and its model families.

- :class:`Policy` / :class:`PolicyConfig`: what every family implements (encode, initial noise, velocity, sigmas,
  decode, sharding units...) and the settings every family shares;
- :mod:`divrl.policy.lora` and :mod:`divrl.policy.reference`: the LoRA adapter, its diffusers files and the KL
  reference of full fine-tuning, generic over diffusers transformers;
- :mod:`divrl.policy.kontext`: FLUX.1 Kontext (:class:`KontextPolicy`, :class:`KontextConfig`), the default family;
- :mod:`divrl.policy.flux2`: FLUX.2 [klein] (``Flux2KleinPolicy``, ``Flux2KleinConfig``);
- :mod:`divrl.policy.qwen_image`: Qwen-Image-Edit-Plus 2509 / 2511 (``QwenEditPolicy``, ``QwenEditConfig``).
"""

# the default family first, then the others register themselves (the order before ruff was adopted)
# isort: off
from divrl.policy.base import Conditioning, ModelLoadError, Policy, PolicyConfig
from divrl.policy.lora import DEFAULT_LORA_TARGETS, LoRAConfig
from divrl.policy.kontext import Condition, KontextConfig, KontextPolicy
from divrl.policy import flux2  # noqa: F401 - registers the family (its folders are recognised by every loader)
from divrl.policy import qwen_image  # noqa: F401 - the same
# isort: on

__all__ = [
    "Policy",
    "PolicyConfig",
    "Conditioning",
    "KontextPolicy",
    "KontextConfig",
    "LoRAConfig",
    "Condition",
    "ModelLoadError",
    "DEFAULT_LORA_TARGETS",
]
