"""Qwen-Image-Edit-Plus (2509 / 2511), the third model family: :class:`QwenEditPolicy` (policy.py), its conditioning
(:class:`QwenEditEncoder`, encoder.py: the VL encoder reads the prompt with the references), loading from the Hub or
a folder (builder.py), a run's settings (:class:`QwenEditConfig`, config.py) and a tiny offline model (tiny.py).
Select it in YAML with ``model.policy: {class_path: divrl.policy.qwen_image.QwenEditConfig, init_args: {model: ...}}``.
"""

from divrl.policy.loading import register_family
from divrl.policy.qwen_image.config import TINY_QWEN_EDIT, QwenEditConfig
from divrl.policy.qwen_image.encoder import QwenEditCondition, QwenEditEncoder
from divrl.policy.qwen_image.policy import QWEN_EDIT_LORA_TARGETS, QwenEditPolicy, qwen_edit_flops

register_family(
    "QwenImageEditPlusPipeline", "Qwen-Image-Edit-Plus", "divrl.policy.qwen_image.QwenEditConfig", "qwen-image-edit"
)

__all__ = [
    "QwenEditPolicy",
    "QwenEditConfig",
    "QwenEditCondition",
    "QwenEditEncoder",
    "QWEN_EDIT_LORA_TARGETS",
    "TINY_QWEN_EDIT",
    "qwen_edit_flops",
]
