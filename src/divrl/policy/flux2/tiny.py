"""Tiny FLUX.2 [klein] components built in code: no downloads, CPU-fast, the real diffusers/transformers classes.

The transformer (``Flux2Transformer2DModel``), the VAE (``AutoencoderKLFlux2``, with its batch-norm latent statistics)
and the text encoder (``Qwen3ForCausalLM``) have klein's architecture at toy width and depth. The tokenizer is a
small byte-level BPE learned in code with the ``tokenizers`` library, as a ``Qwen2Tokenizer`` with a minimal chat
template (the pipeline applies it to every prompt). The text encoder has 4 layers, read at
:data:`TINY_TEXT_LAYERS` (the real models' are 9, 18, 27), so their 3 × 16 stacked widths are the transformer's joint
dimension 48. ``Flux2KleinPipeline(**tiny_klein_components())`` runs 4 steps at 64×64 with two references and CFG in
a fraction of a second; the pipeline refuses references under 64 px (comparisons with it run at 64 px), the
policy takes any multiple of 4.
"""

from __future__ import annotations

import torch

from divrl.policy.tiny import FLUX_SCHEDULER_CONFIG, tiny_qwen_tokenizer

__all__ = ["tiny_klein_components", "tiny_qwen_tokenizer", "TINY_TEXT_LAYERS", "KLEIN_SCHEDULER_CONFIG"]

TINY_TEXT_LAYERS = (1, 2, 3)
"""The hidden layers of the tiny text encoder whose states are stacked into the prompt embedding."""

KLEIN_SCHEDULER_CONFIG = dict(FLUX_SCHEDULER_CONFIG)
"""The ``FlowMatchEulerDiscreteScheduler`` configuration of the tiny model, FLUX's (dynamic shifting: the pipeline hands
the scheduler ``μ`` from ``compute_empirical_mu``)."""


def tiny_klein_components(seed: int = 0, text_width: int = 16, heads: int = 2, head_dim: int = 8) -> dict:
    """The components of a tiny ``Flux2KleinPipeline``, in eval mode, deterministic for a given ``seed``.

    Args:
        seed: initialises every module's random weights.
        text_width: hidden width of the text encoder (the transformer's joint dimension is 3 × it).
        heads: attention heads of the transformer.
        head_dim: attention head width (the sum of the 4 rotary axes, 2 each: 8).

    Returns:
        A dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``;
        ``Flux2KleinPipeline(**components)`` builds the (base, undistilled) pipeline.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if head_dim != 8:
        raise ValueError("tiny_klein_components: head_dim must be 8 (the 4 rotary axes take 2 each)")
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=len(TINY_TEXT_LAYERS) * text_width,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    with torch.no_grad():  # latent statistics as a trained VAE has them, not the identity (0 mean, unit variance)
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=max(TINY_TEXT_LAYERS) + 1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    )
    for module in (transformer, vae, text_encoder):
        module.eval()  # built from configs, these start in train mode
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER_CONFIG),
    }
