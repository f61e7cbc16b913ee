"""The reward seam: a :class:`Reward` scores a :class:`Group` (one condition and its ``G`` images) into a
:class:`RewardOutput`; and the scorer interface the DivRL rewards are built on (:class:`GroupScorer`).

A group carries everything a reward may need: the condition's id, prompt, category, *every* reference with its mask,
the identity's metadata, and the generated images. A reward returns one reward per image and any number of named
components (logged as ``reward/<name>``, shown in image grids, written to ``samples.json``).

Failures are never a reward of 0: a non-finite score raises :class:`NonFiniteReward`, the one error a training run
skips (the group is dropped and counted); any other exception is a configuration error and stops the run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from divrl.images import ImageLike

if TYPE_CHECKING:
    from divrl.data.stream import ConditionSample

__all__ = ["Group", "RewardOutput", "NonFiniteReward", "Reward", "Components", "GroupScorer"]


class NonFiniteReward(ValueError):
    """A reward (or one of its components) came out NaN or infinite for a group: the group is skipped and counted,
    never rewarded 0. Any other exception raised by a reward stops the run."""


@dataclass
class Group:
    """One condition and the ``G`` images generated for it: what a :class:`Reward` scores.

    Attributes:
        sample: the condition (id, prompt, category, every reference and mask, the identity's metadata).
        images: the generated images, float ``(G, 3, H, W)`` in [0, 1].
        gen_masks: optional subject masks of the generated images ``(G, H, W)`` (standalone scoring).
    """

    sample: ConditionSample
    images: Tensor
    gen_masks: Tensor | None = None

    @classmethod
    def of(
        cls,
        reference: ImageLike,
        images: ImageLike | Sequence[ImageLike],
        ref_mask: ImageLike | None = None,
        gen_masks: ImageLike | None = None,
        prompt: str = "",
        id: str = "group",
    ) -> Group:
        """A group of one reference (and its mask) and some images, for scoring outside training."""
        from divrl.data.stream import ConditionSample
        from divrl.images import to_image_batch

        return cls(ConditionSample(id, prompt, [reference], [ref_mask]), to_image_batch(images, "images"), gen_masks)

    @property
    def size(self) -> int:
        """``G``, the number of images."""
        return self.images.shape[0]

    @property
    def references(self) -> list:
        return self.sample.references

    @property
    def masks(self) -> list:
        return self.sample.masks

    @property
    def reference(self):
        """The first reference (single-subject rewards)."""
        return self.sample.references[0]

    @property
    def mask(self):
        """The first reference's mask, or ``None``."""
        return self.sample.masks[0]

    @property
    def prompt(self) -> str:
        return self.sample.prompt

    @property
    def metadata(self) -> dict:
        return self.sample.metadata


@dataclass
class RewardOutput:
    """The rewards of one group and the components behind them.

    Attributes:
        reward: ``(G,)`` float32 rewards on the CPU, the quantity the objective maximises.
        components: named ``(G,)`` float32 CPU tensors (e.g. ``nssm``, ``vsm``), logged and shown, not optimised.
        gated: ``(G,)`` bool, the samples whose gate fired (DivRL's identity gate ``VSM < s``); all False when the
            reward has no gate.
    """

    reward: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    gated: Tensor | None = None

    def __post_init__(self) -> None:
        if self.gated is None:
            self.gated = torch.zeros(self.reward.shape, dtype=torch.bool)


class Reward(nn.Module):
    """Base class of rewards: ``forward(group) -> RewardOutput``.

    Calling a reward runs :meth:`forward` and checks its output: one finite float reward per image and finite
    components of the same shape, else :class:`NonFiniteReward` (non-finite values) or ``ValueError`` (a malformed
    output, a configuration error); what it returns is detached float32 on the CPU, whatever device the reward ran on. ``reward(reference, images, ref_mask)`` is a shorthand for scoring one reference
    outside training (:meth:`Group.of`). Reward models are judges: the training module never trains them.
    """

    def forward(self, group: Group) -> RewardOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def concurrency(self) -> int:
        """How many groups may be scored at once, on threads: 1 (a local model: one group after the other); a
        :class:`~divrl.rewards.RemoteReward` allows its ``max_in_flight`` requests."""
        return 1

    def __call__(self, group: Group | ImageLike, images=None, ref_mask=None, gen_masks=None) -> RewardOutput:
        if not isinstance(group, Group):
            group = Group.of(group, images, ref_mask, gen_masks)
        out = super().__call__(group)
        check_output(out, group.size, type(self).__name__)
        return RewardOutput(
            _plain(out.reward), {k: _plain(v) for k, v in out.components.items()}, out.gated.detach().bool().cpu()
        )


RESERVED_COMPONENTS = frozenset({"reward", "reward_std", "mean", "std", "gated_fraction", "id", "prompt", "files"})
"""Names a component cannot take: they are the reward's own metrics and ``samples.json`` fields."""


def check_setting(
    who: str,
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    what: str = "",
    where: str = "the reward's init_args (its entry of model.rewards)",
) -> float:
    """``value`` as a float, or a ``ValueError`` (one sentence naming ``who``'s init argument ``name``, its bounds and
    where to fix it) when it is not a finite number in ``[low, high]`` (a bound ``None``: open on that side)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    inside = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(number)
    inside = inside and (low is None or number >= low) and (high is None or number <= high)
    if not inside:
        bounds = (
            f" in [{low:g}, {high:g}]"
            if low is not None and high is not None
            else f" >= {low:g}"
            if low is not None
            else f" <= {high:g}"
            if high is not None
            else ""
        )
        raise ValueError(
            f"{who}: init_args.{name} must be a finite number{bounds}{f' ({what})' if what else ''}, got "
            f"{value!r}: set it in {where}"
        )
    return number


def _plain(value: Tensor) -> Tensor:
    return value.detach().float().cpu()


def check_output(out: RewardOutput, size: int, who: str) -> None:
    """Refuse a reward output that is not ``size`` finite rewards and components (see :class:`Reward`)."""
    if not isinstance(out, RewardOutput):
        raise TypeError(f"{who} returned {type(out).__name__}; a reward's forward returns a RewardOutput")
    reserved = sorted(set(out.components) & RESERVED_COMPONENTS)
    if reserved or not all(isinstance(k, str) and k for k in out.components):
        raise ValueError(
            f"{who} returned components named {reserved or list(out.components)}; component names are "
            f"non-empty strings other than {sorted(RESERVED_COMPONENTS)}"
        )
    for name, value in {"reward": out.reward, **out.components, "gated": out.gated}.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != (size,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{who} returned {name} of shape {shape} for a group of {size} images; expected ({size},)")
    for name, value in {"reward": out.reward, **out.components}.items():
        if not torch.isfinite(value).all():
            raise NonFiniteReward(
                f"{who} returned non-finite {name} scores {value.tolist()}; refusing to turn them into rewards"
            )


# ---------------------------------------------------------------------------------------------------- scorers


class Components(NamedTuple):
    """nSSM and VSM of one group, float32 ``(G,)`` tensors on the CPU; ``None`` when not requested."""

    nssm: Tensor | None
    vsm: Tensor | None


class GroupScorer(nn.Module):
    """Base class: score ``G`` generated images against one reference into :class:`Components` (nSSM, VSM).

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
