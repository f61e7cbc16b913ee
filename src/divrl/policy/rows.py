"""What the model families share besides the :class:`~divrl.policy.Policy` seam: a batch of per-row tensors to
select and repeat (:class:`BatchRows`), the least-recently-used caches of encoded prompts and references
(:func:`remember`), the image sizes a VAE with 2×2 packing takes (:class:`PackedGrid`), and the error of a policy whose
VAE encoder was dropped (:func:`no_vae_encoder`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["BatchRows", "PackedGrid", "no_vae_encoder", "remember"]


class BatchRows:
    """A mixin for a family's conditioning dataclass: :attr:`row_fields` name its per-row tensors (``None`` allowed);
    the rest (position ids, sizes) is shared by the batch."""

    row_fields: ClassVar[tuple[str, ...]] = ()

    def select(self, index: Tensor | Sequence[int] | slice):
        """The conditions of a subset of samples (a micro-batch)."""
        if isinstance(index, slice):
            return self._map_batch(lambda t: t[index])
        return self._map_batch(lambda t: t[torch.as_tensor(index, device=t.device)])

    def repeat_interleave(self, repeats: int):
        """Each row repeated ``repeats`` times in place (condition i → rows i·G ... i·G + G − 1)."""
        return self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_batch(self, fn):
        """Apply ``fn`` to every per-row tensor."""
        return replace(
            self, **{name: None if (value := getattr(self, name)) is None else fn(value) for name in self.row_fields}
        )


def remember(cache: OrderedDict, key, value, size: int) -> None:
    """Put ``value`` in ``cache`` as its most recent entry, evicting the least recently used beyond ``size``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


class PackedGrid:
    """A mixin for a policy whose latents are packed 2×2 after a VAE of ``vae_scale_factor``: the sizes it takes."""

    vae_scale_factor: int

    def check_size(self, height: int, width: int) -> None:
        """Refuse an image size the VAE and the 2×2 packing cannot take, naming the multiple."""
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of {multiple} (VAE factor "
                f"{self.vae_scale_factor} x 2 for packing), e.g. 512x512: set sampling.resolution (divrl data: "
                f"--precompute-resolution) to one"
            )

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The packed latent grid (rows, columns) of a ``height × width`` image: one token per cell."""
        self.check_size(height, width)
        multiple = self.vae_scale_factor * 2
        return height // multiple, width // multiple


def no_vae_encoder(family: str | None = None) -> RuntimeError:
    """The error for encoding an image with a policy whose VAE encoder was dropped (``policy.text_encoders: false``),
    naming the fix; ``family`` names the model ``--precompute`` must be given (e.g. ``"a Kontext model"``)."""
    which = "" if family is None else f" ({family})"
    return RuntimeError(
        f"this policy has no VAE encoder (policy.text_encoders: false drops the encoders), so every "
        f"condition must come precomputed: convert the shards with `divrl data ... --precompute "
        f"MODEL`{which}. Target images (SFT, DPO on shard pairs) are never precomputed: they need "
        f"policy.text_encoders: true"
    )
