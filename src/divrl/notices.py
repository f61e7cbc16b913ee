"""Third-party notices that do not apply to a divrl run, silenced in one place, each with the reason.

The ``divrl`` command calls :func:`quiet` before it imports its libraries; importing divrl as a library changes
nothing. Only the messages listed here are dropped, matched by their logger and text: every other warning, real
ones included, stays visible. ``DIVRL_NOTICES=1`` shows them all again.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["NOTICES", "WARNINGS", "quiet", "quiet_loading_bars"]

NOTICES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("torchao",),
        r"Failed to load .*\.so",
        "torchao probing its optional CUDA and MX kernels at import; divrl uses torchao only for AdamW8bit, which needs "
        "neither",
    ),
    (
        ("diffusers.quantizers.torchao.torchao_quantizer",),
        r"Unable to import `torchao` Tensor objects",
        "diffusers probing torchao quantization at import; divrl never loads torchao-quantized checkpoints",
    ),
    (
        ("bitsandbytes.backends.cpu.ops",),
        r"Failed to load CPU gemm_4bit_forward",
        "bitsandbytes' optional 4-bit CPU kernel; divrl uses its 8-bit optimizers only",
    ),
    (
        ("torch.utils._pytree",),
        r"is an Enum subclass and is now natively supported",
        "torchao registering enums with torch at import: a deprecation for torchao's authors",
    ),
    (
        ("transformers.utils.import_utils",),
        r"requires torchvision \(not installed\)",
        "transformers' image processors fall back to their PIL versions, which are what divrl's backbones use",
    ),
    (
        ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"),
        r"Tip: For seamless cloud",
        "an advertisement for a logging service",
    ),
    (
        ("diffusers.models.modeling_utils",),
        r"should be kept in float32: \[\]",
        "casting a model none of whose modules must stay in float32",
    ),
)
"""``(logger names, message pattern, why it does not apply)`` of the log records :func:`quiet` drops."""

WARNINGS: tuple[tuple[str, str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own use of a torch API: for Lightning's authors",
    ),
)
"""``(message pattern, why it does not apply)`` of the Python warnings :func:`quiet` ignores."""


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet() -> None:
    """Drop :data:`NOTICES` and :data:`WARNINGS` (log filters: imports nothing, so ``divrl --help`` stays fast).
    Idempotent; a no-op with ``DIVRL_NOTICES=1``."""
    if os.environ.get("DIVRL_NOTICES"):
        return
    for names, pattern, _ in NOTICES:
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
                logger.addFilter(_Drop(pattern))
    for pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_loading_bars() -> None:
    """Switch off the model-loading progress bars of diffusers and transformers (a tiny model loads in a blink; the
    commands that load models call this); downloads from the Hub keep their progress bars. A no-op with
    ``DIVRL_NOTICES=1``."""
    if os.environ.get("DIVRL_NOTICES"):
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars_off = are_progress_bars_disabled()  # the user's choice (HF_HUB_DISABLE_PROGRESS_BARS), kept
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also switches off the Hub's bars: downloads keep theirs
    if not hub_bars_off:
        enable_progress_bars()
