"""Tiny Qwen-Image-Edit-Plus components built in code: no downloads, CPU-fast, the real diffusers/transformers classes.

The transformer (``QwenImageTransformer2DModel``), the VAE (``AutoencoderKLQwenImage``, a causal 3-D VAE with its
per-channel latent mean and std) and the text encoder (``Qwen2_5_VLForConditionalGeneration`` with a vision tower)
have Qwen-Image-Edit's architecture at toy width and depth. The tokenizer is the byte-level BPE of
:func:`divrl.policy.tiny.tiny_qwen_tokenizer` with Qwen2.5-VL's vision markers added as special tokens; the
processor is :class:`ImageTextProcessor`, Qwen2-VL's processor without its video half (which needs torchvision).
``QwenImageEditPlusPipeline(**tiny_qwen_edit_components())`` runs at 64² with two references and true CFG in well
under a second once the pipeline's reference sizes (module constants ``CONDITION_IMAGE_SIZE`` / ``VAE_IMAGE_SIZE``,
~384² and ~1024²) are set to the policy's.
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLProcessor

from divrl.policy.tiny import tiny_qwen_tokenizer

__all__ = [
    "ImageTextProcessor",
    "tiny_qwen_edit_components",
    "tiny_vl_tokenizer",
    "QWEN_SCHEDULER_CONFIG",
    "VISION_TOKENS",
]

QWEN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
"""Qwen-Image-Edit's ``FlowMatchEulerDiscreteScheduler`` configuration (``scheduler/scheduler_config.json`` of the
2509 and 2511 releases): dynamic, exponential shift for the image sequence length, ending at 0.02."""

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
"""Qwen2.5-VL's vision markers: the prompt template's ``Picture i: <|vision_start|><|image_pad|><|vision_end|>``."""


class ImageTextProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for text and images only: the same tokenisation and image patching, without the video
    processor that ``Qwen2VLProcessor`` insists on (it needs torchvision). ``QwenImageEditPlusPipeline`` calls it as it
    calls the real one (``processor(text=..., images=..., padding=True, return_tensors="pt")``)."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super(Qwen2VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)


TEMPLATE_WORDS = tuple(
    "Describe the key features of the input image color shape size texture objects background then explain how "
    "user's text instruction should alter or modify Generate a new that meets requirements while maintaining "
    "consistency with original where appropriate Picture".split()
)
"""The words of the pipeline's system prompt (``prompt_template_encode``), learned as whole tokens so that its prefix
is about as short as the real tokenizer makes it (which the pipeline's ``prompt_template_encode_start_idx`` drops)."""


def tiny_vl_tokenizer():
    """The tiny Qwen BPE tokenizer, also knowing the prompt template's words, with Qwen2.5-VL's vision markers as
    special tokens."""
    tokenizer = tiny_qwen_tokenizer(model_max_length=1024, extra_words=TEMPLATE_WORDS, vocab_size=1400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
    return tokenizer


def tiny_qwen_edit_components(seed: int = 0, width: int = 16, heads: int = 2, head_dim: int = 8) -> dict:
    """The components of a tiny ``QwenImageEditPlusPipeline``, in eval mode, deterministic for a given ``seed``.

    Args:
        seed: initialises every module's random weights.
        width: hidden width of the text encoder and its vision tower (the transformer's joint dimension).
        heads: attention heads of the transformer.
        head_dim: attention head width (the sum of the 3 rotary axes, 2 + 2 + 4: 8).

    Returns:
        A dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``processor`` and ``scheduler``.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if head_dim != 8:
        raise ValueError("tiny_qwen_edit_components: head_dim must be 8 (the 3 rotary axes take 2, 2 and 4)")
    tokenizer = tiny_vl_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    processor = ImageTextProcessor(Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56), tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=width,
            intermediate_size=2 * width,
            num_heads=2,
            out_hidden_size=width,
            fullatt_block_indexes=[0],
            window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=width,
        axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    for module in (transformer, vae, text_encoder):
        module.eval()  # built from configs, these start in train mode
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
    }
