"""What every family's conditioning and encoder share: a batch of per-row tensors to select and repeat
(:class:`BatchRows`), and the least-recently-used caches of encoded prompts and references (:func:`remember`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["BatchRows", "remember"]


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
        return replace(self, **{name: None if (value := getattr(self, name)) is None else fn(value)
                                for name in self.row_fields})


def remember(cache: OrderedDict, key, value, size: int) -> None:
    """Put ``value`` in ``cache`` as its most recent entry, evicting the least recently used beyond ``size``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
