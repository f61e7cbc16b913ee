"""The scorer interface: one reference and ``G`` generated images → per-image nSSM and VSM components."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from divrl.images import ImageLike


class Components(NamedTuple):
    """Reward components of one group, float32 ``(G,)`` tensors on the CPU; ``None`` when not requested."""

    nssm: Tensor | None
    vsm: Tensor | None


class GroupScorer(nn.Module):
    """Base class: score ``G`` generated images against one reference.

    Subclasses implement :meth:`score_group`. Failures raise; a scorer never turns an error into a score.
    """

    def score_group(
        self,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | Sequence[ImageLike] | None = None,
        *,
        need_nssm: bool = True,
        need_vsm: bool = True,
    ) -> Components:  # pragma: no cover - abstract
        raise NotImplementedError
