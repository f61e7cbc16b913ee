"""Analytic FLOP counts of the FLUX transformer, for throughput and MFU accounting (plain Python, no torch)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["transformer_flops", "PEAK_TFLOPS", "FLUX_TRANSFORMER_CONFIG", "FLUX_VAE_CONFIG"]

FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FLUX.1 [dev] / Kontext [dev]'s ``FluxTransformer2DModel`` configuration (build it on the meta device to count)."""

FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
"""FLUX.1's ``AutoencoderKL`` configuration."""

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak TFLOP/s of common training GPUs (vendor datasheets, no sparsity), matched on the device name."""


def transformer_flops(config: Mapping, image_tokens: int, reference_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one FLUX transformer call for one sample (2 per multiply-add).

    Double blocks: image and text streams each with QKV, output projection and a 4× MLP, joint attention over all
    tokens. Single blocks: one stream with fused QKV + 4× MLP in, then an output projection from ``5·h``. Attention:
    ``QKᵀ`` and ``PV`` cost ``2·T²·h`` each. Modulation, norms and embeddings act per sample or are negligible and are
    left out (``tests/test_gpu_benchmark.py`` checks the count against the blocks' real matmuls).

    Args:
        config: the transformer's config (``attention_head_dim``, ``num_attention_heads``, ``num_layers``,
            ``num_single_layers``).
        image_tokens, reference_tokens, text_tokens: token counts of the noisy latents, the reference and the prompt.
    """
    h = config["attention_head_dim"] * config["num_attention_heads"]
    image = image_tokens + reference_tokens
    total = image + text_tokens

    def stream(tokens: int) -> int:  # QKV, output projection, MLP up and down
        return 2 * tokens * (3 * h * h + h * h + 2 * 4 * h * h)

    double = stream(image) + stream(text_tokens) + 2 * 2 * total * total * h
    single = 2 * total * (3 * h * h + 4 * h * h) + 2 * total * (5 * h * h) + 2 * 2 * total * total * h
    return float(config["num_layers"] * double + config["num_single_layers"] * single)
