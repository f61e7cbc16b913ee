"""Tiny FLUX.1 Kontext components built in code: no downloads, CPU-fast, the real diffusers/transformers classes.

The transformer, VAE, CLIP and T5 encoders have the architecture of FLUX.1 Kontext at toy width and depth; the
tokenizers are word-level vocabularies built with the ``tokenizers`` library and wrapped in
``PreTrainedTokenizerFast``. ``FluxKontextPipeline(**tiny_kontext_components())`` runs 6 steps at 64×64 in well
under a second on a laptop CPU, and ``save_pretrained`` / ``from_pretrained`` round-trip it in diffusers' format.
:func:`tiny_qwen_tokenizer` is the small byte-level BPE Qwen tokenizer that the families with Qwen text encoders build
their tiny models with.
"""

from __future__ import annotations

import string

import torch

__all__ = ["tiny_kontext_components", "tiny_tokenizer", "tiny_qwen_tokenizer", "FLUX_SCHEDULER_CONFIG"]

FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1's scheduler configuration (the default ``FlowMatchEulerDiscreteScheduler()`` has no dynamic shift)."""

_WORDS = (
    "a an the of in on at with and photo picture painting sketch render dog cat toy robot sneaker backpack bowl "
    "can candle clock teapot vase boot sloth bear duck monster sunglasses car cartoon plushie subject object "
    "red orange yellow green blue purple pink black white grey brown gold silver striped spotted checkered "
    "star square disc circle triangle big small tiny large left right top bottom centre center front back side "
    "beach forest city street snow mountain river table floor grass sky room kitchen garden desert night day "
    "sitting standing lying jumping running floating wearing holding looking under over near far behind "
    "style watercolor oil pencil pixel anime cubist poster sculpture origami lego sks"
).split()


def tiny_tokenizer(model_max_length: int, pad_token: str = "<pad>", eos_token: str = "</s>"):
    """A word-level fast tokenizer over a small fixed vocabulary (unknown words map to ``<unk>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [pad_token, eos_token, "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + _WORDS + list(string.ascii_lowercase + string.digits))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos_token}", special_tokens=[(eos_token, vocab[eos_token])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        pad_token=pad_token,
        eos_token=eos_token,
        unk_token="<unk>",
    )


def tiny_kontext_components(seed: int = 0, text_dim: int = 32, heads: int = 2, head_dim: int = 16) -> dict:
    """The components of a tiny ``FluxKontextPipeline``, in eval mode, deterministic for a given ``seed``.

    Args:
        seed: initialises every module's random weights.
        text_dim: width of the CLIP and T5 encoders (the transformer's pooled and joint dimensions).
        heads: attention heads of the transformer.
        head_dim: attention head width (must equal the sum of ``axes_dims_rope``: 16 = 4 + 6 + 6).

    Returns:
        A dict with ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``
        and ``scheduler``; ``FluxKontextPipeline(**components)`` builds the pipeline.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if head_dim != 16:
        raise ValueError("tiny_kontext_components: head_dim must be 16 (the rotary axes split it 4 + 6 + 6)")
    vocab_size = len(tiny_tokenizer(77))

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=text_dim,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()  # built from configs, these start in train mode: dropout would change every encoding
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(77),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_tokenizer(512),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    }


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's chat markup, reduced to what the pipeline's ``apply_chat_template`` call needs."""


def tiny_qwen_tokenizer(model_max_length: int = 512, extra_words: tuple[str, ...] = (), vocab_size: int = 1000):
    """A small byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokenizer; merges learned in code on the tiny models'
    words and ``extra_words``, so each of them is one or two tokens), Qwen's chat markers as special tokens and a
    minimal chat template. Built as ``Qwen2Tokenizer`` itself builds one from ``vocab.json`` and ``merges.txt``, so
    ``save_pretrained`` / ``from_pretrained`` give the same token ids."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = ["user", "assistant", "system", *_WORDS, *extra_words]
    bpe.train_from_iterator([" ".join(words), *(f"a {w}" for w in words), *(f" {w}" for w in words)], trainer)
    learned = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=learned["vocab"],
        merges=[tuple(m) for m in learned["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=_CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
