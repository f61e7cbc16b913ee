"""Small helpers shared across divrl."""

from __future__ import annotations

import torch

__all__ = ["parse_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, who: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``"float16"`` / ``"float32"`` (or a ``torch.dtype``, or ``None``) → dtype.

    Raises:
        ValueError: naming ``who`` and the accepted values, for anything else.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{who}: dtype must be one of 'float32', 'bfloat16', 'float16' or None, got {dtype!r}")
    return _DTYPES[key]
